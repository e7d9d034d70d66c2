"""The confirmation stage: paired seeds, the winner by mean val, the verdict on test, MLflow nesting, export, resume.

Searches run on a real local Ray with a real MLflow store and the torch-free toy trainable, here with known true
accuracies per configuration plus deterministic seed noise (tests/toy_search.py, `toy_score`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from pathsearch.config.paths import PathConfig
from pathsearch.export import export_best
from pathsearch.search.confirm import describe
from pathsearch.search.driver import run_search
from pathsearch.search.verdict import BASELINE, paired_difference

sys.path.insert(0, str(Path(__file__).parent))
import toy_search
from test_search import child_runs, resume_toy_search, toy_spec

ray.cloudpickle.register_pickle_by_value(toy_search)
TRUE_MEANS = [0.80, 0.84, 0.82, 0.81]  # val/test accuracy of pruning the k shortest paths; k = 1 is truly best


@pytest.fixture(scope="module")
def local_ray():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def confirmed_spec(tmp_path: Path, means: list[float], search_seed: int, seeds: int = 6, top_k: int = 3):
    """Every configuration k = 0..3 is tried once (the baseline, then k = 1, 2, 3 enqueued), then confirmed."""
    spec = toy_spec(
        tmp_path,
        {"model.pruned": {"by": "shortest", "low": 0, "high": 3}},
        {"num_samples": 4, "max_concurrent_trials": 2, "confirm": {"top_k": top_k, "seeds": seeds}},
        train={"means": means, "sd": 0.01, "shared_sd": 0.02},
    )
    spec.search.enqueue = [{"prune.shortest": k} for k in (1, 2, 3)]
    spec.trial.train.seed = spec.raw["train"]["seed"] = search_seed
    return spec


def pruned_count(overrides: dict) -> int:
    return len(overrides.get("model.pruned", []))


@pytest.fixture(scope="module")
def cursed(tmp_path_factory, local_ray):
    """On search seed 1 the single-seed winner is k = 2 (a lucky draw); the truth is k = 1."""
    tmp_path = tmp_path_factory.mktemp("cursed")
    spec = confirmed_spec(tmp_path, TRUE_MEANS, search_seed=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_search(spec, tmp_path / "runs", uri, name="cursed", verbose=False, trainable=toy_search.toy_trial)
    return result, uri, tmp_path


def test_confirmation_picks_the_true_best_where_one_seed_picks_a_worse_one(cursed):
    result, _, _ = cursed
    assert pruned_count(result.best["overrides"]) == 2  # the winner's curse happened in the search
    c = result.confirmation
    assert c is not None and not c.interrupted
    assert c.seeds == [2, 3, 4, 5, 6, 7]  # fresh: after the search's seed 1
    assert pruned_count(c.candidate(c.winner)["overrides"]) == 1
    assert {pruned_count(row["overrides"]) for row in c.candidates} == {0, 1, 2, 3}
    d = c.difference
    true_gain = TRUE_MEANS[1] - TRUE_MEANS[0]
    assert d["of"] == c.winner and d["n"] == 6 and d["ci_low"] <= true_gain <= d["ci_high"]
    assert d["ci_low"] > 0 and c.verdict.startswith("prune embed: +")
    assert "better on 6 of 6 paired seeds" in c.verdict
    # optimism: the search's single-seed score of the winner beside its confirmed mean
    winner = c.candidate(c.winner)
    toy = {"means": TRUE_MEANS, "sd": 0.01, "shared_sd": 0.02}
    assert winner["search_val_acc"] == pytest.approx(toy_search.toy_score(toy, 1, 1, "val"))
    assert winner["val_acc_mean"] == pytest.approx(sum(toy_search.toy_score(toy, 1, s, "val") for s in c.seeds) / 6)


def test_confirmation_is_nested_in_mlflow_and_only_confirmation_trials_read_test(cursed):
    result, uri, _ = cursed
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("toy")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("pathsearch.kind") == "search")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["pathsearch.verdict"] == result.confirmation.verdict
    for key in ("confirmed_test_acc_mean", "baseline_test_acc_mean", "confirmed_test_acc_diff_ci_low"):
        assert key in parent.data.metrics
    assert {"confirmation.yaml", "confirmation.png", "best_path_config.yaml"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    search_trials = [r for r in children if "pathsearch.role" not in r.data.tags]
    configs = [r for r in children if r.data.tags.get("pathsearch.role") == "confirmation"]
    assert len(search_trials) == 4 and len(configs) == 4
    assert not [r for r in search_trials if any(k.startswith("test_") for k in r.data.metrics)]
    winner_run = parent.data.tags["pathsearch.confirmed_run"]
    for config in configs:
        assert config.info.status == "FINISHED"
        assert {"val_acc_mean", "val_acc_std", "test_acc_mean", "test_acc_std"} <= set(config.data.metrics)
        assert "path_config.yaml" in {a.path for a in client.list_artifacts(config.info.run_id)}
        seeds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == config.info.run_id]
        assert sorted(int(r.data.tags["pathsearch.seed"]) for r in seeds) == [2, 3, 4, 5, 6, 7]
        assert all(r.info.status == "FINISHED" and "test_acc" in r.data.metrics for r in seeds)
        assert all(r.data.params["config.train.test"] == "True" for r in seeds)
    winner = next(c for c in configs if c.info.run_id == winner_run)
    assert winner.data.params["config.model.pruned"] == "['embed']"
    summary = yaml.safe_load((result.run_dir / "confirmation.yaml").read_text())
    assert summary["verdict"] == result.confirmation.verdict and summary["method"].startswith("paired t")


def test_export_takes_the_latest_searchs_confirmed_winner_with_its_provenance(cursed, local_ray):
    result, uri, tmp_path = cursed
    out = export_best("toy", tmp_path / "best.yaml", uri)
    config = PathConfig.load(out.files["path_config"])
    assert config.pruned == ["embed"]  # the confirmed winner, not the search's single-seed best (k = 2)
    p = config.provenance
    assert p["confirmed"] and p["search_run_id"] == result.parent_run_id and p["seeds"] == [2, 3, 4, 5, 6, 7]
    assert p["weights_seed"] == 2 and p["verdict"] == result.confirmation.verdict
    assert p["test_acc_mean"] == pytest.approx(
        result.confirmation.candidate(result.confirmation.winner)["test_acc_mean"]
    )
    other = export_best("toy", tmp_path / "seed5.yaml", uri, seed=5)
    assert PathConfig.load(other.files["path_config"]).provenance["weights_seed"] == 5
    with pytest.raises(ValueError, match="seeds"):
        export_best("toy", tmp_path / "x.yaml", uri, seed=99)
    # a later search in the same experiment, without confirmation, where nothing differs: export follows it,
    # says it is unconfirmed, and never takes a maximum across the two searches
    (tmp_path / "later").mkdir()
    later = toy_spec(tmp_path / "later", {"model.pruned": {"by": "shortest", "low": 0, "high": 0}}, {"num_samples": 1})
    second = run_search(later, tmp_path / "runs", uri, name="later", verbose=False, trainable=toy_search.toy_trial)
    latest = export_best("toy", tmp_path / "latest.yaml", uri)
    assert latest.provenance["confirmed"] is False and latest.provenance["search_run_id"] == second.parent_run_id
    assert PathConfig.load(latest.files["path_config"]).pruned == []
    again = export_best("toy", tmp_path / "again.yaml", uri, run_id=result.parent_run_id)
    assert PathConfig.load(again.files["path_config"]).pruned == ["embed"]


def test_with_no_true_difference_the_verdict_says_so(tmp_path, local_ray):
    spec = confirmed_spec(tmp_path, [0.8] * 4, search_seed=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_search(spec, tmp_path / "runs", uri, name="flat", verbose=False, trainable=toy_search.toy_trial)
    c = result.confirmation
    assert "no configuration beats" in c.verdict, c.verdict
    assert c.difference["ci_low"] <= 0 <= c.difference["ci_high"]


def test_sequential_confirmation_adds_seeds_for_the_undecided_and_stops_the_decided(tmp_path, local_ray, capsys):
    """Three challengers against the baseline (toy means, 0.80): k = 1 truly +4 points, k = 2 truly -10 points,
    k = 3 truly +0.3 (smaller than the seed noise can show in 7 seeds). Rounds of 3, 2, 2 seeds: k = 2 is decided
    worse and stops training, k = 1 is decided better, k = 3 stays undecided to the budget; the verdict says so
    with its seeds and rounds, each round is one line and one step of each open challenger's interval in MLflow."""
    spec = confirmed_spec(tmp_path, [0.80, 0.84, 0.70, 0.803], search_seed=0, seeds=3)
    c = spec.search.confirm
    c.max_seeds, c.step, c.min_effect = 7, 2, 0.0025
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_search(spec, tmp_path / "runs", uri, name="seq", verbose=True, trainable=toy_search.toy_trial)
    out = capsys.readouterr().out
    conf = result.confirmation
    plan = json.loads((tmp_path / "runs" / "seq" / "confirm_plan.json").read_text())
    rounds = plan["rounds"]
    assert [len(r["seeds"]) for r in rounds] == [3, 2, 2][: len(rounds)] and len(rounds) >= 2, rounds
    label = {pruned_count(c["overrides"]): c["label"] for c in plan["candidates"]}
    decided = {k: next(i for i, look in enumerate(plan["looks"]) if look[label[k]]["state"]) for k in (1, 2)}
    assert plan["looks"][decided[2]][label[2]]["state"] == "worse"
    assert plan["looks"][decided[1]][label[1]]["state"] == "beats"
    for k, at in decided.items():  # a decided challenger is not in any later round
        assert all(label[k] not in r["labels"] for r in rounds[at + 1 :])
    assert all("baseline" in r["labels"] for r in rounds)
    trained = {k: len(plan["results"][label[k]]) for k in (0, 1, 2, 3)}
    assert trained[2] < trained[0] == sum(len(r["seeds"]) for r in rounds)  # the worse one stopped early
    assert conf.winner == label[1]
    assert "beats the baseline by +4" in conf.verdict and f"over {len(rounds)} rounds" in conf.verdict, conf.verdict
    assert f"{trained[0]} paired seeds of the baseline" in conf.verdict
    progress = [line for line in out.splitlines() if "] round " in line]  # per finished trial of a round
    assert progress and all("trials done (" in line and "challengers decided before it" in line for line in progress)
    assert not any("pruned" in line or "best val_acc" in line for line in progress), progress
    assert "12/12 trials done (4 configurations x seeds 1-3)" in out and "1 of 3 challengers decided" in out, out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("round ")] == [
        f"round {i + 1}" for i in range(len(rounds))
    ]
    client = MlflowClient(uri)
    run_of = {c["label"]: c["run_id"] for c in plan["candidates"]}
    steps = [m.step for m in client.get_metric_history(run_of[label[3]], "seq_ci_low")]
    assert steps == list(range(1, len(rounds) + 1))  # the undecided one: an interval every round
    assert (tmp_path / "runs" / "seq" / "confirmation_rounds.png").is_file()
    summary = yaml.safe_load((tmp_path / "runs" / "seq" / "confirmation.yaml").read_text())
    assert summary["sequential"]["design"]["max_seeds"] == 7 and len(summary["sequential"]["rounds"]) == len(rounds)


