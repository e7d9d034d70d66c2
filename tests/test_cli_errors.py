"""Every verb's failure paths through the CLI's entry point: one line on stderr, the documented exit code (2 bad
input, 1 failure, 130 Ctrl-C), no traceback, nothing left behind. `main()` runs in this process (an exception it let
out would fail the test); two checks run the real command in a process of its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pathsearch.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "search_spaces" / "digits_tiny.yaml"
PATHSEARCH = [sys.executable, "-m", "pathsearch.cli"]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PATHSEARCH_MLFLOW_START_TIMEOUT_S": "2", **env}
    return subprocess.run([*PATHSEARCH, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environ)


def run_main(args: list[str], cwd: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """`pathsearch ARGS` through cli.main in this process; (exit code, stdout, stderr) at the file-descriptor level."""
    from pathsearch.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PATHSEARCH_MLFLOW_START_TIMEOUT_S", "2")
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "WARNING")  # what main() sets: restored after the test
    capfd.readouterr()
    code = main(args)
    out, err = capfd.readouterr()
    return code, out, err


def confirming_run_dir(tmp_path: Path, tracking_uri: str) -> Path:
    """A run directory `resume` accepts up to its tracking store: a search that was confirming (plan written)."""
    run_dir = tmp_path / "runs" / "stopped"
    run_dir.mkdir(parents=True)
    shutil.copy(DIGITS, run_dir / "search.yaml")
    state = {"name": "stopped", "tracking_uri": tracking_uri, "experiment_id": "1", "parent_run_id": "abc", "depth": 4}
    (run_dir / "pathsearch_state.json").write_text(json.dumps(state))
    (run_dir / "confirm_plan.json").write_text("{}")
    return run_dir


def cases(tmp_path: Path) -> dict[str, list[tuple[list[str], int, str]]]:
    """verb -> [(arguments, exit code, text the one line must contain)]."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    spaced = tmp_path / "my search.yaml"  # a run is named after its file: this name is no folder name
    spaced.write_text(DIGITS.read_text())
    down = f"http://127.0.0.1:{closed_port()}"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    dashboard = ["--address", down]
    return {
        "demo": [(["--epochs", "0"], 2, "--epochs: must be >= 1"), (["--seed", "-1"], 2, "--seed: must be 0 to 2**32")],
        "train": [
            (["missing.yaml"], 2, "missing.yaml: no such file"),
            ([str(DIGITS), "--set", "train.epochs=many"], 2, "train.epochs"),
        ],
        "validate": [([str(empty)], 2, "empty file"), ([str(DIGITS), "--set", "search.sampler=best"], 2, "sampler")],
        "search": [
            ([str(DIGITS), "--set", "train.bogus=1"], 2, "train.bogus: unknown key"),
            ([str(spaced)], 2, "without --name the run is named after the file, and 'my search' is not one folder"),
            ([str(DIGITS), "--tracking-uri", down], 2, f"no MLflow tracking server answers at {down}"),
            # a Ray head address where nothing listens: said at once (ray.init would retry for minutes)
            ([str(DIGITS), "--address", down.removeprefix("http://")], 2, "no Ray cluster answers there"),
        ],
        "resume": [
            ([str(tmp_path)], 2, "is not a pathsearch run directory"),
            ([str(confirming_run_dir(tmp_path, down))], 2, f"no MLflow tracking server answers at {down}"),
        ],
        "export": [(["--experiment", "nope", "--out", "x.yaml", "--tracking-uri", store], 2, "no MLflow experiment")],
        "fit-scales": [
            (["--run-id", "abc", "--file", "missing.yaml", "--tracking-uri", store], 2, "missing.yaml: no such file"),
            (["--run-id", "abc", "--tracking-uri", store], 2, "no MLflow run 'abc'"),
        ],
        "submit": [
            ([str(DIGITS)], 2, "no cluster given"),
            ([str(empty), *dashboard], 2, "empty file"),
        ],
        "status": [(["job1", *dashboard], 2, "no Ray dashboard")],
        "logs": [(["job1", *dashboard], 2, "no Ray dashboard")],
        "stop": [(["job1", *dashboard], 2, "no Ray dashboard")],
        "ui": [(["--tracking-uri", "bogus://store", "--port", str(closed_port())], 2, "bogus://store")],
        # (what the check finds on a cluster is its report, exit 1: tests/test_cluster.py, tests/test_autoscaling.py)
        "cluster": [(["check", down, "--storage-path", "s3://bucket/runs?secret_key=x"], 2, "credentials in the URI")],
    }


