"""Every mistake in a search file or a flag is caught before anything runs: exit 2, one line per problem naming the
file (or the flag), the key and the value, no traceback, and nothing written (no run folder, no MLflow store). Each
case below was accepted, or failed late, or failed with a library's message, before pathsearch.preflight and the
flag checks; a generated family of malformed files and flags (hypothesis) follows, then Ctrl-C and stalls."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pathsearch.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "search_spaces" / "digits_tiny.yaml"
PATHSEARCH = [sys.executable, "-m", "pathsearch.cli"]


def run_main(args: list[str], cwd: Path, capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`pathsearch ARGS` through cli.main in this process, in `cwd`; (exit code, stdout, stderr)."""
    before = Path.cwd()
    os.chdir(cwd)
    capfd.readouterr()
    try:
        code = main(args)
    finally:
        os.chdir(before)
    out, err = capfd.readouterr()
    return code, out, err


def refused(args: list[str], cwd: Path, capfd: pytest.CaptureFixture[str]) -> list[str]:
    """Runs a verb that must refuse its input; returns its error lines, having checked the promise: exit 2, only
    `pathsearch VERB: error: ...` lines on stderr, no traceback, nothing new in `cwd`."""
    present = set(cwd.rglob("*"))
    code, out, err = run_main(args, cwd, capfd)
    lines = err.splitlines()
    assert code == 2, (args, out[-2000:], err[-3000:])
    assert "Traceback" not in out + err
    assert lines and all(line.startswith(f"pathsearch {args[0]}: error: ") for line in lines), lines
    assert set(cwd.rglob("*")) == present, f"{args} left {sorted(set(cwd.rglob('*')) - present)}"
    return [line.split(": error: ", 1)[1] for line in lines]