def test_an_undecided_confirmation_is_extended_once_on_its_reserve_and_decided(tmp_path, local_ray):
    """A toy search whose challenger is truly +0.7 points with a paired seed SD of about 1.2: 3 seeds leave it
    undecided; `resume --max-seeds 10` adds rounds for it alone (the baseline and it), on boundaries that spend
    the reserve, and it is decided to beat the baseline; the verdict says it was extended and on how many seeds it
    rests. A second extension, one below the seeds run, one of a decided confirmation, and a changed design are
    refused with one line (exit 2) and the plan is left as it was."""
    from pathsearch.cli import main
    from pathsearch.search.driver import resume_search

    spec = confirmed_spec(tmp_path, [0.80, 0.807, 0.78, 0.78], search_seed=0, seeds=2, top_k=1)
    spec.raw["train"]["toy"].update(sd=0.0085, shared_sd=0.0)
    c = spec.search.confirm
    c.max_seeds, c.step = 3, 1
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_search(spec, tmp_path / "runs", uri, name="ext", verbose=False, trainable=toy_search.toy_trial)
    folder = tmp_path / "runs" / "ext"
    plan = json.loads((folder / "confirm_plan.json").read_text())
    challenger = plan["candidates"][1]["label"]
    assert plan["looks"][-1][challenger]["state"] is None, plan["looks"]  # undecided at its budget of 3 seeds
    assert "undecided" in result.confirmation.verdict
    before = (folder / "confirm_plan.json").read_text()
    for bad in ("3", "2"):  # not more than the seeds that ran
        assert main(["resume", str(folder), "--max-seeds", bad]) == 2
    assert (folder / "confirm_plan.json").read_text() == before

    extended = resume_search(folder, trainable=toy_search.toy_trial, verbose=False, max_seeds=10)
    plan = json.loads((folder / "confirm_plan.json").read_text())
    assert plan["design"]["extended_from"] == 3 and plan["design"]["max_seeds"] == 10
    assert all(r["labels"] == ["baseline", challenger] for r in plan["rounds"][2:]) and len(plan["rounds"]) > 2
    assert plan["looks"][-1][challenger]["state"] == "beats", plan["looks"][-1]
    verdict = extended.confirmation.verdict
    assert "beats the baseline" in verdict and "extended from 3 to 10 seeds" in verdict, verdict
    seeds = len(plan["results"]["baseline"])
    assert f"{seeds} paired seeds of the baseline" in verdict and 3 < seeds <= 10
    _, parents, children = child_runs(uri)
    assert parents[0].info.status == "FINISHED" and all(r.info.status != "RUNNING" for r in children)
    after = (folder / "confirm_plan.json").read_text()
    assert main(["resume", str(folder), "--max-seeds", "12"]) == 2  # decided now (and the reserve is spent)
    data = yaml.safe_load((folder / "search.yaml").read_text())
    data["search"]["confirm"]["alpha"] = 0.1
    (folder / "search.yaml").write_text(yaml.safe_dump(data))
    assert main(["resume", str(folder)]) == 2  # a changed design is refused
    assert (folder / "confirm_plan.json").read_text() == after


