"""One-shot path search: supernet training, proxy scores from cached features, the two-stage search through the CLI
with what it records in MLflow, and post-hoc EnsembleScale fitting. Real timm models, a real local Ray (through the
CLI), a real MLflow SQLite store checked with the MLflow client."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import randomize_norms, tiny_timm_vit, wait_until_healthy
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from pathsearch.config import SupernetConfig, load_search_file, load_trial_config
from pathsearch.config.paths import EnsembleScaleConfig, PathConfig
from pathsearch.config.typed import ConfigError
from pathsearch.ensemble.model import PathEnsembleViT, create_path_vit
from pathsearch.ensemble.scoring import PathFeatures, cache_path_features, score_masks
from pathsearch.ensemble.supernet import sample_supernet_masks
from pathsearch.trial.proxy import ProxyScorer, fit_ensemble_scale
from pathsearch.trial.train import fit, load_checkpoint_model, load_trial_data

ROOT = Path(__file__).resolve().parents[1]
TWO_STAGE = ROOT / "search_spaces" / "digits_two_stage.yaml"
# digits, depth 2: a trial takes a few seconds; enough training that configurations differ in accuracy
SMALL = ["model.kwargs.depth=2", "train.epochs=6", "train.eval_every=3", "train.warmup_epochs=0", "train.lr=3.0e-3"]
TOP_K = 3
SUPERNET_EPOCHS = 12


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, metrics, checkpoint_dir) -> None:
        self.calls.append(dict(metrics))


# ----- the supernet ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["kept_count", "bernoulli", "shortest"])
def test_supernet_masks_hold_the_full_and_a_minimal_mask_then_random_ones(distribution):
    cfg = SupernetConfig(enabled=True, masks_per_batch=6, distribution=distribution, keep_prob=0.3, min_kept=2)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_supernet_masks(13, cfg, gen) for _ in range(400)])  # (400, 6, 13)
    assert draws.dtype == torch.bool and draws.shape == (400, 6, 13)
    assert draws[:, 0].all()  # the full mask, every batch
    assert (draws[:, 1].sum(-1) == 2).all()  # a minimal one: min_kept paths
    random = draws[:, 2:].reshape(-1, 13)
    assert (random.sum(-1) >= 2).all()
    if distribution == "shortest":  # the k shortest pruned: every mask is a suffix
        assert all(row[row.nonzero().min() :].all() for row in random)
        assert draws[:, 1, -2:].all()
        assert len({tuple(r.tolist()) for r in random}) == 12  # 0 .. 11 shortest pruned, each turns up
        return
    if distribution == "bernoulli":
        assert random.float().mean().item() == pytest.approx(0.3, abs=0.03)
    else:  # kept_count: every size from min_kept to all paths turns up
        assert set(random.sum(-1).tolist()) == set(range(2, 14))
    assert len({tuple(r.tolist()) for r in random}) > 100  # not one mask over and over


def count_trunk_forwards(cfg, work_dir):
    """PatchEmbed forward calls during `fit` (one per trunk pass), counted with a global module hook."""
    from timm.layers import PatchEmbed

    count = 0

    def hook(module, args, output):
        nonlocal count
        count += isinstance(module, PatchEmbed)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    rec = Recorder()
    try:
        result = fit(cfg, rec, work_dir=work_dir, cpus=1)
    finally:
        handle.remove()
    return count, rec.calls, result


def test_supernet_training_shares_one_trunk_pass_per_batch_and_serves_submasks(tmp_path):
    base = ["model.kwargs.depth=2", "data.train_size=300", "train.epochs=8", "train.eval_every=4",
            "train.warmup_epochs=0", "train.lr=3.0e-3"]  # fmt: skip
    super_cfg = load_trial_config(TWO_STAGE, [*base, "train.supernet.enabled=true"])
    plain_cfg = load_trial_config(TWO_STAGE, base)
    super_passes, reports, result = count_trunk_forwards(super_cfg, tmp_path / "supernet")
    plain_passes, _, plain = count_trunk_forwards(plain_cfg, tmp_path / "plain")
    # 4 masks per batch, one trunk pass per batch: the same count as ordinary training
    assert super_passes == plain_passes > 0
    assert [m["epoch"] for m in reports] == [4, 8]
    assert all(math.isfinite(m["train_loss"]) and 0 <= m["val_acc"] <= 1 for m in reports)

    # The supernet copes with masks it was trained on: over random sub-masks it beats the ordinary model clearly.
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(64, 5, generator=gen) < 0.5
    masks[~masks.any(1), -1] = True
    accs = [ProxyScorer.from_checkpoint(r.checkpoint_dir).score(masks).acc.mean().item() for r in (result, plain)]
    assert accs[0] > accs[1] + 0.05, accs


def test_supernet_resume_continues_exactly(tmp_path):
    tiny = ["data.name=synthetic", "model.kwargs.depth=2", "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2",
            "model.kwargs.patch_size=2", "train.warmup_epochs=0", "train.epochs=2", "train.supernet.enabled=true",
            "train.supernet.distribution=bernoulli"]  # fmt: skip
    cfg = load_trial_config(None, tiny)
    straight = fit(cfg, Recorder(), work_dir=tmp_path / "straight")
    first: list[str] = []

    class Stop(Exception):
        pass

    def stop(metrics, checkpoint_dir):
        first.append(checkpoint_dir)
        raise Stop

    with pytest.raises(Stop):
        fit(cfg, stop, work_dir=tmp_path / "part")
    resumed = fit(cfg, Recorder(), checkpoint_dir=first[0], work_dir=tmp_path / "resumed")
    a = load_file(str(straight.checkpoint_dir / "model_0.safetensors"))
    b = load_file(str(resumed.checkpoint_dir / "model_0.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the mask sampler's state came back with the checkpoint


# ----- proxy scores from cached features --------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize("kind", ["scalar", "vector"])
def test_cached_scores_equal_the_models_own_forward_for_masks_and_scales(pool, kind, image_loader):
    model = PathEnsembleViT(tiny_timm_vit(global_pool=pool), PathConfig(ensemble_scale=EnsembleScaleConfig(kind=kind)))
    randomize_norms(model)
    with torch.no_grad():
        model.ensemble_scale.uniform_(0.5, 1.5)
    model.eval()
    cached = cache_path_features(model, image_loader)
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(12, model.num_paths, generator=gen) < 0.6
    masks[:, -1] = True
    factors = torch.exp(torch.randn(12, model.num_paths, generator=gen, dtype=torch.float64))
    scores = score_masks(model, cached, masks=masks, factors=factors)
    learned = model.ensemble_scale.detach().clone()
    images = torch.cat([x for x, _ in image_loader])
    for k in range(len(masks)):
        model.set_path_mask(masks[k])
        with torch.no_grad():
            model.ensemble_scale.copy_(learned * factors[k, :, None].float())
            logits = model(images)
        acc = (logits.argmax(-1) == cached.labels).double().mean().item()
        loss = torch.nn.functional.cross_entropy(logits.double(), cached.labels).item()
        assert scores.acc[k].item() == acc
        assert scores.loss[k].item() == pytest.approx(loss, rel=1e-4)


def test_bad_supernet_and_two_stage_settings_name_file_key_and_value(tmp_path):
    with pytest.raises(ConfigError) as info:
        bad = ["train.supernet.masks_per_batch=1", "train.supernet.keep_prob=0.0", "train.supernet.min_kept=20",
               "train.supernet.distribution=gaussian"]  # fmt: skip
        load_trial_config(TWO_STAGE, bad)
    text = str(info.value)
    assert f"{TWO_STAGE}: train.supernet.masks_per_batch: must be >= 2" in text and "got 1" in text
    assert "train.supernet.keep_prob: must be in (0, 1], got 0.0" in text
    assert "train.supernet.min_kept: must be <= 13" in text and "got 20" in text
    assert "train.supernet.distribution: expected one of" in text and "'gaussian'" in text
    with pytest.raises(ConfigError) as info:
        load_search_file(TWO_STAGE, ["space.train.lr.low=1.0e-4", "space.train.lr.high=1.0e-3",
                                     "model.ensemble_scale.scope=both", "search.two_stage.top_k=0"])  # fmt: skip
    text = str(info.value)
    assert "search.two_stage.top_k: must be >= 1, got 0" in text
    scales = "space.model.ensemble_scale.init={by: one, low: 0.1, high: 1.0}"
    with pytest.raises(ConfigError) as info:
        load_search_file(TWO_STAGE, ["space.train.lr.low=1.0e-4", "space.train.lr.high=1.0e-3", scales,
                                     "model.ensemble_scale.scope=both"])  # fmt: skip
    text = str(info.value)
    assert "space.train.lr: a two_stage search scores only model.pruned and model.ensemble_scale.init" in text
    assert "model.ensemble_scale.scope: a two_stage search of EnsembleScale needs scope 'ensemble'" in text
    with pytest.raises(ConfigError, match=r"search\.metric: a two_stage search ranks by one metric"):
        load_search_file(TWO_STAGE, ["search.metric=kept_paths", "search.mode=min"])
    # masks act on the ensemble sum only: with scope `both` they can still be scored
    assert load_search_file(TWO_STAGE, ["model.ensemble_scale.scope=both"]).search.strategy == "two_stage"
    # the same file with strategy full takes any space, as before
    assert load_search_file(TWO_STAGE, ["search.strategy=full", "space.train.lr.low=1.0e-4",
                                        "space.train.lr.high=1.0e-3"]).search.strategy == "full"  # fmt: skip


# ----- the two-stage search, end to end through the CLI -----------------------------------------------------------
def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pathsearch.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    """`pathsearch search` on the shipped two-stage file, made small, as the README gives it."""
    root = tmp_path_factory.mktemp("two_stage")
    scales = "space.model.ensemble_scale.init={by: group, low: 0.1, high: 1.0, log: true}"  # scored as values
    small = [*SMALL, scales, "search.two_stage.proxy_trials=3000", f"search.two_stage.top_k={TOP_K}",
             f"search.two_stage.supernet_epochs={SUPERNET_EPOCHS}", "search.two_stage.supernet_cpus=1",
             "search.confirm.seeds=2"]  # fmt: skip
    uri = f"sqlite:///{root / 'mlflow.db'}"
    sets = [a for s in small for a in ("--set", s)]
    result = cli("search", str(TWO_STAGE), *sets, "--storage-path", "runs", "--tracking-uri", uri, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("digits_two_stage")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return {"root": root, "uri": uri, "stdout": result.stdout, "client": client, "runs": runs}


def test_two_stage_search_records_supernet_proxy_table_top_k_trials_and_ranking(two_stage):
    client, runs = two_stage["client"], two_stage["runs"]
    parents = [r for r in runs if r.data.tags.get("pathsearch.kind") == "search"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # everything hangs under the one parent run: directly, or (confirmation seeds) under a configuration's run
    grand = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in {c.info.run_id for c in children}]
    assert len(children) + len(grand) == len(runs) - 1
    assert all(r.data.tags.get("pathsearch.search") == parent.info.run_id for r in grand)
    role = {r.info.run_id: r.data.tags.get("pathsearch.role") for r in children}

    supernet = [r for r in children if role[r.info.run_id] == "supernet"]
    assert len(supernet) == 1 and supernet[0].info.status == "FINISHED"
    assert supernet[0].data.params["config.train.supernet.enabled"] == "True"
    history = client.get_metric_history(supernet[0].info.run_id, "val_acc")
    assert [m.step for m in history] == list(range(3, SUPERNET_EPOCHS + 1, 3))  # tracked like any trial
    supernet_inputs = client.get_run(supernet[0].info.run_id).inputs.dataset_inputs  # it never reads test
    assert sorted(i.tags[0].value for i in supernet_inputs) == ["train", "validation"]

    # stage 1 in aggregate: one table of every evaluation on the parent, not one run each
    table = client.download_artifacts(parent.info.run_id, "proxy_scores.csv", str(two_stage["root"]))
    rows = list(csv.DictReader(io.StringIO(Path(table).read_text())))
    assert len(rows) == 3000 and {"proxy_val_acc", "prune.embed", "ensemble_scale.init.attn"} <= set(rows[0])
    assert parent.data.metrics["proxy_evaluations"] + parent.data.metrics["proxy_infeasible"] == 3000
    proxies = sorted((r for r in children if role[r.info.run_id] == "proxy"), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in proxies] == [f"proxy top {k}" for k in range(1, TOP_K + 1)]
    scores = [r.data.metrics["proxy_val_acc"] for r in proxies]
    assert scores == sorted(scores, reverse=True)
    scored = max(float(r["proxy_val_acc"]) for r in rows if r["state"] == "COMPLETE")
    assert scores[0] == pytest.approx(scored)  # the best of the table is top 1
    for run in proxies:
        assert "path_config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]

    # stage 2 is the confirmation: the baseline plus the top-k, each on the same 2 seeds, trained to the end
    assert not [r for r in children if role[r.info.run_id] is None]  # no single-seed stage-2 trials any more
    configs = [r for r in children if role[r.info.run_id] == "confirmation"]
    assert len(configs) == TOP_K + 1 and all(r.info.status == "FINISHED" for r in configs)
    labels = sorted(r.data.tags["pathsearch.candidate"] for r in configs)
    assert labels == ["baseline", *(f"top {k}" for k in range(1, TOP_K + 1))]
    baseline = next(r for r in configs if r.data.tags["pathsearch.candidate"] == "baseline")
    assert baseline.data.params["config.model.pruned"] == "[]"  # nothing pruned
    for config in configs:
        seeds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == config.info.run_id]
        assert sorted(r.data.tags["pathsearch.seed"] for r in seeds) == ["1", "2"]
        assert all(r.info.status == "FINISHED" and "test_acc" in r.data.metrics for r in seeds)
        for seed_run in seeds:  # each split it read, as an MLflow dataset input: the runs page's Dataset column
            inputs = client.get_run(seed_run.info.run_id).inputs.dataset_inputs
            contexts = {i.tags[0].value: i.dataset for i in inputs}
            assert sorted(contexts) == ["test", "train", "validation"], contexts
            assert contexts["validation"].name == "digits-validation" and len(contexts["validation"].digest) == 16
            assert json.loads(contexts["train"].profile)["num_rows"] > 0
    confirmed_params = [{k: v for k, v in r.data.params.items() if k.startswith("config.")} for r in configs]
    proxy_params = [{k: v for k, v in r.data.params.items() if k.startswith("config.")} for r in proxies]
    for params in proxy_params:  # each top-k configuration was confirmed, with the very same overrides
        assert params in confirmed_params

    # ranking quality on the parent: each configuration's proxy score against its mean val_acc over its seed runs,
    # recomputed here with scipy from what those runs logged
    from scipy.stats import kendalltau, spearmanr

    proxy, confirmed = [], []
    for config in configs:
        seeds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == config.info.run_id]
        proxy.append(config.data.metrics["search_proxy_val_acc"])
        confirmed.append(sum(r.data.metrics["val_acc"] for r in seeds) / len(seeds))
        assert config.data.metrics["val_acc_mean"] == pytest.approx(confirmed[-1])
    for run, params in zip(proxies, proxy_params, strict=True):  # a proxy run's confirmed mean: its configuration's
        own = configs[confirmed_params.index(params)]
        assert run.data.metrics["proxy_val_acc"] == own.data.metrics["search_proxy_val_acc"]
        assert run.data.metrics["confirmed_val_acc_mean"] == pytest.approx(own.data.metrics["val_acc_mean"])
    tau, rho = kendalltau(proxy, confirmed), spearmanr(proxy, confirmed)
    m = parent.data.metrics
    assert m["proxy_ranked_configurations"] == len(proxy) == TOP_K + 1
    assert (m["proxy_kendall_tau"], m["proxy_kendall_p_value"]) == pytest.approx((tau.statistic, tau.pvalue))
    assert (m["proxy_spearman_rho"], m["proxy_spearman_p_value"]) == pytest.approx((rho.statistic, rho.pvalue))
    assert "pathsearch.verdict" in parent.data.tags
    assert "Kendall tau" in two_stage["stdout"] and "stage 1: 3000 configurations scored" in two_stage["stdout"]
    assert two_stage["stdout"].strip().splitlines()[-1].startswith("verdict: ")


def test_two_stage_killed_in_stage_1_resumes_the_supernet_to_the_same_proxy_ranking(two_stage, tmp_path):
    """kill -9 of the driver (its whole session) while the supernet trains, then `pathsearch resume`: the supernet
    continues from its last checkpoint (no epoch reported twice) and stage 1 scores exactly what the uninterrupted
    search of the same seed scored (the `two_stage` fixture: the same stage-1 settings; cheaper stage-2 ones)."""
    import signal
    import time

    scales = "space.model.ensemble_scale.init={by: group, low: 0.1, high: 1.0, log: true}"
    small = [*SMALL, "train.epochs=3", scales, "search.two_stage.proxy_trials=3000", "search.two_stage.top_k=1",
             f"search.two_stage.supernet_epochs={SUPERNET_EPOCHS}", "search.two_stage.supernet_cpus=1",
             "search.confirm.seeds=2"]  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "pathsearch.cli", "search", str(TWO_STAGE), *[a for x in small for a in ("--set", x)]]
    args += ["--storage-path", "runs", "--tracking-uri", uri, "--name", "crash"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    supernet = tmp_path / "runs" / "crash" / "supernet"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:  # Tune's snapshot names a checkpoint
            if any("checkpoint_00000" in f.read_text() for f in supernet.glob("experiment_state*.json")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the search ended before it could be killed"
        assert not (tmp_path / "runs" / "crash" / "oneshot_stage1.json").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed = cli("resume", "runs/crash", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    epochs = [json.loads(line)["epoch"] for f in supernet.glob("*/result.json") for line in f.read_text().splitlines()]
    # continued from a checkpoint, not trained again (an epoch reported after the last snapshot is reported again)
    assert epochs.count(3) == 1 and sorted(set(epochs)) == list(range(3, SUPERNET_EPOCHS + 1, 3)), epochs
    (straight,) = (two_stage["root"] / "runs").glob("digits_two_stage*")
    for name in ("proxy_scores.csv",):
        assert (tmp_path / "runs" / "crash" / name).read_text() == (straight / name).read_text()
    top = yaml.safe_load((tmp_path / "runs" / "crash" / "proxy_top.yaml").read_text())["top"]
    assert top[0] == yaml.safe_load((straight / "proxy_top.yaml").read_text())["top"][0]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("digits_two_stage").experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    supernets = [r for r in runs if r.data.tags.get("pathsearch.role") == "supernet"]
    assert len(supernets) == 1 and supernets[0].info.status == "FINISHED"  # the one supernet run, continued
    history = client.get_metric_history(supernets[0].info.run_id, "val_acc")
    assert [m.step for m in history] == list(range(3, SUPERNET_EPOCHS + 1, 3))


def test_export_returns_the_confirmed_winner_never_the_supernet(two_stage):
    root, runs = two_stage["root"], two_stage["runs"]
    out = root / "best.yaml"
    result = cli("export", "--experiment", "digits_two_stage", "--tracking-uri", two_stage["uri"], "--out", str(out),
                 cwd=root)  # fmt: skip
    assert result.returncode == 0, result.stderr
    configs = [r for r in runs if r.data.tags.get("pathsearch.role") == "confirmation"]
    parent = next(r for r in runs if r.data.tags.get("pathsearch.kind") == "search")
    winner = parent.data.tags["pathsearch.confirmed_run"]  # what the confirmation recorded as its winner
    config = PathConfig.load(out)
    assert config.depth == 2 and config.provenance["configuration_run_id"] == winner
    assert winner in {r.info.run_id for r in configs}  # a confirmed configuration: never the supernet or a proxy run
    assert "confirmed winner" in result.stdout


# ----- post-hoc EnsembleScale fitting ------------------------------------------------------------------------------
def scored_by_hand(model, features, labels, keep, factors, images):
    """Accuracy and mean cross-entropy of the ensemble sum_i keep_i factor_i s_i f_i on `images`, in float64,
    through the model's own norm and head (no scoring code of the product)."""
    m = copy.deepcopy(model).double().eval()
    weights = torch.tensor(keep, dtype=torch.float64) * torch.tensor(factors, dtype=torch.float64)  # (P,)
    with torch.no_grad():
        z = (weights[:, None, None] * m.ensemble_scale[:, None, :] * features[:, images].double()).sum(0)  # (B, D)
        logits = m.forward_head(z)
    y = labels[images]
    return (logits.argmax(-1) == y).double().mean().item(), F.cross_entropy(logits, y).item()


