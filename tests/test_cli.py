"""The CLI end to end, driven exactly as the README does (`./dev.sh run ...`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pathsearch.paths import PathConfig

ROOT = Path(__file__).resolve().parents[1]


def test_readme_main_command_searches_confirms_and_exports_a_model_that_scores_its_logged_test_accuracy(tmp_path):
    """`./dev.sh run` exactly as the README gives it (made small with overrides, kept inside tmp_path): the search,
    then the confirmation, whose verdict ends the output; then `pathsearch export --with-weights --seed 2`: the
    exported model scores on the test split exactly the test accuracy logged for that seed."""
    import torch
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    from pathsearch.data import load_digits_split
    from pathsearch.model import create_path_vit

    small = ["train.epochs=3", "train.eval_every=1", "train.warmup_epochs=0", "data.train_size=200",
             "model.kwargs.depth=2", "search.num_samples=3", "search.scheduler=none", "space.model.pruned.high=3",
             "search.confirm.top_k=1", "search.confirm.seeds=2"]  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [a for s in small for a in ("--set", s)] + ["--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri]
    result = subprocess.run([str(ROOT / "dev.sh"), "run", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "baseline" in result.stdout and "best " in result.stdout
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("verdict: ") and "paired seeds" in lines[-1]  # the confirmation's verdict ends it
    assert "confirmation over 2 paired seeds (1-2)" in result.stdout and "optimism:" in result.stdout
    assert (tmp_path / "mlruns").is_dir()  # artifacts live beside the SQLite store
    assert PathConfig.load(next((tmp_path / "runs").glob("digits_tiny-*/best_path_config.yaml"))).depth == 2

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("digits_tiny").experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("pathsearch.kind") == "search"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    trials = [c for c in children if "pathsearch.role" not in c.data.tags]
    configs = [c for c in children if c.data.tags.get("pathsearch.role") == "confirmation"]
    seeds = [c for c in children if c.data.tags.get("pathsearch.role") == "confirmation_seed"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 3 and len(configs) == 2 and len(seeds) == 4
    assert all(r.info.status == "FINISHED" for r in children)
    assert all(len(client.get_metric_history(c.info.run_id, "val_acc")) == 3 for c in trials)
    assert not [t for t in trials if "test_acc" in t.data.metrics]  # search trials never read the test split

    out = tmp_path / "best.yaml"
    cmd = [sys.executable, "-m", "pathsearch.cli", "export", "--experiment", "digits_tiny", "--tracking-uri", uri]
    exported = subprocess.run(
        [*cmd, "--out", str(out), "--with-weights", "--seed", "2"], capture_output=True, text=True
    )
    assert exported.returncode == 0, exported.stderr
    assert "of seed 2" in exported.stdout
    winner = parents[0].data.tags["pathsearch.confirmed_run"]
    seed_run = next(
        r for r in seeds if r.data.tags["mlflow.parentRunId"] == winner and r.data.tags["pathsearch.seed"] == "2"
    )
    config = PathConfig.load(out)
    assert config.provenance["seed_run_id"] == seed_run.info.run_id and config.provenance["seeds"] == [1, 2]
    model = create_path_vit(path_config=config)
    model.load_state_dict(load_file(str(out.with_suffix(".safetensors"))))
    model.eval()
    split = load_digits_split(200, seed=0)
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(split.test, batch_size=256):
            correct += (model(x).argmax(-1) == y).sum().item()
    assert correct / len(split.test) == pytest.approx(seed_run.data.metrics["test_acc"], abs=1e-9)


def test_demo_verb_trains_and_analyses_paths(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "pathsearch.cli", "demo", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "ensemble as configured" in result.stdout
    analysis = json.loads((out / "path_analysis.json").read_text())
    assert [r["path"] for r in analysis["rows"]][:3] == ["embed", "attn.1", "mlp.1"]
    assert len(analysis["rows"]) == 13
    # Budget: 15 epochs of the default 1078-image training split, depth-6 dim-64 ViT; it reaches ~96% here.
    assert analysis["full_acc"] >= 0.9
    assert (out / "path_analysis.png").read_bytes()[:4] == b"\x89PNG"
    cfg = PathConfig.load(out / "path_config.yaml")
    assert cfg.model_name == "vit_tiny_patch16_224" and cfg.depth == 6
    assert yaml.safe_load((out / "path_config.yaml").read_text())["kept"][0] == "embed"


def test_bad_cli_input_exits_2_with_a_message(tmp_path):
    cmd = [sys.executable, "-m", "pathsearch.cli", "demo", "--epochs", "0", "--out", str(tmp_path / "x")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert "--epochs must be >= 1, got 0" in result.stderr
    assert not (tmp_path / "x").exists()


def test_help_lists_every_verb():
    result = subprocess.run([sys.executable, "-m", "pathsearch.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for verb in ("demo", "train", "validate", "search", "export", "ui"):
        assert verb in result.stdout


def test_ui_verb_serves_the_mlflow_ui_on_loopback(tmp_path):
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pathsearch.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        body = b""
        for _ in range(120):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        assert b"MLflow" in body or b"mlflow" in body
    finally:
        subprocess.run(["pkill", "-TERM", "-s", str(proc.pid)], check=False)
        proc.wait(timeout=30)
    assert f"http://127.0.0.1:{port}" in proc.stdout.read()


def test_ui_verb_points_at_a_tracking_server_instead_of_starting_one():
    proc = subprocess.run(
        [sys.executable, "-m", "pathsearch.cli", "ui", "--tracking-uri", "http://127.0.0.1:5999"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and "MLflow UI at http://127.0.0.1:5999 (the tracking server serves it)" in proc.stdout
