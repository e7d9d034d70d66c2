from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY, tiny_timm_vit
from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock, ResPostBlock
from timm.optim import create_optimizer_v2

from pathsearch.config.paths import EnsembleScaleConfig, PathConfig
from pathsearch.ensemble.model import PathEnsembleViT, create_path_vit

# Each entry: (id, timm kwargs): the timm ViT variants whose path-ensemble view must equal timm's own forward.
EQUIVALENCE_CASES = [
    ("class_token_pool", {}),
    ("avg_pool_fc_norm", {"global_pool": "avg"}),
    ("avg_pool_no_fc_norm", {"global_pool": "avg", "fc_norm": False}),
    ("layerscale", {"init_values": 0.1}),
    ("register_tokens", {"reg_tokens": 4}),
    ("no_class_token", {"class_token": False, "global_pool": "avg"}),
    ("qk_norm", {"qk_norm": True}),
    ("post_norm_res_post_block", {"block_fn": ResPostBlock, "init_values": 0.5}),
    ("map_attention_pool", {"global_pool": "map"}),
    ("max_pool", {"global_pool": "max"}),
    ("no_embed_class_pre_norm", {"no_embed_class": True, "pre_norm": True}),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in EQUIVALENCE_CASES], ids=[c[0] for c in EQUIVALENCE_CASES])
def test_all_paths_on_matches_timm_logits(kwargs):
    vit = tiny_timm_vit(**kwargs).eval()
    model = PathEnsembleViT(vit).eval()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        diff = (model(x) - vit(x)).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_small_patch16_224"])
def test_named_model_through_create_path_vit_matches_timm(name):
    torch.manual_seed(0)
    model = create_path_vit(name, img_size=32, depth=2, num_classes=7).eval()
    assert model.path_names == ["embed", "attn.1", "mlp.1", "attn.2", "mlp.2"]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - model.vit(x)).abs().max().item() <= 1e-5


def test_drop_path_in_train_mode_gives_timm_output_for_same_rng():
    vit = tiny_timm_vit(drop_path_rate=0.3, attn_drop_rate=0.1, proj_drop_rate=0.1, pos_drop_rate=0.1).train()
    model = PathEnsembleViT(vit).train()
    x = torch.randn(8, 3, 16, 16)
    torch.manual_seed(123)
    expected = vit(x)
    torch.manual_seed(123)
    got = model(x)
    torch.manual_seed(124)
    other = model(x)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (other - expected).abs().max().item() > 1e-3  # drop-path really is random in train mode


def test_wrapper_shares_weights_with_the_timm_model():
    vit = tiny_timm_vit().eval()
    model = PathEnsembleViT(vit).eval()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    with torch.no_grad():
        vit.head.bias.add_(1.0)
    assert model.vit is vit
    assert torch.allclose(model(x), before + 1.0, atol=1e-5)


def test_pretrained_weights_load_through_create_path_vit(tmp_path):
    # timm's real pretrained loader, pointed at a local file (no downloads here).
    source = tiny_timm_vit(seed=5)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = create_path_vit("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **TINY)
    loaded = model.vit.state_dict()
    # timm keeps the backbone and, as for any fine-tuning with num_classes != the checkpoint's 1000, resets the head.
    for name, tensor in source.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(loaded[name], tensor), name
    assert not torch.equal(loaded["head.weight"], source.state_dict()["head.weight"])
    same_head = create_path_vit(
        "vit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path), "num_classes": TINY["num_classes"]},
        **TINY,
    )
    assert torch.equal(same_head.vit.head.weight, source.head.weight)
    assert "pretrained_cfg_overlay" not in model.path_config.model_kwargs


@pytest.mark.parametrize("block_fn", [ParallelScalingBlock, ParallelThingsBlock])
def test_non_additive_blocks_are_refused_naming_the_block_class(block_fn):
    vit = tiny_timm_vit(block_fn=block_fn)
    with pytest.raises(ValueError, match=block_fn.__name__):
        PathEnsembleViT(vit)


def test_non_vit_models_are_refused():
    with pytest.raises(ValueError, match="resnet18"):
        create_path_vit("resnet18", num_classes=5)
    with pytest.raises(ValueError, match="VisionTransformerDistilled"):
        create_path_vit("deit_tiny_distilled_patch16_224", img_size=32, depth=1)
    with pytest.raises(ValueError, match="vit_nonexistent_model"):
        create_path_vit("vit_nonexistent_model")
    with pytest.raises(ValueError, match="Sequential"):
        PathEnsembleViT(torch.nn.Sequential())


def test_path_names_are_embed_then_attn_and_mlp_per_block():
    model = PathEnsembleViT(tiny_timm_vit(depth=4))
    assert model.path_names == ["embed"] + [f"{k}.{layer}" for layer in range(1, 5) for k in ("attn", "mlp")]
    assert model.num_paths == 9


def test_pruned_path_still_feeds_the_trunk_but_not_the_ensemble():
    vit = tiny_timm_vit().eval()
    model = PathEnsembleViT(vit).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        trunk_full = vit.forward_features(x)
        paths_full = model.forward_paths(x)
        logits_full = model(x)
        model.set_path_mask({"embed": False, "attn.1": False, "mlp.2": False})
        paths_pruned = model.forward_paths(x)
        z = model.forward_ensemble(x)
        logits_pruned = model(x)
        trunk_pruned = vit.forward_features(x)
    # Trunk untouched: every path output (hence every later layer input) is the same.
    assert torch.equal(paths_pruned, paths_full)
    assert torch.equal(trunk_pruned, trunk_full)
    # Ensemble: exactly the sum of the kept paths.
    kept = torch.tensor(model.path_mask)
    assert model.path_mask == [False, False, True, True, False, True, True]
    assert torch.allclose(z, paths_full[kept].sum(0), atol=1e-6)
    assert not torch.allclose(logits_pruned, logits_full, atol=1e-3)


def test_set_path_mask_accepts_dict_sequence_and_tensor_and_reads_back():
    model = PathEnsembleViT(tiny_timm_vit())
    model.set_path_mask([True, False, True, True, True, True, False])
    assert model.path_mask == [True, False, True, True, True, True, False]
    assert model.kept_paths == 5
    model.set_path_mask(torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.bool))
    assert model.path_config.pruned == ["mlp.3"]
    model.set_path_mask({"attn.2": False})
    assert model.path_config.pruned == ["attn.2"]


