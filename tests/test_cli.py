"""The CLI end to end, driven exactly as the README does (`./dev.sh run ...`)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pathsearch import cli
from pathsearch.cli import build_parser
from pathsearch.config.paths import PathConfig

ROOT = Path(__file__).resolve().parents[1]


def test_readme_main_command_searches_confirms_and_exports_a_model_that_scores_its_logged_test_accuracy(tmp_path):
    """`./dev.sh run` exactly as the README gives it (made small with overrides, kept inside tmp_path): the search,
    then the confirmation, whose verdict ends the output; then `pathsearch export --with-weights --seed 2`: the
    exported model scores on the test split exactly the test accuracy logged for that seed.

    It starts from a weights file, as docs/own-data.md's worked example does: a timm ViT of the file's architecture,
    whose position embeddings (drawn at std 1.0, which no initialisation of timm's gives) every trial starts from;
    the file is gone before the export, which rebuilds the winner from its own checkpoint."""
    import timm
    import torch
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader

    from pathsearch.ensemble.model import create_path_vit
    from pathsearch.trial.data import load_digits_split

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=2,
                            num_heads=2, num_classes=10)  # fmt: skip
    torch.nn.init.normal_(vit.pos_embed, std=1.0)
    weights = tmp_path / "digits_vit.safetensors"
    save_file(vit.state_dict(), str(weights))
    small = ["train.epochs=3", "train.eval_every=1", "train.warmup_epochs=0", "data.train_size=200",
             "model.kwargs.depth=2", "search.num_samples=3", "search.scheduler=none", "space.model.pruned.high=3",
             "search.confirm.top_k=1", "search.confirm.seeds=2", "search.confirm.max_seeds=3",
             "search.confirm.step=1", "search.confirm.alpha=0.002", f"model.weights={weights}",
             "model.pos_embed_std=null"]  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [a for s in small for a in ("--set", s)] + ["--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri]
    result = subprocess.run([str(ROOT / "dev.sh"), "run", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "baseline" in result.stdout and "best " in result.stdout
    # a quiet console: pathsearch's lines only; Ray's and Optuna's own output is in the run directory's log
    assert result.stderr == "", result.stderr[-3000:]
    for noise in ("View detailed results", "Configuration for experiment", "tensorboard", "Warning", " INFO "):
        assert noise not in result.stdout, noise
    log = next((tmp_path / "runs").glob("digits_tiny-*/library_output.log")).read_text()
    assert "Started a local Ray instance" in log and "A new study created" in log  # Ray's and Optuna's lines
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("verdict: ") and "paired seeds" in lines[-1]  # the confirmation's verdict ends it
    # sequential, as the shipped file: 2 seeds at alpha 0.002 decide nothing (one degree of freedom: a boundary
    # over a thousand times the spread), so a second round adds seed 3
    assert "round 1: top 1" in result.stdout and "round 2: top 1" in result.stdout
    assert "confirmation over 3 paired seeds (1-3) in 2 rounds" in result.stdout and "optimism:" in result.stdout
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
    assert len(trials) == 3 and len(configs) == 2 and len(seeds) == 6
    assert all(r.info.status == "FINISHED" for r in children)
    assert all(len(client.get_metric_history(c.info.run_id, "val_acc")) == 3 for c in trials)
    assert not [t for t in trials if "test_acc" in t.data.metrics]  # search trials never read the test split

    weights.unlink()  # the export needs only the search's own checkpoints
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
    assert config.provenance["seed_run_id"] == seed_run.info.run_id and config.provenance["seeds"] == [1, 2, 3]
    model = create_path_vit(path_config=config)
    model.load_state_dict(load_file(str(out.with_suffix(".safetensors"))))
    model.eval()
    # trained from the file's position embeddings: 3 epochs of about 7 steps move them by a few hundredths
    assert (model.vit.pos_embed - vit.pos_embed).abs().max() < 0.25 and model.vit.pos_embed.std() > 0.5
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
    assert "--epochs: must be >= 1, got 0" in result.stderr
    assert not (tmp_path / "x").exists()


def parser_verbs() -> dict[str, argparse.ArgumentParser]:
    """Every verb the CLI's parser defines, with its subparser (read from the parser: a new verb is covered)."""
    (verbs,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(verbs.choices)


VERBS = parser_verbs()


def test_help_lists_every_verb():
    assert {"demo", "train", "validate", "search", "resume", "export", "ui"} <= set(VERBS)  # the parser was read
    result = subprocess.run([sys.executable, "-m", "pathsearch.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ") and line.split()}
    assert set(VERBS) <= listed, result.stdout


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_each_verbs_help_works_and_names_its_arguments(verb, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([verb, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pathsearch {verb}"), out
    flat = "".join(out.split())  # argparse wraps help text to the terminal width (at spaces and hyphens)
    for action in VERBS[verb]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        for name in action.option_strings or [action.metavar or action.dest]:  # --flags, or a positional's name
            assert name in out, f"pathsearch {verb} --help does not name {name}"
        if action.help and "%" not in action.help:
            assert "".join(action.help.split()) in flat, f"pathsearch {verb} --help lacks: {action.help}"


def test_ui_verb_points_at_a_tracking_server_instead_of_starting_one():
    proc = subprocess.run(
        [sys.executable, "-m", "pathsearch.cli", "ui", "--tracking-uri", "http://127.0.0.1:5999"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and "MLflow UI at http://127.0.0.1:5999 (the tracking server serves it)" in proc.stdout


# ----- --set, bad search files, one folder per run -------------------------------------------------------------
TINY_TRIAL = """\
# one trial only: no space section (pathsearch train needs none)
model:
  name: vit_tiny_patch16_224
  kwargs: {depth: 2, embed_dim: 32, num_heads: 2, patch_size: 2}
data: {name: synthetic, train_size: 64, val_size: 16}
train: {epochs: 1, warmup_epochs: 0}
"""


@pytest.mark.parametrize("verb", ["train", "validate", "search", "submit"])
def test_set_takes_several_overrides_after_one_flag(verb, capsys):
    from pathsearch.cli import build_parser

    parser = build_parser()
    args = parser.parse_args([verb, "f.yaml", "--set", "a=1", "b.c=x y", "--set", "d=3", "--set", "e=4"])
    assert args.file == "f.yaml" and args.set == ["a=1", "b.c=x y", "d=3", "e=4"]
    if verb in ("search", "submit"):  # the next option ends the list
        assert parser.parse_args([verb, "f.yaml", "--set", "a=1", "b=2", "--name", "n"]).name == "n"
    # after --set, a file would be read as one more override: refused, naming it (argparse exits 2)
    with pytest.raises(SystemExit) as info:
        parser.parse_args([verb, "--set", "a=1", "b=2", "f.yaml"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --set: expected KEY=VALUE, got 'f.yaml' (give a file before --set: FILE --set a=1 b=2)" in err


def test_several_overrides_after_one_set_reach_the_search_file():
    digits = ROOT / "search_spaces" / "digits_tiny.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "pathsearch.cli", "validate", str(digits),
         "--set", "search.num_samples=4", "train.epochs=2", "--set", "search.seed=3"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert (resolved["search"]["num_samples"], resolved["train"]["epochs"], resolved["search"]["seed"]) == (4, 2, 3)


def test_an_empty_or_spaceless_search_file_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Once an empty file validated (exit 0) and `search` ran a default search; a file without space searched
    nothing. Now each is one line naming the file and key, before anything is written."""
    from pathsearch import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "comments.yaml").write_text("# nothing yet\n")
    (tmp_path / "spaceless.yaml").write_text(TINY_TRIAL)
    before = sorted(p.name for p in tmp_path.iterdir())
    expected = {
        "empty.yaml": "empty.yaml: top level: expected a mapping of sections",
        "comments.yaml": "comments.yaml: top level: expected a mapping of sections",
        "spaceless.yaml": "spaceless.yaml: space: nothing to search (no entries), got None",
    }
    for name, message in expected.items():
        for verb in ("validate", "search", "submit"):
            extra = ["--storage-path", str(tmp_path / "runs")] if verb == "search" else []
            assert cli.main([verb, name, *extra]) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"pathsearch {verb}: error: {message}"), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, no mlflow.db


def _train(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "pathsearch.cli", "train", "tiny.yaml", "--no-progress", *args]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_train_runs_started_together_get_two_complete_folders(tmp_path):
    """Both runs start in one folder at once. Every default name of the next two minutes is taken already (another
    run's folder), so both must take a suffix: they once shared runs/train/<stem>-<second> and overwrote each other."""
    import time

    (tmp_path / "tiny.yaml").write_text(TINY_TRIAL)  # no space section: `train` accepts it
    taken = set()
    for seconds in range(120):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() + seconds))
        taken.add(tmp_path / "runs" / "train" / f"tiny-{stamp}")
    for folder in taken:
        folder.mkdir(parents=True, exist_ok=True)
    procs = [_train(tmp_path), _train(tmp_path)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    folders = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        checkpoint = tmp_path / next(line for line in out.splitlines() if line.startswith("checkpoint: "))[12:]
        assert checkpoint.name == "checkpoint_0001" and checkpoint.parent not in taken
        assert {p.name for p in checkpoint.parent.iterdir()} == {"checkpoint_0001"}  # nothing of the other run
        assert {"state.json", "model_0.safetensors", "path_config.yaml"} <= {p.name for p in checkpoint.iterdir()}
        folders.append(checkpoint.parent)
    assert folders[0] != folders[1]
    assert all(not any(folder.iterdir()) for folder in taken)  # the other runs' folders are untouched


def test_train_refuses_an_existing_out_folder_unless_it_resumes_the_run_in_it(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_TRIAL)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("another run's")
    out, err = _train(tmp_path, "--out", str(other)).communicate(timeout=600)
    assert err.strip().splitlines() == [
        f"pathsearch train: error: --out {other}: already exists; choose another --out, "
        "or --resume a checkpoint of the run in it"
    ]
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    run = tmp_path / "run"
    first = _train(tmp_path, "--out", str(run))
    assert first.wait(timeout=600) == 0, first.communicate()[1][-3000:]
    resumed = _train(tmp_path, "--out", str(run), "--resume", str(run / "checkpoint_0001"), "--set", "train.epochs=2")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "epoch   2/2" in out and (run / "checkpoint_0002" / "state.json").is_file()
