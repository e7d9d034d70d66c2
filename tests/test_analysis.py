from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_norms, tiny_timm_vit

from pathsearch.config.paths import EnsembleScaleConfig, PathConfig
from pathsearch.ensemble.analysis import PathAnalysis, analyze_paths
from pathsearch.ensemble.model import PathEnsembleViT
from pathsearch.ensemble.scoring import cache_path_features, evaluate_masks, mask_predictions

POOLS = {"token": {}, "avg": {"global_pool": "avg"}, "tokens": {"global_pool": "map"}}


def make_model(pool: str, pruned=(), kind="vector", seed=0) -> PathEnsembleViT:
    vit = tiny_timm_vit(seed=seed, **POOLS[pool])
    randomize_norms(vit, seed)
    model = PathEnsembleViT(vit, PathConfig(pruned=list(pruned), ensemble_scale=EnsembleScaleConfig(kind=kind)))
    with torch.no_grad():  # non-trivial, per-path EnsembleScale
        model.ensemble_scale.copy_(
            0.5 + torch.rand(model.ensemble_scale.shape, generator=torch.Generator().manual_seed(seed))
        )
    assert model.pool_mode == pool
    return model.eval()


def naive_analysis(model: PathEnsembleViT, loader) -> dict[str, float | None]:
    """Re-runs the whole model once per lesioned mask (Veit et al. style): P trunk passes per quantity."""
    base = model.path_mask
    out: dict[str, float | None] = {}

    def accuracy(mask):
        if not any(mask):
            return None
        model.set_path_mask(mask)
        correct = total = 0
        with torch.no_grad():
            for x, y in loader:
                correct += (model(x).argmax(-1) == y).sum().item()
                total += len(y)
        return correct / total

    out["full"] = accuracy(base)
    for i in range(model.num_paths):
        out[f"single:{i}"] = accuracy([j == i for j in range(model.num_paths)])
        out[f"loo:{i}"] = accuracy([k and j != i for j, k in enumerate(base)])
        out[f"prefix:{i}"] = accuracy([k and j <= i for j, k in enumerate(base)])
    model.set_path_mask(base)
    return out


@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("pruned", [(), ("embed", "mlp.2")], ids=["unpruned", "pruned"])
def test_one_pass_analysis_equals_naive_rerun_loop(pool, pruned, image_loader):
    model = make_model(pool, pruned)
    analysis = analyze_paths(model, image_loader)
    naive = naive_analysis(model, image_loader)
    assert analysis.full_acc == pytest.approx(naive["full"])
    assert analysis.num_images == 40
    for i, row in enumerate(analysis.rows):
        assert row.path == model.path_names[i]
        assert row.kept == (row.path not in pruned)
        assert row.single_acc == pytest.approx(naive[f"single:{i}"])
        for key in ("loo", "prefix"):
            got, want = getattr(row, f"{key}_acc"), naive[f"{key}:{i}"]
            assert (got is None) == (want is None), (key, i)
            if got is not None:
                assert got == pytest.approx(want), (key, i)
    if pruned:
        assert analysis.rows[0].prefix_acc is None  # embed pruned: the 1-path prefix is empty


def test_analysis_runs_one_trunk_forward_per_batch(image_loader):
    model = make_model("token")
    calls = []
    model.vit.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    analyze_paths(model, image_loader)
    assert len(calls) == len(image_loader)  # 3 batches, 22 masks scored on each


@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("kind", ["scalar", "vector"])
def test_evaluate_masks_equals_model_with_each_mask(pool, kind, image_loader):
    model = make_model(pool, kind=kind, seed=3)
    cached = cache_path_features(model, image_loader)
    expected_shape = (7, 40, 32) if pool != "tokens" else (7, 40, 17, 32)
    assert tuple(cached.features.shape) == expected_shape
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(25, model.num_paths, generator=gen) < 0.6
    masks[:, -1] = True  # no empty rows
    masks[0] = True
    acc = evaluate_masks(model, cached, masks=masks)
    preds = torch.cat([p for _, p in mask_predictions(model, cached.features, masks)])
    x = torch.cat([b[0] for b in image_loader])
    for k, mask in enumerate(masks):
        model.set_path_mask(mask)
        with torch.no_grad():
            model_preds = model(x).argmax(-1)
        assert torch.equal(preds[k], model_preds), k
        assert acc[k].item() == pytest.approx((model_preds == cached.labels).float().mean().item())


def test_evaluate_masks_scores_other_ensemble_scale_values(image_loader):
    model = make_model("token", seed=4)
    cached = cache_path_features(model, image_loader)
    new_scales = torch.rand(model.ensemble_scale.shape, generator=torch.Generator().manual_seed(9)) * 2
    masks = torch.ones(1, model.num_paths, dtype=torch.bool)
    preds = next(mask_predictions(model, cached.features, masks, scales=new_scales))[1][0]
    with torch.no_grad():
        model.ensemble_scale.copy_(new_scales)
        x = torch.cat([b[0] for b in image_loader])
        assert torch.equal(preds, model(x).argmax(-1))


def test_evaluate_masks_rejects_bad_masks(image_loader):
    model = make_model("token")
    cached = cache_path_features(model, image_loader)
    with pytest.raises(ValueError, match="keep no path"):
        evaluate_masks(model, cached, masks=torch.zeros(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(K, 7\)"):
        evaluate_masks(model, cached, masks=torch.ones(2, 5, dtype=torch.bool))


def test_analysis_serialises_to_json_and_draws_png(image_loader, tmp_path):
    model = make_model("avg", pruned=("attn.1",))
    analysis = analyze_paths(model, image_loader)
    json_path = analysis.save_json(tmp_path / "a.json")
    data = json.loads(json_path.read_text())
    assert [r["path"] for r in data["rows"]] == model.path_names
    for row in data["rows"]:
        for key in ("single_acc", "loo_acc", "prefix_acc"):
            assert row[key] is None or 0.0 <= row[key] <= 1.0
    assert PathAnalysis.load_json(json_path) == analysis
    png = analysis.plot(tmp_path / "a.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000
    assert "attn.1" in analysis.format_table()
