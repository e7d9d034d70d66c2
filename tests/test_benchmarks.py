"""The benchmark scripts run and their built-in correctness checks pass (timings are not asserted)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, *args: str, timeout: float = 300) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_mask_eval_benchmark_agrees_with_the_model():
    out = run_benchmark("mask_eval.py", "--masks", "500", "--images", "120")
    assert "spot-check mismatches: 0/5" in out
    assert re.search(r"[\d,]+ masks/s", out)


def test_gpu_benchmark_quick_on_cpu_prints_every_section_and_scores_masks_as_the_model(tmp_path):
    out = run_benchmark("gpu.py", "--quick", "--device", "cpu", "--json", str(tmp_path / "gpu.json"), timeout=600)
    assert out.startswith("command: python3 benchmarks/gpu.py --quick --device cpu")
    number = r" +[\d,]+(\.\d+)? "
    for row in (
        r"a fashion_mnist eager: fit / bare",
        r"a vit_s_tiny_synthetic eager: fit / bare",
        r"b vit_tiny b8 eager: path / timm step",
        r"b vit_small b8 compiled \(eager backend\): path / timm step",
        r"b vit_base b8 eager: path / timm step",
        r"c plain N=2: aggregate img/s \(wall\)",
        r"c best aggregate img/s \(plain, N=\d+\)",
        r"d 1000 images: masks/s",
    ):
        assert re.search(rf"^{row}{number}", out, re.MULTILINE), row
    assert out.count("mismatches: 0/20") == 2
    figures = json.loads((tmp_path / "gpu.json").read_text())
    assert not figures["failed"] and {f["section"] for f in figures["figures"]} == set("abcd")


def test_gpu_benchmark_imports_no_ray_optuna_or_mlflow():
    # the GPU machine has none of them: importing any (None in sys.modules) raises ImportError
    code = (
        "import sys; sys.modules.update(ray=None, optuna=None, mlflow=None); "
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); sys.argv = ['gpu.py', '--help']; "
        "import gpu; gpu.main()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--sections" in result.stdout


# What a GPU image lacks (benchmarks/gpu_session.sh): importing any of these fails as if it were not installed
NOT_ON_A_GPU_IMAGE = ("ray", "optuna", "mlflow", "matplotlib", "sklearn", "xdist", "pytest_timeout", "hypothesis")
# None in sys.modules: `import ray` raises ModuleNotFoundError and importlib.util.find_spec("ray") answers None, as
# where it is not installed (torch asks find_spec about optional modules)
NOT_INSTALLED = f"import sys\nsys.modules.update(dict.fromkeys({NOT_ON_A_GPU_IMAGE!r}))\n"


def test_the_gpu_session_runs_where_only_torch_timm_and_pytest_are_installed(tmp_path):
    """benchmarks/gpu_session.sh, as on a GPU machine but on the CPU, in a Python that cannot import Ray, Optuna,
    MLflow, matplotlib, scikit-learn or pytest's plugins (a sitecustomize on PYTHONPATH, so gpu.py's worker processes
    too): the CUDA tests are collected and fit's runs, every section of benchmarks/gpu.py runs (--smoke), and the
    summary says what happened."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NOT_INSTALLED)
    probe = subprocess.run([sys.executable, "-c", "import matplotlib"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(site)})  # fmt: skip
    assert "ModuleNotFoundError: import of matplotlib halted" in probe.stderr  # the blocker works
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "PATHSEARCH_GPU_TESTS_ON": "cpu",
        "GPU_TESTS_ARGS": "-k fit_trains",  # fit end to end: seeds, test split, resume, the path analysis
        "GPU_BENCH_ARGS": "--smoke --device cpu",
    }
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], capture_output=True, text=True,
                            env=env, timeout=300)  # fmt: skip
    out = tmp_path / "out"
    assert result.returncode == 0, result.stdout[-4000:] + (out / "gpu_tests.txt").read_text()[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "tests/test_gpu.py: 1 passed, 0 failed, 0 skipped, 0 error (exit 0)" in summary, summary
    assert f"device: no CUDA GPU visible; torch {torch.__version__}" in summary
    assert "benchmarks/gpu.py: exit 0, failed sections: none" in summary
    for row in ("a vit_s_tiny_synthetic eager: fit / bare: ", "b vit_tiny b8 eager: path / timm step: ",
                "c plain N=1: aggregate img/s (wall): ", "d 200 images: masks/s: "):  # fmt: skip
        assert re.search(rf"^  {re.escape(row)}[\d,]+\.\d{{3}} ", summary, re.MULTILINE), row
    assert "mismatches: 0/5" in (out / "gpu_benchmark.txt").read_text()
    tests = (out / "gpu_tests.txt").read_text()
    assert "deselected" in tests  # the whole file was collected, the rest deselected
    assert "path analysis plot not drawn: matplotlib is not installed" in tests  # said, not failed


def test_path_analysis_benchmark_agrees_with_naive_loop():
    out = run_benchmark("path_analysis.py", "--images", "24", "--img-size", "16", "--patch-size", "8")
    assert "mismatching entries: 0" in out
    assert re.search(r"speedup [\d.]+x", out)


def test_model_overhead_benchmark_prints_ratios():
    out = run_benchmark("model_overhead.py", "--rounds", "1")
    assert len(re.findall(r"ratio \d+\.\d{3}", out)) == 3


def test_train_throughput_benchmark_prints_ratios():
    out = run_benchmark("train_throughput.py", "--rounds", "1", "--epochs", "1")
    assert re.search(r"fit \(training\) +\d+ img/s +ratio \d+\.\d{3}", out)
    found = re.search(r"data loading +([\d.]+) s/epoch +share ([\d.]+)% of fit's training time", out)
    assert float(found.group(1)) > 0  # drawing an epoch's batches takes time; in-memory data, a fraction of a percent
    assert float(found.group(2)) < 100


def test_mlflow_logging_benchmark_counts_requests_against_a_real_server():
    out = run_benchmark("mlflow_logging.py", "--trials", "2", "--reports", "3")
    ours = float(re.search(r"pathsearch MlflowTrialLogger +([\d.]+) requests/result", out).group(1))
    ray_cb = float(re.search(r"Ray MLflowLoggerCallback +([\d.]+) requests/result", out).group(1))
    assert ours == 1.0  # one batched request per reported result (a count, not a timing)
    assert ray_cb >= 10 * ours


def test_selection_benchmark_measures_agreement_and_racing_on_a_score_table():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from selection import half_split_agreement, simulate_racing

    seeds = 8
    clear = {"baseline": [0.80 + 0.001 * i for i in range(seeds)], "a": [0.90 + 0.001 * i for i in range(seeds)],
             "b": [0.70 + 0.001 * (i % 3) for i in range(seeds)]}  # fmt: skip
    agreement = half_split_agreement(clear)
    assert agreement["kendall_tau_mean"] == 1.0 and agreement["same_winner"] == 1.0  # far apart: halves agree
    race = simulate_racing(clear, keep="baseline")
    assert race["same_winner"] == 1.0 and race["trials_used"] < 1.0  # b leaves the race early
    tied = {"baseline": [0.8, 0.9] * 4, "a": [0.9, 0.8] * 4}  # no difference: nothing can leave
    assert simulate_racing(tied, keep="baseline")["trials_used"] == 1.0


def _method_records(effects: dict[str, float], seeds: range, depth: int = 6) -> list[dict]:
    """A synthetic score table for benchmarks/method.py: each arm's test accuracy is the baseline's plus a known
    effect plus small noise of its own; the baseline's per-seed level varies a lot (what pairing cancels)."""
    import random

    import method

    from pathsearch.config.paths import path_names

    rng = random.Random(0)
    names = path_names(depth)
    records = []
    for seed in seeds:
        level = 0.80 + 0.03 * rng.gauss(0, 1)  # large shared seed noise
        rows = []
        for name in names:  # single-path accuracy grows with the path's layer; removing embed helps
            layer = 0 if name == "embed" else int(name.split(".")[1])
            loo = level + (0.01 + 0.001 * rng.gauss(0, 1) if name == "embed" else -0.002 * layer)
            rows.append({"path": name, "single_acc": 0.1 + 0.1 * layer + 0.005 * rng.gauss(0, 1), "loo_acc": loo})
        for arm in method.arms(depth):
            effect = effects.get(arm.label, 0.0) if arm.label != "baseline" else 0.0
            noise = 0.0 if arm.label == "baseline" else 0.002 * rng.gauss(0, 1)
            record = {"dataset": "digits", "depth": depth, "claim": arm.claim, "arm": arm.label, "seed": seed,
                      "test_acc": level + effect + noise, "val_acc": level, "seconds": 1.0}  # fmt: skip
            if arm.label == "baseline":
                record["analysis"] = {"full_acc": level, "rows": rows}
            records.append(record)
    return records


def test_method_benchmark_recovers_known_paired_effects_and_says_which_held():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import method

    effects = {"prune 3 shortest": 0.02, "prune 6 shortest": -0.03}  # every other arm: no effect
    rows, curves = method.summarise(_method_records(effects, range(1, 7)), ["digits"], [6])
    by_arm = {r["arm"]: r for r in rows}
    gain, loss, null = by_arm["prune 3 shortest"], by_arm["prune 6 shortest"], by_arm["scale init 0.1"]
    assert gain["ci_low"] < 0.02 < gain["ci_high"] and gain["held"] == "yes" and gain["wins"] == 6
    assert loss["ci_low"] < -0.03 < loss["ci_high"] and loss["held"] == "no: opposite effect"
    assert null["ci_low"] < 0 < null["ci_high"] and null["held"] == "no detectable effect"
    # pairing is what finds them: the shared seed noise (sd 3 points) dwarfs the effects (2-3 points)
    assert gain["value_std"] > 0.02
    short_vs_long = next(r for r in rows if r["arm"].startswith("single path"))
    assert short_vs_long["held"] == "yes" and short_vs_long["effect"] == pytest.approx(
        0.4, abs=0.01
    )  # layers 5-6 vs 1-2
    removal = next(r for r in rows if r["arm"].startswith("leave one out"))
    assert "(embed)" in removal["arm"] and removal["held"].endswith(": embed")  # only embed hurts, on every seed
    assert removal["effect"] == pytest.approx(0.01, abs=0.002)
    assert len(curves[("digits", 6)]["single"]) == 13
    method.adjust_for_many_comparisons(rows)  # Benjamini-Hochberg over the table's effects
    assert gain["q_value"] < 0.05 and null["q_value"] >= null["p_value"]
    assert all(r["q_value"] >= r["p_value"] for r in rows if r["q_value"] == r["q_value"])
    assert removal["q_value"] != removal["q_value"]  # the picked-after-looking row is not tested (NaN)


def test_method_benchmark_trains_every_arm_on_paired_seeds_and_continues_where_it_stopped(tmp_path):
    args = ["--datasets", "digits", "--depths", "3", "--seeds", "2", "--no-search", "--set", "train.epochs=1",
            "--out", str(tmp_path), "--work", str(tmp_path / "work")]  # fmt: skip
    out = run_benchmark("method.py", *args)
    assert "grid: 0 of 14 runs already" in out
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    arms = {r["arm"] for r in records}
    assert len(arms) == 7 and sorted((r["arm"], r["seed"]) for r in records) == sorted(
        (a, s) for a in arms for s in (1, 2)
    )
    assert all(0 <= r["test_acc"] <= 1 for r in records)
    table = (tmp_path / "method.md").read_text()
    for claim in ("path analysis", "pruning the k shortest", "EnsembleScale", "self-distillation"):
        assert claim in table
    for png in ("analysis", "pruning", "ensemble_scale", "distillation"):
        assert (tmp_path / f"{png}.png").stat().st_size > 1000
    again = run_benchmark("method.py", *args)  # everything is in runs.jsonl: nothing is trained again
    assert "grid: 14 of 14 runs already" in again
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 14


def test_sequential_benchmark_counts_every_error_for_every_noise_and_rule():
    out = run_benchmark("sequential.py", "--sims", "200")
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[3:4] in (["exact"], ["spending"],
            ["fixed"])]  # fmt: skip
    noises = {r[0] for r in rows}
    assert {"normal", "t3", "digits/d6", "fashion/d6", "fashion/d12"} <= noises, noises  # measured pools too
    assert {(r[0], r[2], r[3]) for r in rows} >= {(n, k, rule) for n in noises for k in "12"
                                                  for rule in ("exact", "spending", "fixed")}  # fmt: skip
    for r in rows:  # beats [CI], worse [CI], no gain, undecided: rates that add up to 1
        beats, worse, no_gain, undecided = float(r[5]), float(r[7]), float(r[9]), float(r[10])
        assert abs(beats + worse + no_gain + undecided - 1) < 0.01, r
    assert "any error (both challengers)" in out and re.search(r"stopped within 9 seeds [\d.]+", out)
    line = run_benchmark("sequential.py", "--sd", "0.0029", "--effect", "0.0025", "--sims", "300", "--json")
    case = json.loads(line.strip().splitlines()[-1])
    assert set(case) >= {"beats", "worse", "no_gain", "undecided", "mean_seeds", "any_error", "split"}
    assert case["beats"]["low"] <= case["beats"]["rate"] <= case["beats"]["high"] and case["sims"] == 300