VERBS = sorted(next(a for a in build_parser()._actions if a.dest == "verb").choices)  # type: ignore[arg-type]


def test_every_verb_has_failure_cases(tmp_path):
    assert set(VERBS) == set(cases(tmp_path)), "give each verb its failure cases here"


@pytest.mark.parametrize("verb", VERBS)
def test_a_failing_verb_says_one_line_and_exits_with_its_code(verb, tmp_path, capfd, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    for args, code, text in cases(tmp_path)[verb]:
        started = time.monotonic()
        returned, out, err = run_main([verb, *args], work, capfd, monkeypatch)
        lines = [line for line in err.splitlines() if line.strip()]
        assert returned == code, (args, out[-2000:], err[-3000:])
        assert "Traceback" not in err + out, err[-3000:]
        # one line; a store that does not answer is first announced while it is waited for (it may be starting)
        waiting = [line for line in lines[:-1] if "unreachable while" in line and "retrying for up to" in line]
        assert len(lines) - len(waiting) == 1, lines
        assert lines[-1].startswith(f"pathsearch {verb}: ") and text in lines[-1], lines
        assert time.monotonic() - started < 60, f"{verb} {args} took {time.monotonic() - started:.0f} s to fail"
    assert not (work / "runs").exists() or not any((work / "runs").rglob("search.yaml"))  # nothing half-made


def test_the_real_command_fails_in_one_line_without_a_traceback(tmp_path):
    result = run_cli(["search", str(DIGITS), "--set", "search.sampler=best", "train.bogus=1"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()  # one line per problem, each naming its key
    assert len(lines) == 2 and all(line.startswith("pathsearch search: error: ") for line in lines), lines
    assert "search.sampler" in "".join(lines) and "train.bogus" in "".join(lines)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_usage_errors_are_one_line_and_exit_2(capfd):
    """argparse's own refusals (a missing argument, an unknown flag or verb, a value of the wrong type) are one line
    and exit 2, as all bad input is; argparse printed its usage text first, on lines of their own."""
    from pathsearch.cli import main

    cases = [
        ([], "pathsearch: error: the following arguments are required: verb"),
        (["validate"], "pathsearch validate: error: the following arguments are required: file"),
        (["validate", "f.yaml", "--bogus"], "pathsearch: error: unrecognized arguments: --bogus"),
        (["demo", "--epochs", "many"], "pathsearch demo: error: argument --epochs: invalid int value: 'many'"),
        (["nosuchverb"], "pathsearch: error: argument verb: invalid choice: 'nosuchverb'"),
    ]
    for args, says in cases:
        capfd.readouterr()
        with pytest.raises(SystemExit) as info:
            main(args)
        out, err = capfd.readouterr()
        assert info.value.code == 2 and not out and err.count("\n") == 1 and err.startswith(says), (args, err)


def test_ctrl_c_during_training_exits_130_with_one_line(tmp_path):
    cfg = yaml.safe_load(DIGITS.read_text())
    cfg["train"]["epochs"] = 500
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # SIGINT as a terminal sends it, even where this test runs in the background of a shell (which starts it
    # ignored, and Python then leaves it ignored)
    proc = subprocess.Popen([*PATHSEARCH, "train", str(path), "--no-progress"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the first epoch's line: training is under way
        assert first.startswith("epoch"), first
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines() == ["pathsearch train: interrupted"]
