"""Every way out of a stage goes through one rule: a fault-injection matrix over SearchRun's stage boundaries.

For each strategy (`full`: search then a fixed confirmation; `two_stage`: supernet, proxy Ray task, confirmation;
`sequential`: full with a confirmation of two rounds) and each storage (a local run folder; an S3 bucket on moto's
server), an exception (RuntimeError) or a Ctrl-C (KeyboardInterrupt) is raised as a stage is entered or after it
returns ("enter NAME" / "exit NAME"; also around `finish`), by wrapping `SearchRun.stage` / `SearchRun.finish`:
no product hook. Then `resume_search` must finish the search (or refuse, saying why, when the fault came before
Tune's first snapshot of the search stage), nothing may stay RUNNING in MLflow, the parent must end KILLED (Ctrl-C)
or FAILED (exception) and then FINISHED, a run kept in S3 resumes from the store alone (a fresh working copy), and
no trial is trained twice (the toy's markers) or logged twice (one MLflow run per Tune trial id).
Plus, per strategy, a kill -9 of a driver process at one boundary, resumed by a fresh process.

Everything runs on one local Ray per module (on 127.0.0.1, the store's environment set before it starts so that its
workers inherit it) and one SQLite MLflow store (an experiment per case). The two-stage strategy's proxy step runs a
torch-free toy with `proxy_search`'s contract, swapped in by its module-level name in oneshot.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).parent))
import toy_search
from test_search import resume_toy_search

ray.cloudpickle.register_pickle_by_value(toy_search)  # workers need not import the tests folder
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the toy proxy and the knobbed trainable, too
toy_trial = toy_search.toy_trial

EPOCHS = 1
KNOBS = {"means": [0.80, 0.805, 0.80, 0.80], "sd": 0.01, "shared_sd": 0.02}  # test_confirm's undecided setting
HAS_MOTO = shutil.which("moto_server", path=str(Path(sys.executable).parent)) is not None

# strategy -> the boundaries a fault is injected at ("enter"/"exit" a stage of that name, or `finish`)
BOUNDARIES = {
    "full": ["enter search", "exit search", "enter confirm", "exit confirm", "enter finish", "exit finish"],
    "two_stage": ["enter supernet", "exit supernet", "enter confirm", "exit confirm", "enter finish", "exit finish"],
    "sequential": [
        "enter search", "exit search", "enter confirm", "exit confirm",
        "enter confirm-round2", "exit confirm-round2", "enter finish", "exit finish",
    ],
}  # fmt: skip
FAULTS = ["error", "ctrl-c"]
STORAGES = ["local", "s3"]
# The whole matrix (80 fault cases and 3 kills, about 12 minutes on 2 idle cores, 21 under load) runs with
# PATHSEARCH_FAULT_MATRIX=all; the suite runs one case of each strategy and fault at a boundary of its own, one in the
# store and one kill (about a minute), which a change that breaks the rule for a stage, a fault or the store fails
ALL = os.environ.get("PATHSEARCH_FAULT_MATRIX") == "all"
SUITE = {
    ("full", "exit search", "error", "local"),
    ("full", "enter confirm", "ctrl-c", "local"),
    ("two_stage", "exit supernet", "ctrl-c", "local"),
    ("two_stage", "exit confirm", "error", "local"),
    ("sequential", "enter confirm-round2", "error", "local"),
    ("sequential", "exit confirm", "ctrl-c", "s3"),
}
CASES = [
    pytest.param(
        strategy, boundary, fault, storage,
        id=f"{strategy}-{boundary.replace(' ', '_')}-{fault}-{storage}",
        marks=[pytest.mark.skipif(storage == "s3" and not HAS_MOTO, reason="needs moto[server] (the dev extra)")],
    )
    for strategy, boundaries in BOUNDARIES.items()
    for boundary in boundaries
    for fault in FAULTS
    for storage in STORAGES
    if ALL or (strategy, boundary, fault, storage) in SUITE
]  # fmt: skip
KILL_AT = {"full": "enter confirm", "two_stage": "exit supernet", "sequential": "enter confirm-round2"}


# ----- the toys ------------------------------------------------------------------------------------------------
def knobbed(knobs: dict[str, Any]) -> Any:
    """toy_trial with `knobs` (marker_dir, ...) whatever the search file holds: a resumed search's file has no toy
    knobs, and the shared Ray's workers never saw a PATHSEARCH_TOY of the case. (Same name on every call: Tune
    restores a stage with a trainable of the name it saved.)"""

    def toy_fault_trial(config: dict, base: dict) -> None:
        toy_trial(config, {**base, "train": {**base["train"], "toy": dict(knobs)}})

    return toy_fault_trial


def toy_proxy_search(
    checkpoint_dir: str,
    space: Any,
    base: dict[str, Any],
    points: Any = (),
    metric: str = "val_acc",
    mode: str = "max",
    trials: int = 20000,
    sampler: str = "random",
    batch: int = 256,
    top_k: int = 4,
    seed: int = 0,
    base_pruned: Any = (),
    base_init: Any = 1.0,
    max_kept_paths: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """`proxysearch.proxy_search`'s contract without torch: Optuna samples the space (`points` first) and each
    configuration scores 0.5 + 0.04 per pruned path (the clean toy's truth). Reads the supernet's checkpoint (from
    the store, for a run kept there): a proxy step that cannot reach it fails as the real one would."""
    import optuna
    from optuna.trial import TrialState

    from pathsearch import storage
    from pathsearch.config.paths import PathConfig, path_names
    from pathsearch.config.space import sample_overrides
    from pathsearch.search.proxysearch import rank_rows

    with storage.local_folder(checkpoint_dir) as folder:
        assert json.loads((Path(folder) / "toy.json").read_text())["epoch"] >= 1
    names = path_names(space.depth)
    direction = "maximize" if mode == "max" else "minimize"
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.RandomSampler(seed=seed))
    for point in points:
        study.enqueue_trial(dict(point))
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        overrides = sample_overrides(trial, space, base)
        pruned = list(overrides.get("model.pruned", base_pruned))
        acc = 0.5 + 0.04 * len(pruned)
        study.tell(trial, acc if metric == "val_acc" else 1.0 - acc, state=TrialState.COMPLETE)
        rows.append({
            "number": trial.number, "params": dict(trial.params), "overrides": overrides,
            "key": json.dumps(overrides, sort_keys=True), "kept_paths": len(names) - len(pruned),
            "state": "COMPLETE", "proxy_val_acc": acc, "proxy_val_loss": 1.0 - acc,
        })  # fmt: skip
    ranked = rank_rows(rows, metric, mode)
    point_rows = [r for r in rows[: len(points)] if r["state"] == "COMPLETE"]
    taken = {r["key"] for r in point_rows}
    top = [r for r in ranked if r["key"] not in taken][:top_k]
    for row in [*point_rows, *top]:
        pruned = list(row["overrides"].get("model.pruned", base_pruned))
        row["path_config"] = PathConfig(model_name="toy", depth=space.depth, pruned=pruned).to_dict()
    seconds = time.perf_counter() - started
    return {"rows": rows, "points": point_rows, "top": top, "seconds": seconds, "cache_seconds": 0.0,
            "num_images": 10, "distinct": len(ranked)}  # fmt: skip


# ----- injecting a fault ---------------------------------------------------------------------------------------
def inject(patch: Any, boundary: str, act: Any) -> list[str]:
    """Wraps SearchRun.stage and SearchRun.finish (with `patch`, a monkeypatch) so that `act()` runs at `boundary`
    ("enter NAME": before the real call; "exit NAME": after it returned), once; returns the list it notes firing in.
    `act` raises (an exception, a Ctrl-C) or kills the process."""
    from pathsearch.search.run import SearchRun

    when, name = boundary.split(" ", 1)
    fired: list[str] = []
    stage, finish = SearchRun.stage, SearchRun.finish

    def at(here: str, what: str) -> None:
        if here == when and what == name and not fired:
            fired.append(boundary)
            act()

    def staged(self: Any, stage_name: str, *args: Any, **kwargs: Any) -> Any:
        at("enter", stage_name)
        grid = stage(self, stage_name, *args, **kwargs)
        at("exit", stage_name)
        return grid

    def finished(self: Any, *args: Any, **kwargs: Any) -> None:
        at("enter", "finish")
        finish(self, *args, **kwargs)
        at("exit", "finish")

    patch.setattr(SearchRun, "stage", staged)
    patch.setattr(SearchRun, "finish", finished)
    return fired


def raise_fault(fault: str, boundary: str) -> Any:
    def act() -> None:
        if fault == "ctrl-c":
            raise KeyboardInterrupt
        raise RuntimeError(f"injected at {boundary}")

    return act


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# ----- the search file -----------------------------------------------------------------------------------------
def write_spec(folder: Path, strategy: str, experiment: str) -> Path:
    """The k = 0..3 shortest-pruned space; the search trains the baseline and k = 1 (enqueued); top 1 and the
    baseline are confirmed on 2 seeds (sequential: then 1 more, the budget 3: round 1 cannot decide on 2 seeds)."""
    search: dict[str, Any] = {
        "metric": "val_acc", "mode": "max", "num_samples": 2, "max_concurrent_trials": 2, "sampler": "random",
        "scheduler": "none", "seed": 0, "max_failures": 0, "enqueue": [{"prune.shortest": 1}],
        "confirm": {"top_k": 1, "seeds": 2},
    }  # fmt: skip
    if strategy == "sequential":
        search["confirm"].update(max_seeds=3, step=1)
    if strategy == "two_stage":
        search.update(strategy="two_stage", two_stage={"top_k": 1, "proxy_trials": 6, "proxy_batch": 6})
        search["enqueue"] = []
    data = {
        "model": {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 2}},
        "data": {"name": "synthetic"},
        "train": {"epochs": EPOCHS},
        "search": search,
        "space": {"model.pruned": {"by": "shortest", "low": 0, "high": 3}},
        "tracking": {"experiment": experiment},
    }
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ----- what must hold ------------------------------------------------------------------------------------------
def all_runs(uri: str, experiment: str) -> list[Any]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    return client.search_runs([exp.experiment_id], max_results=5000, run_view_type=ViewType.ALL)


def parent_of(runs: list[Any]) -> Any:
    (parent,) = [r for r in runs if r.data.tags.get("pathsearch.kind") == "search"]
    return parent


def describe_runs(runs: list[Any]) -> str:
    return "\n".join(
        f"{r.info.run_name}: {r.info.status} {r.data.tags.get('pathsearch.state')} "
        f"{r.data.tags.get('pathsearch.role')} {r.data.tags.get('pathsearch.trial_id')}"
        for r in runs
    )


def check_nothing_running(uri: str, experiment: str, parent_status: str) -> list[Any]:
    runs = all_runs(uri, experiment)
    assert parent_of(runs).info.status == parent_status, describe_runs(runs)
    assert not [r for r in runs if r.info.status == "RUNNING"], describe_runs(runs)
    return runs


def check_trained_once(markers: Path, runs: list[Any]) -> None:
    """Each Tune trial started from epoch 0 once (a restore may only report its last epoch again), and MLflow holds
    one run per Tune trial id, for every trial that trained."""
    starts: dict[str, list[int]] = {}
    for marker in markers.iterdir():
        if marker.name.startswith("failed"):
            continue
        trial_id, _k, start, _ns = marker.name.split(".")
        starts.setdefault(trial_id, []).append(int(start))
    for trial_id, begun in starts.items():
        begun.sort()
        assert begun[0] == 0 and all(s == EPOCHS for s in begun[1:]), f"{trial_id} started from epochs {begun}"
    ids = [r.data.tags["pathsearch.trial_id"] for r in runs if "pathsearch.trial_id" in r.data.tags]
    assert len(ids) == len(set(ids)), f"duplicated trial runs:\n{describe_runs(runs)}"
    assert set(ids) == set(starts), (sorted(ids), sorted(starts))


def check_confirmed(runs: list[Any], plan: dict[str, Any]) -> None:
    """The search ended with its confirmation: every round done, every planned (configuration, seed) has one FINISHED
    run, every configuration's run FINISHED, the verdict on the parent."""
    assert "pathsearch.verdict" in parent_of(runs).data.tags, describe_runs(runs)
    assert plan["rounds"] and all(r["done"] for r in plan["rounds"]), plan["rounds"]
    planned = sorted((label, str(seed)) for r in plan["rounds"] for seed in r["seeds"] for label in r["labels"])
    seeds = [r for r in runs if r.data.tags.get("pathsearch.role") == "confirmation_seed"]
    tags = [(r.data.tags["pathsearch.candidate"], r.data.tags["pathsearch.seed"], r.info.status) for r in seeds]
    assert sorted((label, seed) for label, seed, status in tags if status == "FINISHED") == planned, tags
    configs = [r for r in runs if r.data.tags.get("pathsearch.role") == "confirmation"]
    assert len(configs) == len(plan["candidates"]) and {r.info.status for r in configs} == {"FINISHED"}


def check_each_stage_trained_once(strategy: str, runs: list[Any], plan: dict[str, Any]) -> None:
    """A stage trained again under new Tune trial ids would pass the per-trial checks: count the trial runs per
    role instead (the search's trials, the supernet, the confirmation's (configuration, seed)s), each FINISHED; a
    sequential confirmation has its 2 rounds."""
    trials = [r for r in runs if "pathsearch.trial_id" in r.data.tags]
    roles: dict[str | None, int] = {}
    for r in trials:
        roles[r.data.tags.get("pathsearch.role")] = roles.get(r.data.tags.get("pathsearch.role"), 0) + 1
    assert len(plan["rounds"]) == (2 if strategy == "sequential" else 1), plan["rounds"]
    seeds = sum(len(r["seeds"]) * len(r["labels"]) for r in plan["rounds"])
    first = {"supernet": 1} if strategy == "two_stage" else {None: 2}  # the baseline and the enqueued k = 1
    assert roles == {**first, "confirmation_seed": seeds}, describe_runs(trials)
    assert {r.info.status for r in trials} == {"FINISHED"}, describe_runs(trials)


def read_plan(where: str | Path) -> dict[str, Any]:
    from pathsearch import storage

    if storage.is_remote(where):
        return json.loads(storage.read_text(storage.join(str(where), "confirm_plan.json")))
    return json.loads((Path(where) / "confirm_plan.json").read_text())


# ----- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    if not HAS_MOTO:
        yield None
        return
    from s3server import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def fault_ray(s3, tmp_path_factory):
    """One local Ray for the module's cases, on 127.0.0.1, its workers with the store's environment (set before it
    starts), and one MLflow store; yields (the store's URI, Ray's address). The environment is restored after."""
    saved = dict(os.environ)
    os.environ.update(s3.env if s3 is not None else {}, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    try:
        yield uri, ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


# ----- the matrix ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("strategy", "boundary", "fault", "storage"), CASES)
def test_a_fault_at_a_stage_boundary_leaves_a_search_that_resumes_to_its_end(
    strategy, boundary, fault, storage, tmp_path, fault_ray, s3, monkeypatch
):
    from pathsearch.config import load_search_file
    from pathsearch.search import oneshot
    from pathsearch.search.driver import resume_search, run_search
    from pathsearch.search.run import Interrupted

    uri, _ = fault_ray
    experiment = f"faults-{tmp_path.name}"
    markers = tmp_path / "markers"
    markers.mkdir()
    trainable = knobbed({**KNOBS, "marker_dir": str(markers)})
    monkeypatch.setattr(oneshot, "proxy_search", toy_proxy_search)  # what ray.remote(proxy_search) ships
    spec = load_search_file(write_spec(tmp_path, strategy, experiment))
    if storage == "s3":
        root, where = f"s3://pathsearch/{tmp_path.name}", f"s3://pathsearch/{tmp_path.name}/f"
        monkeypatch.setenv("PATHSEARCH_WORK_DIR", str(tmp_path / "work-search"))
    else:
        root, where = str(tmp_path / "runs"), str(tmp_path / "runs" / "f")

    with monkeypatch.context() as patch:
        fired = inject(patch, boundary, raise_fault(fault, boundary))
        if fault == "ctrl-c":
            with pytest.raises(Interrupted) as stopped:
                run_search(spec, root, uri, name="f", verbose=False, trainable=trainable)
            assert stopped.value.run_dir == where  # what the CLI tells the user to resume
        else:
            with pytest.raises(RuntimeError, match=f"injected at {boundary}"):
                run_search(spec, root, uri, name="f", verbose=False, trainable=trainable)
    assert fired == [boundary], "the fault never fired: the boundary was not reached"
    check_nothing_running(uri, experiment, "KILLED" if fault == "ctrl-c" else "FAILED")

    if storage == "s3":  # nothing local may help: a fresh working copy, made from the store
        monkeypatch.setenv("PATHSEARCH_WORK_DIR", str(tmp_path / "work-resume"))
    if boundary == "enter search":  # before Tune's first snapshot of the search: refused, saying why
        with pytest.raises(ValueError, match=r"no Tune state to resume from \(the search stopped before Tune's first"):
            resume_search(where, trainable=trainable, verbose=False)
        check_nothing_running(uri, experiment, "KILLED" if fault == "ctrl-c" else "FAILED")
        return
    result = resume_search(where, trainable=trainable, verbose=False)
    runs = check_nothing_running(uri, experiment, "FINISHED")
    assert not result.interrupted and result.confirmation is not None and not result.confirmation.interrupted
    assert result.confirmation.verdict
    plan = read_plan(where)
    check_confirmed(runs, plan)
    check_each_stage_trained_once(strategy, runs, plan)
    check_trained_once(markers, runs)
    if storage == "s3":
        assert result.stored_at == where and not (tmp_path / "work-resume" / "f").exists()


# ----- kill -9 of the driver -----------------------------------------------------------------------------------
DRIVER = """\
import json, os, sys
sys.path.insert(0, {tests!r})
import test_faults
test_faults.driver(sys.argv[1], json.loads(sys.argv[2]), json.loads(os.environ["FAULTS_DRIVER"]))
"""


def driver(verb: str, args: dict[str, Any], setup: dict[str, Any]) -> None:
    """A driver process (tests/toy_search.py's verbs) on the test's Ray: `search` kills itself with SIGKILL at
    setup["boundary"]; `resume` continues the search. The toy proxy and the knobbed toy trial stand in."""
    from pathsearch.config import load_search_file
    from pathsearch.search import oneshot
    from pathsearch.search.driver import resume_search, run_search

    trainable = knobbed(setup["toy"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(oneshot, "proxy_search", toy_proxy_search)
        if verb == "search":
            inject(patch, setup["boundary"], kill_self)
            spec = load_search_file(args["file"])
            run_search(spec, args["storage"], args["uri"], name=args["name"], address=setup["address"],
                       verbose=False, trainable=trainable)  # fmt: skip
            raise SystemExit(f"the driver was not killed at {setup['boundary']}")
        resume_search(args["run_dir"], address=setup["address"], trainable=trainable, verbose=False)


@pytest.mark.parametrize("strategy", list(KILL_AT) if ALL else ["sequential"])
def test_a_driver_killed_at_a_stage_boundary_resumes_in_a_fresh_process(strategy, tmp_path, fault_ray):
    uri, address = fault_ray
    boundary = KILL_AT[strategy]
    experiment = f"killed-{tmp_path.name}"
    markers = tmp_path / "markers"
    markers.mkdir()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(Path(__file__).parent)))
    setup = {"address": address, "boundary": boundary, "toy": {**KNOBS, "marker_dir": str(markers)}}
    env = {**os.environ, "FAULTS_DRIVER": json.dumps(setup)}
    run_dir = tmp_path / "runs" / "k"
    args = {"file": str(write_spec(tmp_path, strategy, experiment)), "storage": str(run_dir.parent), "uri": uri,
            "name": "k"}  # fmt: skip
    command = [sys.executable, str(script)]
    with (tmp_path / "driver.log").open("w") as log:
        proc = subprocess.Popen([*command, "search", json.dumps(args)], env=env, start_new_session=True,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        code = proc.wait(timeout=300)
    finally:
        subprocess.run(["pkill", "-9", "-s", str(proc.pid)], check=False)  # its session: the driver alone
    assert code == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
    assert parent_of(all_runs(uri, experiment)).info.status == "RUNNING"  # nobody closed it: the process died
    resume = resume_toy_search(command, run_dir, env)
    assert resume.returncode == 0, resume.stderr[-3000:]
    runs = check_nothing_running(uri, experiment, "FINISHED")
    plan = read_plan(run_dir)
    check_confirmed(runs, plan)
    check_each_stage_trained_once(strategy, runs, plan)
    check_trained_once(markers, runs)