@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_scales_weights_up_the_informative_path_and_reports_what_it_fitted(prune, seed):
    """Known answer: attn.1 carries the class (the head reads class templates), the other kept paths carry large
    label-free noise. The fit must weight attn.1 up against the noise paths and so gain accuracy on both splits;
    every reported accuracy and loss is the one recomputed by hand from the returned factors, mask and split."""
    model = PathEnsembleViT(tiny_timm_vit(seed=seed), PathConfig(pruned=["embed"]))  # 7 paths, embed pruned
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(5, 32, generator=gen)
    templates -= templates.mean(1, keepdim=True)  # what the LayerNorm leaves of them
    with torch.no_grad():  # an identity norm and a head that scores the templates
        model.vit.norm.weight.fill_(1.0)
        model.vit.norm.bias.zero_()
        model.vit.head.weight.copy_(templates)
        model.vit.head.bias.zero_()
    labels = torch.randint(0, 5, (200,), generator=gen)
    features = 2.5 * torch.randn(model.num_paths, 200, 32, generator=gen)  # noise on every path ...
    features[1] = templates[labels] + 1.3 * torch.randn(200, 32, generator=gen)  # ... but attn.1: its class too
    result = fit_ensemble_scale(model, PathFeatures(features, labels), steps=100, prune=prune, seed=seed)
    m = result.metrics
    assert m["fit_images"] == 100 and m["val_images"] == 100 and len(set(result.fit_indices)) == 100
    held = sorted(set(range(200)) - set(result.fit_indices))
    start = [1.0] * model.num_paths
    for split, images in (("fit_split", result.fit_indices), ("val", held)):
        acc, loss = scored_by_hand(model, features, labels, model.path_mask, start, images)
        assert (m[f"{split}_acc_before"], m[f"{split}_loss_before"]) == pytest.approx((acc, loss), rel=1e-6, abs=1e-9)
        acc, loss = scored_by_hand(model, features, labels, result.keep, result.factors, images)
        assert (m[f"{split}_acc_after"], m[f"{split}_loss_after"]) == pytest.approx((acc, loss), rel=1e-6, abs=1e-9)
        assert m[f"{split}_acc_after"] > m[f"{split}_acc_before"] + 0.25, (split, m)  # measured: +0.39 or more
    noise = [f for i, f in enumerate(result.factors) if i > 1 and result.keep[i]]
    assert all(result.factors[1] > 3 * f for f in noise), result.factors  # attn.1 against every noise path: 4x+
    assert result.keep[0] is False and result.keep[1] is True  # a pruned path stays pruned; the informative one stays
    assert sum(result.keep) == model.num_paths - 1 if not prune else sum(result.keep) < model.num_paths - 1


