"""The CLI end to end, driven exactly as the README does (`./dev.sh run ...`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from pathsearch.paths import PathConfig

ROOT = Path(__file__).resolve().parents[1]


def test_readme_main_command_runs_the_search(tmp_path):
    # `./dev.sh run` exactly as the README gives it, made small with overrides and kept inside tmp_path.
    small = ["train.epochs=2", "train.eval_every=1", "data.train_size=100", "model.kwargs.depth=2",
             "search.num_samples=2", "space.model.pruned.high=2", "search.confirm.top_k=1",
             "search.confirm.seeds=2"]  # fmt: skip
    args = [a for s in small for a in ("--set", s)]
    args += ["--storage-path", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    result = subprocess.run([str(ROOT / "dev.sh"), "run", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "baseline" in result.stdout and "best " in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("verdict: ")  # the confirmation's verdict ends it
    assert (tmp_path / "mlruns").is_dir()  # artifacts live beside the SQLite store
    best = next((tmp_path / "runs").glob("digits_tiny-*/best_path_config.yaml"))
    assert PathConfig.load(best).depth == 2


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