def test_paired_t_interval_covers_the_true_difference_95_percent_of_the_time():
    rng = random.Random(0)
    covered, runs = 0, 2000
    for _ in range(runs):
        shared = [rng.gauss(0, 2.0) for _ in range(5)]  # seed effects shared by both configurations
        a = [0.3 + s + rng.gauss(0, 0.5) for s in shared]
        b = [s + rng.gauss(0, 0.5) for s in shared]
        d = paired_difference(a, b)
        covered += d["ci_low"] <= 0.3 <= d["ci_high"]
    assert 0.93 <= covered / runs <= 0.97
    same = paired_difference([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])  # every seed +0.1: t is undefined, no interval
    assert math.isnan(same["ci_low"]) and same["wins"] == 3 and same["p_value"] == pytest.approx(0.25)  # sign test


def test_configurations_read_in_plain_words():
    assert describe({"model.pruned": ["embed", "attn.1"], "train.lr": 0.00123}) == "prune embed, attn.1; lr 0.00123"
    assert describe({"model.pruned": [], "model.ensemble_scale.init": 0.1}) == "no path pruned; EnsembleScale init 0.1"


@pytest.mark.parametrize("stop", ["ctrl-c"])  # kill -9: test_sequential_confirmation_killed_in_round_2_resumes
def test_driver_stopped_during_confirmation_then_resumed_keeps_one_finished_run_per_seed(stop, tmp_path):
    """kill -9 (or SIGINT) of the driver while confirmation trials run, then `resume`: every (configuration, seed)
    has exactly one FINISHED run, none is RUNNING, and the verdict is written. After Ctrl-C the search exits
    cleanly with nothing RUNNING: the parent and the unfinished runs end KILLED (INTERRUPTED)."""
    import signal
    import time

    confirmed_spec(tmp_path, TRUE_MEANS, search_seed=1, seeds=4, top_k=1)  # 8 confirmation trials
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec_file = tmp_path / "toy.yaml"
    data = yaml.safe_load(spec_file.read_text())
    data["search"]["enqueue"] = [{"prune.shortest": k} for k in (1, 2, 3)]
    data["train"]["seed"] = 1
    spec_file.write_text(yaml.safe_dump(data))
    args = {"file": str(spec_file), "storage": str(tmp_path / "runs"), "uri": uri, "name": "crash"}
    driver = [sys.executable, str(Path(__file__).parent / "toy_search.py")]
    knobs = json.dumps({"means": TRUE_MEANS, "sd": 0.01, "shared_sd": 0.02, "sleep": 0.6})
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATHSEARCH_TOY": knobs}
    console = tmp_path / "console.txt"  # what the driver said: in the messages of the asserts below
    with console.open("w") as out:
        proc = subprocess.Popen([*driver, "search", json.dumps(args)], env=env, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    plan = tmp_path / "runs" / "crash" / "confirm_plan.json"
    try:
        deadline = time.monotonic() + 300
        seed_runs: list = []
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1.0)
            if plan.exists():
                _, _, children = child_runs(uri)
                seed_runs = [c for c in children if c.data.tags.get("pathsearch.role") == "confirmation_seed"]
                if sum(c.info.status == "FINISHED" for c in seed_runs) >= 3:
                    break
        assert proc.poll() is None, f"the search ended before it could be killed:\n{console.read_text()[-3000:]}"
        assert 3 <= sum(c.info.status == "FINISHED" for c in seed_runs) < 8, [c.info.status for c in seed_runs]
        if stop == "ctrl-c":
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) == 0, console.read_text()[-3000:]
            _, parents, children = child_runs(uri)
            said = console.read_text()[-3000:]
            assert parents[0].info.status == "KILLED", said
            assert not [c for c in children if c.info.status == "RUNNING"], said
            configs = [c for c in children if c.data.tags.get("pathsearch.role") == "confirmation"]
            assert {c.data.tags.get("pathsearch.state") for c in configs} == {"INTERRUPTED"}, said
    finally:
        subprocess.run(["pkill", "-9", "-s", str(proc.pid)], check=False)
        proc.wait()
    time.sleep(2)
    resume = resume_toy_search(driver, plan.parent, env)
    assert resume.returncode == 0, resume.stderr[-3000:]
    _, parents, children = child_runs(uri)
    assert parents[0].info.status == "FINISHED" and "pathsearch.verdict" in parents[0].data.tags
    assert all(c.info.status != "RUNNING" for c in children)
    seed_runs = [c for c in children if c.data.tags.get("pathsearch.role") == "confirmation_seed"]
    finished: dict[tuple[str, str], int] = {}
    for run in seed_runs:
        if run.info.status == "FINISHED":
            key = (run.data.tags["pathsearch.candidate"], run.data.tags["pathsearch.seed"])
            finished[key] = finished.get(key, 0) + 1
    runs = sorted(
        (r.data.tags.get("pathsearch.candidate"), r.data.tags.get("pathsearch.seed"), r.info.status,
         r.data.tags.get("pathsearch.state")) for r in seed_runs
    )  # fmt: skip
    expected = sorted((c, s) for c in ("baseline", "top 1") for s in ("2", "3", "4", "5"))
    assert sorted(finished) == expected, f"{runs}\n{resume.stdout[-3000:]}"
    assert set(finished.values()) == {1}, runs
    # the verdict rests on every planned seed (a trial that failed after the resume would have left it 3 of 4)
    assert yaml.safe_load((plan.parent / "confirmation.yaml").read_text())["seeds"] == [2, 3, 4, 5]
    configs = [c for c in children if c.data.tags.get("pathsearch.role") == "confirmation"]
    assert len(configs) == 2 and all(c.info.status == "FINISHED" for c in configs)


