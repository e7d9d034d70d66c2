from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, tiny_timm_vit

from pathsearch.config.paths import (
    DistillConfig,
    EnsembleScaleConfig,
    PathConfig,
    parse_mask,
    path_names,
    resolve_scale_init,
    select_paths,
    student_indices,
)
from pathsearch.ensemble.model import PathEnsembleViT, create_path_vit


def test_select_paths_understands_groups_ranges_and_names():
    assert select_paths("embed", 4) == [0]
    assert select_paths("attn", 3) == [1, 3, 5]
    assert select_paths("mlp", 3) == [2, 4, 6]
    assert select_paths("attn.2", 3) == [3]
    assert select_paths("mlp.2-3", 3) == [4, 6]
    assert select_paths("layers.1-2", 3) == [1, 2, 3, 4]
    assert select_paths("layer.3", 3) == [5, 6]
    assert select_paths("all", 2) == [0, 1, 2, 3, 4]
    for bad in ("attn.0", "mlp.4", "layers", "layers.3-1", "ffn", "attn.x"):
        with pytest.raises(ValueError, match="selector"):
            select_paths(bad, 3)


def test_scale_init_per_group_narrower_selector_wins():
    init = resolve_scale_init({"all": 0.5, "mlp": 0.1, "layer.2": 0.2, "attn.3": 2.0}, 3)
    names = path_names(3)
    got = dict(zip(names, init, strict=True))
    assert got == {"embed": 0.5, "attn.1": 0.5, "mlp.1": 0.1, "attn.2": 0.2, "mlp.2": 0.2, "attn.3": 2.0, "mlp.3": 0.1}
    assert resolve_scale_init(0.3, 2) == [0.3] * 5
    assert resolve_scale_init({"embed": 0.1}, 1) == [0.1, 1.0, 1.0]


def test_scale_init_ambiguous_same_width_selectors_are_refused():
    with pytest.raises(ValueError, match=r"attn\.2"):
        resolve_scale_init({"attn.2-3": 0.1, "layer.2": 0.2}, 3)


def test_model_applies_per_group_scale_init():
    cfg = PathConfig(ensemble_scale=EnsembleScaleConfig(kind="vector", init={"embed": 0.01, "attn": 0.1, "mlp": 1.0}))
    model = PathEnsembleViT(tiny_timm_vit(), cfg)
    assert torch.allclose(model.ensemble_scale[0], torch.full((32,), 0.01))
    assert torch.allclose(model.ensemble_scale[1::2], torch.full((3, 32), 0.1))
    assert torch.allclose(model.ensemble_scale[2::2], torch.ones(3, 32))


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_path_config_round_trip_is_lossless_and_rebuilds_the_model(tmp_path, suffix):
    cfg = PathConfig(
        pruned=["embed", "mlp.1"],
        ensemble_scale=EnsembleScaleConfig(kind="vector", scope="both", init={"attn": 0.1, "mlp": 0.05}),
        distill=DistillConfig(alpha=0.5, temperature=2.0, students=[3, "attn"]),
    )
    model = create_path_vit("vit_tiny_patch16_224", path_config=cfg, **TINY)
    with torch.no_grad():  # pretend training moved the scales to awkward float32 values
        model.ensemble_scale.add_(torch.randn(model.ensemble_scale.shape) * 1e-3)
    exported = model.path_config
    path = exported.save(tmp_path / f"best{suffix}")
    loaded = PathConfig.load(path)
    assert loaded == exported
    rebuilt = create_path_vit(path_config=loaded)
    assert torch.equal(rebuilt.ensemble_scale, model.ensemble_scale)
    assert rebuilt.path_mask == model.path_mask
    assert rebuilt.path_config == exported
    assert rebuilt.scale_config.scope == "both"
    assert rebuilt.distill == cfg.distill
    # Same weights + rebuilt configuration -> same function.
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_saved_yaml_is_readable(tmp_path):
    path = PathConfig(model_name="vit_tiny_patch16_224", depth=2, pruned=["embed"]).save(tmp_path / "c.yaml")
    text = path.read_text()
    assert "pruned:\n- embed" in text
    assert "kept:\n- attn.1" in text


# ----- bad input: ValueError naming the offending value ----------------------------------------------------
def test_mask_keeping_no_path_is_refused():
    model = PathEnsembleViT(tiny_timm_vit())
    with pytest.raises(ValueError, match="keeps no path"):
        model.set_path_mask([False] * 7)
    with pytest.raises(ValueError, match="keeps no path"):
        PathEnsembleViT(tiny_timm_vit(), PathConfig(pruned=path_names(3)))
    assert model.path_mask == [True] * 7  # nothing half-applied


def test_unknown_and_duplicated_path_names_are_refused():
    with pytest.raises(ValueError, match=r"'attn\.9'"):
        parse_mask({"attn.9": False}, 3)
    with pytest.raises(ValueError, match=r"'ffn\.1'"):
        PathEnsembleViT(tiny_timm_vit(), PathConfig(pruned=["ffn.1"]))
    with pytest.raises(ValueError, match=r"more than once: \['mlp.1'\]"):
        PathConfig(pruned=["mlp.1", "attn.1", "mlp.1"]).validate(3)


def test_mask_for_a_different_depth_is_refused():
    with pytest.raises(ValueError, match="9 entries but a depth-3 ViT has 7 paths"):
        PathEnsembleViT(tiny_timm_vit()).set_path_mask([True] * 9)
    with pytest.raises(ValueError, match="depth 5"):
        PathEnsembleViT(tiny_timm_vit(), PathConfig(depth=5))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scale_init_is_refused(bad):
    with pytest.raises(ValueError, match=str(bad)):
        PathEnsembleViT(tiny_timm_vit(), PathConfig(ensemble_scale=EnsembleScaleConfig(init=bad)))
    with pytest.raises(ValueError, match="'mlp'"):
        EnsembleScaleConfig(init={"mlp": bad}).validate()


def test_other_bad_settings_are_refused():
    with pytest.raises(ValueError, match="'matrix'"):
        EnsembleScaleConfig(kind="matrix").validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'trunk'"):
        EnsembleScaleConfig(scope="trunk").validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"-0\.5"):
        DistillConfig(alpha=-0.5, students=[1]).validate()
    with pytest.raises(ValueError, match="students"):
        DistillConfig(alpha=0.5).validate()
    with pytest.raises(ValueError, match="prefix length 7"):
        student_indices(7, 3)
    with pytest.raises(ValueError, match="'bogus'"):
        parse_mask([True, "bogus", True], 1)


def test_unknown_timm_model_is_refused():
    with pytest.raises(ValueError, match="'vit_does_not_exist'"):
        create_path_vit("vit_does_not_exist")


def test_load_errors_name_file_and_key(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("pruned: [embed]\nensemble_scale:\n  kind: scalar\n  inti: 0.1\n")
    with pytest.raises(ValueError, match=r"cfg.yaml.*ensemble_scale.inti"):
        PathConfig.load(path)
    path.write_text("ensemble_scale:\n  init: .nan\n")
    with pytest.raises(ValueError, match=r"cfg.yaml.*ensemble_scale.init.*nan"):
        PathConfig.load(path)
    path.write_text("depth: 1\npruned: [embed, attn.1, mlp.1]\n")
    with pytest.raises(ValueError, match=r"cfg.yaml.*keeps no path"):
        PathConfig.load(path)
    with pytest.raises(ValueError, match=r"\.txt"):
        PathConfig().save(tmp_path / "cfg.txt")
    with pytest.raises(ValueError, match=r"missing\.yaml"):
        PathConfig.load(tmp_path / "missing.yaml")