# (case, --set overrides of digits_tiny.yaml, what the one line must say). Before: each was accepted by `validate`,
# and `search` failed after writing its run folder and MLflow runs, or trained something other than asked.
FILE_CASES = {
    "heads that do not divide the width": (["model.kwargs.num_heads=3"], ["model.kwargs:", "'num_heads': 3"]),
    "3 channels on 1-channel data": (["model.kwargs.in_chans=3"], ["model.kwargs.in_chans:", "1 x 8 x 8", "got 3"]),
    "5 classes on 10": (["model.kwargs.num_classes=5"], ["model.kwargs.num_classes:", "10 classes", "got 5"]),
    "a patch that does not divide the image": (["model.kwargs.patch_size=3"], ["model.kwargs.patch_size:", "got 3"]),
    "an infinite weight decay": (["train.weight_decay=.inf"], ["train.weight_decay:", "finite", "got inf"]),
    "an optimiser timm lacks": (["train.opt=sgdd"], ["train.opt:", "did you mean 'sgd'", "got 'sgdd'"]),
    "a condition on a key that does not exist": (
        ["space.train.warmup_epochs={low: 0, high: 3, when: {train.optt: adamw}}"],
        ["space.train.warmup_epochs.when.train.optt:", "'train.opt'", "got 'adamw'"],
    ),
    "a condition that never holds": (
        ["space.train.warmup_epochs={low: 0, high: 3, when: {model.distill.alpha: 0.7}}"],
        ["space.train.warmup_epochs.when.model.distill.alpha:", "never holds", "got 0.7"],
    ),
    "more to confirm than trials": (["search.confirm.top_k=10"], ["search.confirm.top_k:", "at most 9", "got 10"]),
    "a misspelt resource": (["search.resources_per_trial={cpus: 1}"], ["resources_per_trial.cpus:", "'cpu'"]),
    "a negative search seed": (["search.seed=-1"], ["search.seed:", "got -1"]),
    "an unknown path": (['model.pruned=["atn.2"]'], ["model.pruned:", "'atn.2'", "did you mean 'attn.2'"]),
    "a space value timm cannot build": (
        ["space.model.kwargs.num_heads={choices: [2, 3]}"],
        ["space.model.kwargs.num_heads:", "value 3", "divisible"],
    ),
    "a corner of the space timm cannot build": (  # each value alone builds; 66 wide with 4 heads does not
        ["space.model.kwargs.embed_dim={choices: [64, 66]}", "space.model.kwargs.num_heads={choices: [2, 4]}"],
        ["space: the point", "model.kwargs.embed_dim=66", "model.kwargs.num_heads=4"],
    ),
    "a tracking URI MLflow cannot open": (["tracking.tracking_uri=bogus://x"], ["tracking.tracking_uri:", "bogus://x"]),
    "augmentation of tensor data": (["data.auto_augment=rand-m9"], ["data.auto_augment:", "got 'rand-m9'"]),
    "a misspelt timm model": (  # before: "unknown timm model 'vit_tiny_patch16'", no way to the right name
        ["model.name=vit_tiny_patch16"],
        ["model.name: unknown timm model", "'vit_tiny_patch16_224'", "got 'vit_tiny_patch16'"],
    ),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_a_mistake_in_the_file_is_one_line_from_validate_and_the_same_from_search(case, tmp_path, capfd):
    overrides, says = FILE_CASES[case]
    sets = [item for o in overrides for item in ("--set", o)]
    said = refused(["validate", str(DIGITS), *sets], tmp_path, capfd)
    assert len(said) == 1 and all(text in said[0] for text in says), said
    assert said[0].startswith(f"{DIGITS}: ")  # the file, then the key
    assert refused(["search", str(DIGITS), *sets], tmp_path, capfd) == said  # nothing written: no folder, no store
    if not any(o.startswith(("search.", "space.", "tracking.")) for o in overrides):
        trained = refused(["train", str(DIGITS), *sets], tmp_path, capfd)  # the trial's own problems, for one trial
        assert len(trained) == 1 and all(text in trained[0] for text in says), trained


# (case, search file, --set overrides, what the one line must say): trials split over workers (a Ray Train worker
# group), each mistake alone. digits_tiny.yaml trains batches of 32 without mixup.
GROUP = "search.resources_per_trial={cpu: 1, workers: %s}"
WORKER_CASES = {
    "no workers": (DIGITS, [GROUP % 0], ["search.resources_per_trial.workers:", "whole number >= 1", "got 0"]),
    "half a worker": (DIGITS, [GROUP % 2.5], ["search.resources_per_trial.workers:", "whole number", "got 2.5"]),
    "workers in quotes": (DIGITS, [GROUP % "'2'"], ["search.resources_per_trial.workers:", "not 2.0 or '2'"]),
    "workers true": (DIGITS, [GROUP % "true"], ["search.resources_per_trial.workers:", "got True"]),
    "a GPU shared by workers": (
        DIGITS,
        ["search.resources_per_trial={cpu: 1, gpu: 0.5, workers: 2}"],
        ["search.resources_per_trial.gpu:", "one worker per whole GPU", "got 0.5"],
    ),
    "a two_stage search over workers": (
        DIGITS.with_name("digits_two_stage.yaml"),
        [GROUP % 2],
        ["search.resources_per_trial.workers:", "train in one process", "got 2"],
    ),
    "fewer images than workers": (DIGITS, [GROUP % 64], ["data.batch_size:", "64 workers", "multiple of 64", "got 32"]),
    "a batch the workers do not divide": (DIGITS, [GROUP % 3], ["data.batch_size:", "multiple of 3", "got 32"]),
    "an odd mixup batch on a worker": (
        DIGITS,
        [GROUP % 2, "data.batch_size=30", "data.mixup=0.8"],
        ["data.batch_size:", "even batch on each worker", "multiple of 4", "got 30"],
    ),
    "a searched batch the workers do not divide": (
        DIGITS,
        [GROUP % 2, "space.data.batch_size={choices: [32, 33]}"],
        ["space.data.batch_size:", "multiple of 2", "got 33"],
    ),
}


@pytest.mark.parametrize("case", sorted(WORKER_CASES))
def test_a_worker_group_mistake_is_one_line_from_validate_and_the_same_from_search(case, tmp_path, capfd):
    path, overrides, says = WORKER_CASES[case]
    sets = [item for o in overrides for item in ("--set", o)]
    said = refused(["validate", str(path), *sets], tmp_path, capfd)
    assert len(said) == 1 and said[0].startswith(f"{path}: ") and all(text in said[0] for text in says), said
    assert refused(["search", str(path), *sets], tmp_path, capfd) == said  # nothing written: no folder, no store


def test_every_problem_of_a_file_is_listed(tmp_path, capfd):
    """Problems of the search section and problems only the built model shows are listed together, one each."""
    sets = ["model.kwargs.patch_size=3", "train.opt=sgdd", "search.seed=-1", "search.resources_per_trial={cpus: 1}"]
    said = refused(["validate", str(DIGITS), *(x for s in sets for x in ("--set", s))], tmp_path, capfd)
    keys = sorted(line.split(": ")[1] for line in said)
    assert keys == ["model.kwargs.patch_size", "search.resources_per_trial.cpus", "search.seed", "train.opt"], said


def test_a_problem_of_each_stage_is_listed_in_one_run(tmp_path, capfd):
    """A schema problem (an unknown search key), a space problem (a value only a probe of the space finds), a model
    problem (one only the model built on the meta device shows) and a data problem: one line each, in one run.
    Before, a problem of one stage hid the later stages: the trial's data problem kept the model from being built,
    and any problem kept the space from being probed."""
    sets = ["search.samplr=tpe", "space.data.batch_size={choices: [0, 32]}", "model.kwargs.num_heads=3",
            "data.train_size=2000"]  # fmt: skip
    said = refused(["validate", str(DIGITS), *(x for s in sets for x in ("--set", s))], tmp_path, capfd)
    by_key = {line.split(": ")[1]: line for line in said}
    assert sorted(by_key) == ["data.train_size", "model.kwargs", "search.samplr", "space.data.batch_size"], said
    assert "'num_heads': 3" in by_key["model.kwargs"] and "value 0 is invalid" in by_key["space.data.batch_size"]


def test_yaml_mistakes_say_file_line_and_column_in_one_line(tmp_path, capfd):
    text = DIGITS.read_text()
    cases = {
        "twice.yaml": (text + "train:\n  epochs: 1\n", f":{text.count(chr(10)) + 1}:1: ", "'train' appears twice"),
        "syntax.yaml": ("model:\n  name: [vit\n  depth: 2\n", ":3:8: ", "expected ',' or ']'"),
        "tabs.yaml": ("model:\n\tname: vit\n", ":2:1: ", "cannot start any token"),
        "binary.yaml": (b"\x89PNG\r\n\x1a\n\x00\x00", ": not a text file", "0x89"),
    }
    for name, (content, where, what) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        work = tmp_path / f"work-{name}"
        work.mkdir()
        for verb in ("validate", "search", "train"):
            said = refused([verb, str(path)], work, capfd)
            assert len(said) == 1 and said[0].startswith(str(path) + where) and what in said[0], (name, said)
    said = refused(["validate", str(tmp_path)], tmp_path / "work-twice.yaml", capfd)
    assert said == [f"{tmp_path}: is a folder, not a search file"]


def test_an_unreadable_file_is_bad_input_not_a_crash(tmp_path):
    """A file the user may not read (root reads anything: the command runs without the capabilities that let it):
    exit 2, one line naming the file. Before: a PermissionError, exit 1."""
    secret = tmp_path / "secret.yaml"
    secret.write_text(DIGITS.read_text())
    secret.chmod(0o000)
    drop = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root reads any file, and setpriv (util-linux) is not here to drop that")
        caps = "-dac_override,-dac_read_search"
        drop = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]
    result = subprocess.run([*drop, *PATHSEARCH, "validate", str(secret)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)  # fmt: skip
    secret.chmod(0o600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip() == f"pathsearch validate: error: {secret}: cannot be read: Permission denied"


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flags_are_checked_before_any_store_is_read_or_anything_written(tmp_path, capfd):
    """Each flag's problem is said before the verb contacts a store: the tracking server named here does not
    answer, and waiting for it would have been the first thing these verbs did."""
    down = f"http://127.0.0.1:{closed_port()}"
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    (tmp_path / "out").mkdir()
    cases = [
        (["search", str(DIGITS), "--name", ""], "--name ''"),
        (["search", str(DIGITS), "--name", "a/b"], "--name 'a/b'"),
        (["search", str(DIGITS), "--storage-path", str(a_file)], f"--storage-path {a_file}: is a file"),
        (["search", str(DIGITS), "--storage-path", str(a_file / "runs")], f"is under {a_file}, a file"),
        (["search", str(DIGITS), "--tracking-uri", "bogus://x"], "--tracking-uri bogus://x: not a tracking URI"),
        (["search", str(DIGITS), "--tracking-uri", f"sqlite:///{tmp_path}/no/such/m.db"], "does not exist"),
        (["export", "--experiment", "e", "--out", "out", "--tracking-uri", down], "--out: is a folder"),
        (["export", "--experiment", "e", "--out", "best.txt", "--tracking-uri", down], "--out: must end in .yaml"),
        (["fit-scales", "--run-id", "a" * 32, "--fit-fraction", "1.5", "--tracking-uri", down], "--fit-fraction"),
        (["fit-scales", "--run-id", "a" * 32, "--fit-fraction", "nan", "--tracking-uri", down], "--fit-fraction"),
        (["fit-scales", "--run-id", "a" * 32, "--steps", "0", "--tracking-uri", down], "--steps: must be >= 1"),
        (["fit-scales", "--run-id", "a b", "--tracking-uri", down], "--run-id: is not an MLflow run id"),
        (["ui", "--port", "70000", "--tracking-uri", down], "--port: must be a port number"),
        (["train", str(DIGITS), "--out", str(a_file)], "--out: is a file"),
        (["train", str(DIGITS), "--resume", str(tmp_path / "nope")], "--resume: does not exist"),
    ]
    for args, says in cases:
        started = time.monotonic()
        said = refused(args, tmp_path, capfd)
        assert len(said) == 1 and says in said[0], (args, said)
        assert time.monotonic() - started < 20, args  # before the 2 s-per-try wait for a server that is not there


def test_export_refuses_a_run_of_another_experiment(tmp_path, capfd):
    """--run-id of a search in experiment B with --experiment A: the file would say A; refused, nothing written."""
    from pathsearch.tracking.runs import SearchRuns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    SearchRuns.start(uri, "A", "search-a", {})
    b = SearchRuns.start(uri, "B", "search-b", {})
    said = refused(["export", "--experiment", "A", "--run-id", b.parent_run_id, "--out", "best.yaml",
                    "--tracking-uri", uri], tmp_path, capfd)  # fmt: skip
    assert len(said) == 1 and "belongs to another experiment than --experiment 'A'" in said[0], said


# ---- generated malformed input ----------------------------------------------------------------------------------

BASE = yaml.safe_load(DIGITS.read_text())
MORE_KEYS = ["model.kwargs.depth", "model.kwargs.embed_dim", "search.confirm.seeds", "space.train.lr", "tracking.uri"]
KEYS = [*(f"{section}.{key}" for section in ("model", "data", "train", "search") for key in BASE[section]), *MORE_KEYS]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-2, 20), max_size=3),
    st.dictionaries(st.sampled_from(["low", "high", "choices", "when", "cpu", "x"]), st.integers(-1, 5), max_size=2),
)