def test_export_registers_the_confirmed_winner_loadable_by_pyfunc_through_a_tracking_server(two_stage, tmp_path):
    """`export --register NAME` against a real `mlflow server` (SQLite database store): a new version of NAME per
    call, tagged with the winner's provenance and verdict, that `mlflow.pyfunc.load_model` loads (models from code:
    no pickle) and that gives the logits of `create_path_vit` + the exported safetensors."""
    import shutil
    import signal

    import mlflow

    from pathsearch.ui import ui_command

    shutil.copy(two_stage["root"] / "mlflow.db", tmp_path / "mlflow.db")  # the fixture's store, left as it was
    port = _free_port()
    cmd, env = ui_command(f"sqlite:///{tmp_path / 'mlflow.db'}", port)
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(server, uri, tmp_path / "server.log")
        out = tmp_path / "best.yaml"
        export = ["export", "--experiment", "digits_two_stage", "--out", str(out), "--tracking-uri", uri]
        first = cli(*export, "--with-weights", "--register", "path-vit", cwd=tmp_path)
        assert first.returncode == 0, first.stderr[-3000:]
        assert "registered: model 'path-vit' version 1" in first.stdout and first.stderr == "", first.stderr
        second = cli(*export, "--register", "path-vit", cwd=tmp_path)  # without --with-weights: fetched for it
        assert second.returncode == 0 and "registered: model 'path-vit' version 2" in second.stdout, second.stderr

        client = MlflowClient(uri)
        version = client.get_model_version("path-vit", "1")
        provenance = PathConfig.load(out).provenance
        assert version.tags["pathsearch.verdict"] == provenance["verdict"] == version.description
        assert version.tags["pathsearch.search_run_id"] == provenance["search_run_id"]
        assert version.tags["pathsearch.seed_run_id"] == provenance["seed_run_id"]
        assert version.run_id == provenance["seed_run_id"]  # linked to the run that trained these weights
        model = client.get_logged_model(version.source.removeprefix("models:/"))
        assert model.source_run_id == provenance["seed_run_id"] and model.name == "path_vit"
        before = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:
            loaded = mlflow.pyfunc.load_model("models:/path-vit/1")
            local = Path(mlflow.artifacts.download_artifacts("models:/path-vit/1", dst_path=str(tmp_path / "model")))
        finally:
            mlflow.set_tracking_uri(before)
        names = {f.name for f in local.rglob("*") if f.is_file()}
        assert {"MLmodel", "best.yaml", "best.safetensors"} <= names, names  # the exported files, as they are
        assert not [n for n in names if n.endswith((".pkl", ".pickle", ".pt", ".pth"))], names  # no pickled model
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    rebuilt = create_path_vit(path_config=PathConfig.load(out))
    rebuilt.load_state_dict(load_file(str(out.with_suffix(".safetensors"))))
    rebuilt.eval()
    images = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = rebuilt(images).numpy()
    got = loaded.predict(images.numpy())
    assert got.shape == expected.shape and (got == expected).all()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fit_scales_cli_logs_a_child_run_whose_files_give_its_accuracy(two_stage):
    client, runs, root = two_stage["client"], two_stage["runs"], two_stage["root"]
    trials = [r for r in runs if r.data.tags.get("pathsearch.role") == "confirmation_seed"]
    source = max(trials, key=lambda r: r.data.metrics["val_acc"])  # one seed's model of a confirmed configuration
    result = cli("fit-scales", "--run-id", source.info.run_id, "--tracking-uri", two_stage["uri"], "--prune",
                 "--out", str(root / "fitted"), "--threads", "1", cwd=root)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation split" in result.stdout
    children = client.search_runs(
        [source.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{source.info.run_id}'"
    )
    assert len(children) == 1
    child = children[0]
    assert child.info.status == "FINISHED" and child.data.tags["pathsearch.role"] == "fit_scales"
    m = child.data.metrics
    assert m["val_acc_before"] * m["val_images"] + m["fit_split_acc_before"] * m["fit_images"] == pytest.approx(
        source.data.metrics["val_acc"] * (m["val_images"] + m["fit_images"])
    )  # the starting point is the trained run itself
    assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"path_config.yaml", "model_0.safetensors"}
    assert f"new child run {child.info.run_id}" in result.stdout

    # the logged PathConfig and weights are the fitted model: their accuracy over the whole validation split is the
    # image-weighted mean of what the run reports for its two parts
    folder = root / "logged"
    config = PathConfig.load(client.download_artifacts(child.info.run_id, "path_config.yaml", str(folder)))
    model = create_path_vit(path_config=config)
    model.load_state_dict(load_file(client.download_artifacts(child.info.run_id, "model_0.safetensors", str(folder))))
    model.eval()
    assert [n for n, k in zip(model.path_names, model.path_mask, strict=True) if not k] == config.pruned
    cfg = load_trial_config(TWO_STAGE, SMALL)
    correct, total = 0, 0
    with torch.no_grad():
        for x, y in DataLoader(load_trial_data(cfg).val, batch_size=512):
            correct += (model(x).argmax(-1) == y).sum().item()
            total += len(y)
    expected = m["val_acc_after"] * m["val_images"] + m["fit_split_acc_after"] * m["fit_images"]
    assert correct == pytest.approx(expected, abs=1e-6) and total == m["val_images"] + m["fit_images"]

    # and split by split: before (the source run's own files) and after (the logged fitted files), each accuracy
    # recomputed on the documented split: a permutation seeded with --seed (0 here), its first half fitted on
    source_files = {name: client.download_artifacts(source.info.run_id, name, str(root / "source"))
                    for name in ("path_config.yaml", "model_0.safetensors")}  # fmt: skip
    before = create_path_vit(path_config=PathConfig.load(source_files["path_config.yaml"]))
    before.load_state_dict(load_file(source_files["model_0.safetensors"]))
    x, y = map(torch.cat, zip(*DataLoader(load_trial_data(cfg).val, batch_size=512), strict=True))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    splits = {"fit_split": order[: round(0.5 * len(y))], "val": order[round(0.5 * len(y)) :]}
    assert (len(splits["fit_split"]), len(splits["val"])) == (m["fit_images"], m["val_images"])
    for when, net in (("before", before.eval()), ("after", model)):
        with torch.no_grad():
            right = net(x).argmax(-1) == y
        for split, images in splits.items():
            assert m[f"{split}_acc_{when}"] == pytest.approx(right[images].double().mean().item(), abs=1e-9), split


