#!/usr/bin/env bash
# Run on a GPU machine with torch and timm but no install of pathsearch: OUT=DIR bash benchmarks/gpu_session.sh
# The CUDA tests (`pytest -m gpu`), then benchmarks/gpu.py, each under its own time limit, their output in $OUT; at
# the end one summary to paste (tests passed/failed/skipped, each benchmark figure on a line, device, torch).
# Needs only torch, timm (with huggingface_hub, safetensors, pyyaml), torchvision, numpy, scipy and pytest. pyproject's
# pytest options name plugins such an image lacks (xdist's `-n 2 --dist loadfile`, pytest-timeout's `timeout` key),
# so pytest runs here without any plugin: autoloading off, addopts emptied, and its warning about the `timeout` key it
# then does not know silenced (each step has its own `timeout` instead).
# Fashion-MNIST comes from Debian's dataset-fashion-mnist; where it is not installed, put its four .gz files in
# .fashion-mnist/ of this checkout (ignored by git) and they are copied where the package would put them.
# Settings (tests/test_benchmarks.py runs this script on a CPU with them): PYTHON (default python3), GPU_TESTS_ARGS
# (more pytest arguments, e.g. -k ...), GPU_BENCH_ARGS (benchmarks/gpu.py's, e.g. --smoke --device cpu).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/pathsearch-gpu}
mkdir -p "$OUT"
debian=/usr/share/datasets/fashion-mnist
if [ ! -d "$debian" ] && [ -d .fashion-mnist ]; then
    mkdir -p "$debian" && cp .fashion-mnist/*.gz "$debian"/
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
# shellcheck disable=SC2086  # the two settings are lists of arguments
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 240 "$PYTHON" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider \
    -o addopts="" -W "ignore::pytest.PytestConfigWarning" ${GPU_TESTS_ARGS:-} >"$OUT/gpu_tests.txt" 2>&1
tests_exit=$?
echo "gpu tests: exit $tests_exit" | tee -a "$OUT/gpu_tests.txt"
rm -f "$OUT/gpu.json"
# shellcheck disable=SC2086
timeout 480 "$PYTHON" benchmarks/gpu.py --json "$OUT/gpu.json" ${GPU_BENCH_ARGS:-} >"$OUT/gpu_benchmark.txt" 2>&1
bench_exit=$?
echo "benchmarks/gpu.py: exit $bench_exit" | tee -a "$OUT/gpu_benchmark.txt"
tail -5 "$OUT/gpu_tests.txt"
tail -45 "$OUT/gpu_benchmark.txt"
"$PYTHON" - "$OUT" "$tests_exit" "$bench_exit" <<'EOF' | tee "$OUT/summary.txt"
import json, re, sys
from pathlib import Path

out, tests_exit, bench_exit = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
print("\n== summary: pathsearch GPU session ==")
try:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU visible"
    print(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda})")
except Exception as err:  # the summary still says what ran
    print(f"device: unknown, torch did not import: {err}")
log = (out / "gpu_tests.txt").read_text(errors="replace")
ends = [line for line in log.splitlines() if re.search(r"\bin [\d.]+s\b", line)]
counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", ends[-1] if ends else ""):
    counts[kind.rstrip("s") if kind.startswith("error") else kind] += int(n)
print(f"tests/test_gpu.py: {', '.join(f'{n} {k}' for k, n in counts.items())} (exit {tests_exit})")
figures = json.loads((out / "gpu.json").read_text()) if (out / "gpu.json").is_file() else None
if figures is None:
    print(f"benchmarks/gpu.py: no figures (exit {bench_exit}): see gpu_benchmark.txt")
else:
    failed = ", ".join(figures["failed"]) or "none"
    print(f"benchmarks/gpu.py: exit {bench_exit}, failed sections: {failed}; {figures['machine']}")
    for f in figures["figures"]:
        met = "" if f["met"] is None else f" (target {f['target']}: {'met' if f['met'] else 'MISSED'})"
        print(f"  {f['section']} {f['name']}: {f['value']:,.3f} {f['unit']}{met}")
EOF
[ "$tests_exit" = 0 ] && [ "$bench_exit" = 0 ]  # the session's exit status: 0 when both passed