def mutate(data: dict, key: str, value: object) -> dict:
    copy = json.loads(json.dumps(data, default=str))
    node = copy
    parts = key.split(".", 1) if key.startswith("space.") else key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {}) if isinstance(node.get(part), dict) or part not in node else {}
    node[parts[-1]] = value
    return copy


FLAGS = [[], ["--name", ""], ["--name", "x/y"], ["--tracking-uri", "ftp://h"], ["--storage-path", "gen.yaml"]]


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    edits=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3),
    cut=st.one_of(st.none(), st.integers(0, 2000)),
    junk=st.one_of(st.none(), st.text(max_size=6)),
    flags=st.sampled_from(FLAGS),
)
def test_generated_malformed_files_and_flags_exit_0_or_2_in_lines_and_write_nothing(
    edits, cut, junk, flags, tmp_path_factory, capfd
):
    """`validate` on a mutated, maybe truncated or garbled, search file: exit 0 or 2, never 1, no traceback, one
    `error:` line per problem (none twice). Where it or the flags are refused, `search` exits 2 as well and writes
    nothing; a file and flags both valid would start a real search, which other tests run."""
    work = tmp_path_factory.mktemp("gen")
    data = BASE
    for key, value in edits:
        data = mutate(data, key, value)
    text = yaml.safe_dump(data, sort_keys=False)
    if cut is not None:
        text = text[:cut]
    if junk is not None:
        text = text + junk
    path = work / "gen.yaml"
    path.write_text(text)
    code, out, err = run_main(["validate", str(path)], work, capfd)
    assert code in (0, 2), (text, err[-3000:])
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert all(line.startswith("pathsearch validate: error: ") for line in lines), lines
    assert len(lines) == len(set(lines)), lines
    if code == 2 or flags:
        said = refused(["search", str(path), *flags], work, capfd)
        assert len(said) == len(set(said)), said