def test_checkpoint_model_is_rebuilt_with_its_trained_weights(tmp_path):
    cfg = load_trial_config(TWO_STAGE, [*SMALL, "train.epochs=1", "train.eval_every=1"])
    result = fit(cfg, Recorder(), work_dir=tmp_path)
    model, loaded = load_checkpoint_model(result.checkpoint_dir)
    assert loaded == cfg and not model.training
    saved = load_file(str(result.checkpoint_dir / "model_0.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert yaml.safe_load((result.checkpoint_dir / "path_config.yaml").read_text())["depth"] == 2


def test_fit_scales_refuses_scales_that_also_change_the_trunk(tmp_path):
    """With scope `both` the scales multiply each path inside the trunk too, so a fit on cached path features would
    write a model that does not compute what was scored: refused, naming the file and the setting."""
    from safetensors.torch import save_file

    from pathsearch.trial.proxy import fit_scales_of_files

    config = PathConfig(model_name="vit_tiny_patch16_224", model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2,
                        "img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10},
                        ensemble_scale=EnsembleScaleConfig(kind="vector", scope="both", init=0.5))  # fmt: skip
    model = create_path_vit(path_config=config)
    path = model.path_config.save(tmp_path / "path_config.yaml")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model_0.safetensors"))
    cfg = load_trial_config(None, data={"data": {"name": "digits"}})
    with pytest.raises(ValueError, match="scope is 'both'"):
        fit_scales_of_files(path, tmp_path / "model_0.safetensors", cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    config.ensemble_scale.scope = "ensemble"  # the same run with scope `ensemble` is fitted
    create_path_vit(path_config=config).path_config.save(path)
    fit, files = fit_scales_of_files(path, tmp_path / "model_0.safetensors", cfg, tmp_path / "out", steps=5)
    assert files["weights"].is_file() and len(fit.factors) == 5
