#!/usr/bin/env bash
# Run on a GPU machine with torch and timm but no install of pathsearch: OUT=DIR bash benchmarks/gpu_session.sh
# The CUDA tests (`pytest -m gpu`), then benchmarks/gpu.py, each under its own time limit, their output in $OUT.
# Fashion-MNIST comes from Debian's dataset-fashion-mnist; where it is not installed, put its four .gz files in
# .fashion-mnist/ of this checkout (ignored by git) and they are copied where the package would put them.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/pathsearch-gpu}
mkdir -p "$OUT"
debian=/usr/share/datasets/fashion-mnist
if [ ! -d "$debian" ] && [ -d .fashion-mnist ]; then
    mkdir -p "$debian" && cp .fashion-mnist/*.gz "$debian"/
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
timeout 240 python3 -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider >"$OUT/gpu_tests.txt" 2>&1
echo "gpu tests: exit $?" | tee -a "$OUT/gpu_tests.txt"
timeout 480 python3 benchmarks/gpu.py --json "$OUT/gpu.json" >"$OUT/gpu_benchmark.txt" 2>&1
echo "benchmarks/gpu.py: exit $?" | tee -a "$OUT/gpu_benchmark.txt"
tail -5 "$OUT/gpu_tests.txt"
tail -45 "$OUT/gpu_benchmark.txt"