def test_sequential_confirmation_killed_in_round_2_resumes_to_its_last_round(tmp_path):
    """kill -9 of the driver (its whole session) while round 2 of 3 trains, then `resume`: the finished round keeps
    its results, round 2 continues from Tune's snapshot, round 3 follows; every (configuration, seed) ends with
    exactly one FINISHED run and the verdict rests on all 6 seeds of the 3 rounds."""
    import time

    confirmed_spec(tmp_path, [0.80, 0.805, 0.80, 0.80], search_seed=1, seeds=2, top_k=1)
    spec_file = tmp_path / "toy.yaml"
    data = yaml.safe_load(spec_file.read_text())
    data["search"]["confirm"].update(max_seeds=6, step=2, alpha=0.002)  # nothing decided before the budget
    data["search"]["enqueue"] = [{"prune.shortest": k} for k in (1, 2, 3)]
    data["train"]["seed"] = 1
    spec_file.write_text(yaml.safe_dump(data))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = {"file": str(spec_file), "storage": str(tmp_path / "runs"), "uri": uri, "name": "rounds"}
    driver = [sys.executable, str(Path(__file__).parent / "toy_search.py")]
    knobs = json.dumps({"means": [0.80, 0.805, 0.80, 0.80], "sd": 0.01, "shared_sd": 0.02, "sleep": 0.6})
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATHSEARCH_TOY": knobs}
    proc = subprocess.Popen([*driver, "search", json.dumps(args)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    plan_file = tmp_path / "runs" / "rounds" / "confirm_plan.json"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if plan_file.exists() and len(json.loads(plan_file.read_text())["rounds"]) == 2:
                _, _, children = child_runs(uri)  # a seed of round 2 finished: the round is under way
                if any(c.data.tags.get("pathsearch.seed") in ("3", "4") and c.info.status == "FINISHED"
                       for c in children):  # fmt: skip
                    break
        assert proc.poll() is None, "the search ended before it could be killed"
    finally:
        subprocess.run(["pkill", "-9", "-s", str(proc.pid)], check=False)
        proc.wait()
    plan = json.loads(plan_file.read_text())
    assert [r["done"] for r in plan["rounds"]] == [True, False]  # killed in round 2
    time.sleep(2)
    resume = resume_toy_search(driver, plan_file.parent, env)
    assert resume.returncode == 0, resume.stderr[-3000:]
    plan = json.loads(plan_file.read_text())
    assert [r["seeds"] for r in plan["rounds"]] == [[2, 3], [4, 5], [6, 7]] and all(r["done"] for r in plan["rounds"])
    _, parents, children = child_runs(uri)
    assert parents[0].info.status == "FINISHED" and "over 3 rounds" in parents[0].data.tags["pathsearch.verdict"]
    assert all(c.info.status != "RUNNING" for c in children)
    finished: dict[tuple[str, str], int] = {}
    for run in children:
        if run.data.tags.get("pathsearch.role") == "confirmation_seed" and run.info.status == "FINISHED":
            key = (run.data.tags["pathsearch.candidate"], run.data.tags["pathsearch.seed"])
            finished[key] = finished.get(key, 0) + 1
    assert sorted(finished) == sorted((c, str(s)) for c in ("baseline", "top 1") for s in range(2, 8))
    assert set(finished.values()) == {1}, finished


# ----- bad input: file, key and value named, exit code 2, nothing written ------------------------------------------
DIGITS = Path(__file__).resolve().parents[1] / "search_spaces" / "digits_tiny.yaml"


@pytest.mark.parametrize(
    ("overrides", "key", "value"),
    [
        (["search.confirm.top_k=0"], "search.confirm.top_k", "0"),
        (["search.confirm.seeds=1"], "search.confirm.seeds", "1"),
        (["data.val_size=1497"], "data.val_size", "1497"),  # 300 + 1497 = 1797: no test image left
        (["train.test=true"], "train.test", "True"),  # a search's trials never read test
        (["space.train.test={choices: [true, false]}"], "space.train.test", None),
        (["search.strategy=two_stage", "search.confirm.enabled=false"], "search.confirm", "enabled=False"),
        # sequential: a budget below the first round, no seeds per round, a negative smallest gain, alpha outside
        (["search.confirm.seeds=4", "search.confirm.max_seeds=3"], "search.confirm.max_seeds", "got 3"),
        (["search.confirm.max_seeds=9", "search.confirm.step=0"], "search.confirm.step", "got 0"),
        (["search.confirm.max_seeds=9", "search.confirm.min_effect=-0.1"], "search.confirm.min_effect", "got -0.1"),
        (["search.confirm.max_seeds=9", "search.confirm.min_effect=.nan"], "search.confirm.min_effect", "got nan"),
        (["search.confirm.max_seeds=9", "search.confirm.alpha=0"], "search.confirm.alpha", "got 0"),
        (["search.confirm.max_seeds=9", "search.confirm.alpha=0.6"], "search.confirm.alpha", "got 0.6"),
        (["search.confirm.max_seeds=9", "data.val_size=1497"], "data.val_size", "1497"),  # no test split
    ],
)
def test_bad_confirmation_settings_are_refused_naming_file_key_and_value(overrides, key, value):
    from pathsearch.config import load_search_file
    from pathsearch.config.typed import ConfigError

    with pytest.raises(ConfigError) as raised:
        load_search_file(DIGITS, overrides)
    line = next(line for line in raised.value.problems if f"{key}:" in line)
    assert line.startswith(f"{DIGITS}: ") and (value is None or value in line), raised.value.problems


def test_search_with_a_bad_confirmation_exits_2_and_writes_nothing(tmp_path):
    cmd = [sys.executable, "-m", "pathsearch.cli", "search", str(DIGITS), "--set", "search.confirm.seeds=1"]
    result = subprocess.run([*cmd, "--storage-path", "runs"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    expected = f"{DIGITS}: search.confirm.seeds: must be >= 2 (a spread and a confidence interval need two seeds)"
    assert result.stderr.strip() == f"pathsearch search: error: {expected}, got 1"
    assert list(tmp_path.iterdir()) == []  # nothing written: no run directory, no MLflow store


def test_a_confirmation_needs_a_test_split(tmp_path):
    from pathsearch.config import load_search_file
    from pathsearch.config.typed import ConfigError

    for split in ("train", "val"):  # an image folder without test/
        (tmp_path / split).mkdir()
    with pytest.raises(ConfigError, match=r"search\.confirm: .*no test/ folder"):
        load_search_file(DIGITS, ["data.name=imagefolder", f"data.root={tmp_path}", "model.kwargs.img_size=8"])
    (tmp_path / "test").mkdir()
    spec = load_search_file(DIGITS, ["data.name=imagefolder", f"data.root={tmp_path}", "model.kwargs.img_size=8"])
    assert spec.search.confirm.enabled


def test_a_search_file_without_confirm_section_does_not_confirm(tmp_path):
    from pathsearch.config import load_search_file

    data = yaml.safe_load(DIGITS.read_text())
    del data["search"]["confirm"]
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(data))
    assert not load_search_file(path).search.confirm.enabled
    assert load_search_file(DIGITS).search.confirm.enabled  # a section turns it on


# ----- paired seeds: seed s is the same start for every configuration -----------------------------------------------
def test_the_same_seed_gives_two_configurations_the_same_trunk_and_batch_order():
    import torch

    from pathsearch.config import load_trial_config
    from pathsearch.trial.train import build_seed_run, load_trial_data

    def run(seed: int, **model):
        base = yaml.safe_load(DIGITS.read_text())
        sections = {"model": {**base["model"], **model, "kwargs": {**base["model"]["kwargs"], "depth": 2}},
                    "data": base["data"], "train": {**base["train"], "seed": seed}}  # fmt: skip
        cfg = load_trial_config(None, data=sections)
        return build_seed_run(cfg, load_trial_data(cfg), seed, torch.device("cpu"))

    a = run(3, pruned=["embed", "attn.1"])
    b = run(3, pruned=[], ensemble_scale={"kind": "vector", "init": 0.1}, distill={"alpha": 0.5, "students": [1]})
    c = run(4, pruned=["embed", "attn.1"])
    trunk = [r.model.vit.state_dict() for r in (a, b, c)]
    assert trunk[0].keys() == trunk[1].keys()
    assert all(torch.equal(trunk[0][k], trunk[1][k]) for k in trunk[0])  # same initial trunk weights
    assert not all(torch.equal(trunk[0][k], trunk[2][k]) for k in trunk[0])  # another seed: another start
    first = [next(iter(r.train_loader))[1] for r in (a, b, c)]  # labels of the first batch: the data order
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])


def _table(val: dict[str, list[float]], test: dict[str, list[float]], seeds: list[int]):
    from pathsearch.search.confirm import Candidate, Plan, summarise

    candidates = [Candidate(label, {"model.pruned": [] if label == BASELINE else ["embed"]}) for label in val]
    per = {
        c: {s: {"val_acc": val[c][i], "test_acc": test[c][i]} for i, s in enumerate(seeds) if val[c][i] is not None}
        for c in val
    }  # a None: that seed's trial did not finish
    return summarise(Plan("val_acc", "max", seeds, candidates, "val_acc"), per)


def test_the_winner_is_chosen_on_val_and_judged_on_test():
    seeds = [1, 2, 3, 4]
    # top 1 is best on val, but worse than the baseline on test on every seed: the verdict says so
    c = _table({"baseline": [0.80, 0.81, 0.79, 0.80], "top 1": [0.85, 0.86, 0.84, 0.85]},
               {"baseline": [0.80, 0.82, 0.79, 0.81], "top 1": [0.77, 0.78, 0.775, 0.772]}, seeds)  # fmt: skip
    assert c.winner == "top 1" and "won on val but is worse than the baseline on test" in c.verdict
    assert c.difference["ci_high"] < 0 and c.difference["wins"] == 0
    # the baseline is best on val: no configuration beats it, and the best challenger's difference is reported
    c = _table({"baseline": [0.86, 0.85, 0.87, 0.86], "top 1": [0.84, 0.83, 0.85, 0.84]},
               {"baseline": [0.80, 0.82, 0.79, 0.81], "top 1": [0.90, 0.91, 0.92, 0.90]}, seeds)  # fmt: skip
    assert c.winner == "baseline" and c.verdict.startswith("the baseline") and c.difference["of"] == "top 1"
    # a seed that one configuration did not finish is left out of every configuration's figures (pairing)
    c = _table({"baseline": [0.80, 0.81, 0.50], "top 1": [0.85, 0.86, None]},
               {"baseline": [0.80, 0.82, 0.50], "top 1": [0.83, 0.84, None]}, [1, 2, 3])  # fmt: skip
    assert c.seeds == [1, 2] and c.difference["n"] == 2
    assert c.candidate("baseline")["test_acc_mean"] == pytest.approx(0.81)  # seed 3 (0.50) is not counted
    assert "1 of 3 planned seeds did not finish" in c.verdict  # the verdict says it rests on fewer seeds
    assert "did not finish" not in _table({"baseline": [0.8, 0.81], "top 1": [0.85, 0.86]},
                                          {"baseline": [0.8, 0.82], "top 1": [0.83, 0.84]}, [1, 2]).verdict  # fmt: skip


def test_a_searchs_file_reaches_at_most_six_modules(tmp_path, local_ray):
    """A search file goes where it is needed and no further: a toy search with its confirmation, followed from
    `run_search` with sys.setprofile, counts the distinct pathsearch modules whose functions receive the search file
    object or one of its sections (search, trial and its model, data and train, space, tracking) as an argument.
    The schema's own package (pathsearch.config: the sections' methods, their serialiser, the space's sampling) is
    where these objects are defined, not where they travel to: it is listed, not counted."""
    import threading

    spec = confirmed_spec(tmp_path, TRUE_MEANS, search_seed=1, seeds=2, top_k=1)
    sections = [spec, spec.search, spec.trial, spec.trial.model, spec.trial.data, spec.trial.train, spec.space]
    watched = {id(section) for section in [*sections, spec.tracking]}
    reached: dict[str, set[str]] = {}

    def profile(frame, event, arg):
        if event != "call" or not frame.f_globals.get("__name__", "").startswith("pathsearch"):
            return
        code = frame.f_code
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        if any(id(frame.f_locals.get(name)) in watched for name in names):
            reached.setdefault(frame.f_globals["__name__"], set()).add(code.co_name)

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        result = run_search(spec, tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}", name="traced",
                            verbose=False, trainable=toy_search.toy_trial)  # fmt: skip
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    assert result.confirmation is not None and not result.interrupted  # the whole search ran, confirmation too
    assert "pathsearch.search.driver" in reached and "pathsearch.search.confirm" in reached, reached  # it traces
    travelled = sorted(m for m in reached if m != "pathsearch.config" and not m.startswith("pathsearch.config."))
    where = "; ".join(f"{m}: {sorted(f)}" for m, f in sorted(reached.items()))
    assert {"pathsearch.config", "pathsearch.config.space"} <= set(reached), where  # the schema is seen, not counted
    assert len(travelled) <= 6, f"the search file reaches {len(travelled)} modules: {where}"