def test_path_mask_survives_state_dict_round_trip():
    model = PathEnsembleViT(tiny_timm_vit())
    model.set_path_mask({"embed": False, "mlp.3": False})
    other = PathEnsembleViT(tiny_timm_vit(seed=1))
    other.load_state_dict(model.state_dict())
    assert other.path_mask == model.path_mask
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(other.eval()(x), model.eval()(x))


@pytest.mark.parametrize("kind", ["scalar", "vector"])
def test_gradients_reach_ensemble_scale_of_kept_paths_only(kind):
    cfg = PathConfig(pruned=["attn.2"], ensemble_scale=EnsembleScaleConfig(kind=kind, init=0.5))
    model = PathEnsembleViT(tiny_timm_vit(), cfg)
    assert model.ensemble_scale.shape == (7, 32 if kind == "vector" else 1)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grad = model.ensemble_scale.grad
    assert grad is not None
    per_path = grad.abs().sum(dim=1)
    assert (per_path[[0, 1, 2, 4, 5, 6]] > 0).all()
    assert per_path[3] == 0  # attn.2 is pruned: it never reaches the classifier


def test_scope_both_scales_the_trunk_and_is_timm_at_init_one():
    vit = tiny_timm_vit().eval()
    x = torch.randn(3, 3, 16, 16)
    both = PathEnsembleViT(vit, PathConfig(ensemble_scale=EnsembleScaleConfig(scope="both"))).eval()
    with torch.no_grad():
        assert (both(x) - vit(x)).abs().max() <= 1e-5
        paths_before = both.forward_paths(x)
        both.ensemble_scale[1] = 0.5  # attn.1 now enters the trunk at half strength
        paths_after = both.forward_paths(x)
    assert torch.equal(paths_after[:2], paths_before[:2])
    assert not torch.allclose(paths_after[2:], paths_before[2:])


def test_scale_scope_ensemble_leaves_trunk_alone():
    model = PathEnsembleViT(tiny_timm_vit()).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        before = model.forward_paths(x)
        model.ensemble_scale.fill_(0.3)
        assert torch.equal(model.forward_paths(x), before)


def test_ensemble_scale_is_excluded_from_weight_decay_by_timm_optimizer():
    model = PathEnsembleViT(tiny_timm_vit(), PathConfig(ensemble_scale=EnsembleScaleConfig(kind="vector")))
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = [g for g in opt.param_groups if g["weight_decay"] == 0.0]
    assert any(any(p is model.ensemble_scale for p in g["params"]) for g in no_decay)
    decay = [p for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert any(p is model.vit.blocks[0].attn.qkv.weight for p in decay)


def test_frozen_ensemble_scale_gets_no_gradient():
    cfg = PathConfig(ensemble_scale=EnsembleScaleConfig(learnable=False))
    model = PathEnsembleViT(tiny_timm_vit(), cfg)
    assert not model.ensemble_scale.requires_grad


def test_timm_accepts_the_wrapped_model_for_create_model_kwargs():
    # Ensures the timm name path records kwargs so that the model can be rebuilt.
    model = create_path_vit("vit_tiny_patch16_224", **TINY)
    assert model.path_config.model_name == "vit_tiny_patch16_224"
    assert model.path_config.model_kwargs == dict(TINY)
    rebuilt = create_path_vit(path_config=model.path_config)
    assert rebuilt.path_names == model.path_names
    assert timm.models.vision_transformer.VisionTransformer is type(rebuilt.vit)