def test_workers_benchmark_quick_runs_every_configuration_where_ray_optuna_and_mlflow_cannot_be_imported(tmp_path):
    """benchmarks/workers.py --quick: 1 worker, 2 workers (gloo) and 1 worker of 2 threads, each a real process group,
    in a Python that cannot import what a GPU image lacks (its worker processes neither): one JSON line on stdout."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NOT_INSTALLED)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "workers.py"), "--quick", "--json"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)},
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("command: python3 benchmarks/workers.py --quick --json")
    figures = json.loads(result.stdout)  # the only line on stdout
    assert figures["machine"]["backend"] == "gloo" and figures["machine"]["torch"] == torch.__version__
    configs = {c["label"]: c for c in figures["configs"]}
    assert list(configs) == ["1 worker x 1 thread", "2 workers x 1 thread", "1 worker x 2 threads"]
    assert [(r["workers"], r["threads"]) for r in figures["runs"]] == [(1, 1), (2, 1), (1, 2)]
    assert all(len(r["images_per_s"]) == 3 and min(r["images_per_s"]) > 0 for r in figures["runs"])  # 3 epochs
    two = configs["2 workers x 1 thread"]
    assert two["epochs_measured"] == 2  # the warm-up epoch skipped
    assert two["efficiency"]["mean"] == pytest.approx(two["speedup"]["mean"] / 2)
    assert two["speedup"]["low"] is None  # one repeat: no interval
    (same_cores,) = figures["equal_cpu"]
    ratio = two["run_means"][0] / configs["1 worker x 2 threads"]["run_means"][0]
    assert same_cores["workers"] == 2 and same_cores["ratio"]["mean"] == pytest.approx(ratio)
    (allreduce,) = figures["allreduce"]
    assert allreduce["floats"] == figures["runs"][1]["params"] and allreduce["ms"] > 0


def test_workers_benchmark_pairs_runs_by_repeat():
    """The speed-up is the mean of per-repeat ratios with a t interval: a repeat on which the machine ran at half
    speed for both runs changes no ratio (the paired design), and three ratios 1.8, 2.0, 2.2 give 2.0 +- t(0.975, 2)
    x 0.2 / sqrt(3) = 0.4968."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import workers

    one, two = workers.Run(1, 1, "cpu"), workers.Run(2, 1, "cpu")
    slow = [1.0, 0.5, 1.0]  # repeat 2 ran on a busy machine
    records = [{"run": one, "images_per_s": [1.0, 100 * s, 100 * s], "params": 10, "allreduce_s": None}
               for s in slow]  # fmt: skip
    records += [{"run": two, "images_per_s": [1.0, r * 100 * s, r * 100 * s], "params": 10, "allreduce_s": 0.001}
                for r, s in zip([1.8, 2.0, 2.2], slow, strict=True)]  # fmt: skip
    summary = workers.summarise([one, two], records, batch=20)
    speedup = summary["configs"][1]["speedup"]
    assert speedup["values"] == pytest.approx([1.8, 2.0, 2.2])
    assert speedup["mean"] == pytest.approx(2.0)
    assert speedup["low"] == pytest.approx(2.0 - 0.49683, abs=1e-4) and speedup["high"] == pytest.approx(2.49683, 1e-4)
    assert summary["configs"][1]["efficiency"]["mean"] == pytest.approx(1.0)
    assert summary["configs"][0]["images_per_s_mean"] == pytest.approx(250 / 3)  # warm-up epochs left out
    assert summary["equal_cpu"] == []  # no 1 worker x 2 threads run
    assert summary["allreduce"][0]["step_ms"] == pytest.approx(1e3 * 20 / (2.0 * 250 / 3))