def test_a_challenger_that_is_the_baseline_in_disguise_stops_after_its_first_round_naming_its_settings():
    """A searched distillation temperature while distillation's weight is 0 trains the baseline's model again: every
    value of every paired seed equal. Its first look says so, the next round leaves it out, and the verdict names
    the settings that had no effect; a challenger whose test accuracies merely tie (its losses differ) does not."""
    from pathsearch.search.confirm import Candidate, Plan, look, next_round, summarise_sequential
    from pathsearch.search.sequential import IDENTICAL, Design

    design = Design.exact(3, 2, 9, 0.0025, challengers=2)
    candidates = [
        Candidate(BASELINE, {"model.pruned": []}),
        Candidate("top 1", {"model.pruned": [], "model.distill.temperature": 4.0}),
        Candidate("top 2", {"model.pruned": ["attn.0"]}),
    ]
    base = {s: {"val_acc": 0.8 + s / 100, "val_loss": 0.5 - s / 100, "test_acc": 0.79 + s / 100, "test_loss": 0.6}
            for s in range(3)}  # fmt: skip
    # same test accuracies, another model (its losses differ); a little better on val: the best challenger
    tie = {s: {**v, "test_loss": v["test_loss"] + 0.01, "val_acc": v["val_acc"] + 0.001} for s, v in base.items()}
    plan = Plan("val_acc", "max", [0, 1, 2], candidates, "val_acc", design=dataclasses.asdict(design))
    plan.rounds = [{"seeds": [0, 1, 2], "labels": [c.label for c in candidates], "done": True}]
    plan.results = {BASELINE: base, "top 1": dict(base), "top 2": tie}
    decisions = look(plan, design, 0)
    assert decisions["top 1"].state == IDENTICAL and decisions["top 2"].state is None
    assert next_round(plan, design, 0, decisions)["labels"] == [BASELINE, "top 2"]
    plan.looks = [{label: dataclasses.asdict(d) for label, d in decisions.items()}]
    raw = {"model": {"pruned": [], "distill": {"alpha": 0.0, "temperature": 1.0}}}  # the search file's base
    verdict = summarise_sequential(plan, plan.per_seed(), raw).verdict
    assert "top 1 identical to the baseline after 3 seeds (its settings had no effect: temperature 4)" in verdict, (
        verdict
    )