# ---- Ctrl-C and stalls ------------------------------------------------------------------------------------------


def test_a_search_no_node_can_hold_says_so_and_exits_2_leaving_nothing(tmp_path):
    """A trial whose workers ask 64 CPUs each of this machine's Ray: Tune would keep it pending for ever; pathsearch
    says why and exits 2 at once, with no run folder and no MLflow store. (One process asking 64 CPUs is the same
    check: tests/test_autoscaling.py runs it against node types, the unit tests below against nodes.)"""
    sets = ["--set", "search.resources_per_trial={cpu: 64, workers: 2}"]
    result = subprocess.run([*PATHSEARCH, "search", str(DIGITS), *sets],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "search.resources_per_trial: no node of this machine's Ray can hold" in lines[0]
    assert "CPU 64 (the most any node has: " in lines[0] and "for each of its 2 workers" in lines[0], lines
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_ctrl_c_before_any_trial_reported_stops_the_search_with_130_and_a_resume_hint(tmp_path):
    """Each trial takes both CPUs, so while the first starts the others wait (Tune: PENDING), and no trial has a
    result yet. Ctrl-C then stopped Tune, which returns as a finished run does, and the search went on into its
    confirmation (whose trials waited in their turn); now it stops with exit 130 and says how to resume."""
    sets = ["search.resources_per_trial={cpu: 2}", "search.num_samples=4", "train.epochs=30", "search.scheduler=none"]
    args = [*PATHSEARCH, "search", str(DIGITS), "--name", "stopped", *(x for s in sets for x in ("--set", s))]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    run_dir = tmp_path / "runs" / "search" / "stopped"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and not any(run_dir.glob("train_trial_*")):
            time.sleep(0.1)  # Tune has made its first trial (its folder): the trial's process is starting
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "Tune made no trial"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        subprocess.run(["pkill", "-9", "-s", str(proc.pid)], check=False)
    assert proc.returncode == 130, (out[-3000:], err[-3000:])
    assert f"pathsearch resume {run_dir}" in out + err
    assert not (run_dir / "confirm_plan.json").exists()  # it did not go on into the confirmation
    assert "Traceback" not in out + err


def test_a_trial_is_placeable_only_on_one_node_holding_all_it_asks():
    """The cluster side of the stall check: resources of different nodes do not add up for one trial, a custom
    resource no node declares is named, and Ray's names (CPU, GPU) are what resources_per_trial's cpu and gpu mean."""
    from pathsearch.cluster.placement import unplaceable

    nodes = [{"CPU": 4.0, "memory": 8e9}, {"CPU": 2.0, "GPU": 1.0}]
    assert unplaceable({"cpu": 2, "gpu": 0.5}, nodes) is None
    assert unplaceable({"cpu": 4, "memory": 4e9}, nodes) is None
    assert unplaceable({"cpu": 4, "gpu": 1}, nodes) == (
        "it asks CPU 4 (the most any node has: 4), GPU 1 (the most any node has: 1)"
    )  # each node has one of them: no node has both
    assert "fast_disk 1 (the most any node has: 0)" in unplaceable({"cpu": 1, "fast_disk": 1}, nodes)
    assert unplaceable({"cpu": 1}, []) == "it asks CPU 1 (the most any node has: 0)"


def test_a_worker_group_is_placeable_where_some_node_holds_a_worker_and_the_nodes_hold_the_group():
    """A trial of N workers: N bundles of the per-worker shape and the Tune trial's token CPU. Ray's PACK and SPREAD
    are best effort, so the group may span nodes; the token needs CPU left on some node. An autoscaler's node types
    (repeat) may each be started again and again."""
    from pathsearch.cluster.placement import unplaceable

    group = {"cpu": 8, "gpu": 1, "workers": 3}
    two_of_three = [{"CPU": 48.0, "GPU": 2.0}]
    assert "the nodes together hold 2 of those workers" in unplaceable(group, two_of_three)
    assert unplaceable(group, [*two_of_three, {"CPU": 8.0, "GPU": 1.0}]) is None  # the third on another node
    exact = [{"CPU": 24.0, "GPU": 3.0}]  # the three workers, and no CPU left for the trial itself
    assert unplaceable(group, exact).endswith(
        "the nodes together hold 3 of those workers, and no CPU for the trial itself"
    )
    assert unplaceable(group, [*exact, {"CPU": 1.0}]) is None  # the token on the CPU node
    assert unplaceable(group, exact, repeat=True) is None  # a node type: a second node of it takes the token
    assert unplaceable(group, [{"CPU": 4.0, "GPU": 4.0}] * 8) == (
        "it asks CPU 8 (the most any node has: 4), GPU 1 (the most any node has: 4) for each of its 3 workers"
    )  # no node holds one worker, whatever their total
    assert unplaceable(group, [{"CPU": 4.0, "GPU": 4.0}], repeat=True).startswith("it asks CPU 8")
    assert unplaceable({"cpu": 8, "gpu": 1, "workers": 1}, exact) is None  # one process: no token


def test_the_autoscaler_is_asked_for_every_worker_of_a_trial_and_the_trials_token():
    """A trial of N workers asks N bundles and the token; as many trials as max_concurrent_trials, and one when it is
    unset (Tune sees only the tokens: it would start every trial at once)."""
    from pathsearch.config import load_search_file
    from pathsearch.search.driver import demand_of

    group = "search.resources_per_trial={cpu: 2, gpu: 1, workers: 4}"
    capped = demand_of(load_search_file(DIGITS, [group, "search.max_concurrent_trials=2"]), "x")
    assert capped.bundles == ([{"CPU": 0.01}] + [{"CPU": 2.0, "GPU": 1.0}] * 4) * 2
    assert str(capped) == "2 trials of 4 workers of {CPU: 2, GPU: 1}"
    unset = demand_of(load_search_file(DIGITS, [group, "search.max_concurrent_trials=null"]), "x")
    assert unset.bundles == [{"CPU": 0.01}] + [{"CPU": 2.0, "GPU": 1.0}] * 4


def test_the_autoscaler_is_asked_for_the_trials_a_search_runs_at_once_and_its_supernet():
    """What a search asks a cluster's autoscaler for: max_concurrent_trials trials' bundles (all num_samples when it
    is unset, never more), and a two_stage search's supernet trial with its own CPUs."""
    from pathsearch.config import load_search_file
    from pathsearch.search.driver import demand_of

    root = Path(__file__).resolve().parents[1] / "search_spaces"
    two = demand_of(load_search_file(root / "digits_two_stage.yaml"), "two")
    assert two.bundles == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 2.0}]  # 2 trials at once, then the supernet (cpu 2)
    assert str(two) == "2 trials of {CPU: 1} and 1 of {CPU: 2}"
    unset = load_search_file(root / "digits_tiny.yaml", ["search.max_concurrent_trials=null", "search.num_samples=3",
                                                          "search.resources_per_trial={cpu: 2, gpu: 0.5}"])  # fmt: skip
    assert demand_of(unset, "x").bundles == [{"CPU": 2.0, "GPU": 0.5}] * 3
    capped = load_search_file(root / "digits_tiny.yaml", ["search.max_concurrent_trials=8", "search.num_samples=3"])
    assert demand_of(capped, "x").concurrent == 3
