from __future__ import annotations

import pytest

from pathsearch.config import ConfigError, TrialConfig, apply_overrides, load_trial_config, to_dict

GOOD = """\
# run: pathsearch train this.yaml
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 6, embed_dim: 64, num_heads: 2, num_classes: 10}
  pos_embed_std: 1.0
  pruned: [embed, attn.1]
  ensemble_scale: {kind: vector, init: {attn: 0.1, mlp: 1e-2}}
data: {name: digits, train_size: 300}
train: {epochs: 3, lr: 1e-3}
search: {num_samples: 4}
"""


def test_loads_typed_sections_and_converts_yaml_floats(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(GOOD)
    cfg = load_trial_config(path)
    assert isinstance(cfg, TrialConfig)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # PyYAML reads 1e-3 as a string
    assert cfg.model.ensemble_scale.init == {"attn": 0.1, "mlp": 0.01}
    assert cfg.data.train_size == 300
    path_cfg = cfg.model.path_config()
    assert path_cfg.pruned == ["embed", "attn.1"] and path_cfg.model_kwargs["depth"] == 6
    assert to_dict(cfg)["train"]["epochs"] == 3


def test_dotted_overrides_use_the_same_keys(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(GOOD)
    cfg = load_trial_config(path, ["train.epochs=7", "model.ensemble_scale.init=0.1", "model.kwargs.depth=4"])
    assert cfg.train.epochs == 7
    assert cfg.model.ensemble_scale.init == 0.1
    assert cfg.model.kwargs["depth"] == 4
    assert apply_overrides({}, ["a.b=1"]) == {"a": {"b": 1}}


def test_every_problem_is_reported_with_file_key_and_value(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "model: {pruned: [embed, nope.3]}\n"
        "data: {name: mnist, batch_size: 0}\n"
        "train: {epochs: three, lr: -1.0, colour: red}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_trial_config(path)
    problems = info.value.problems
    text = "\n".join(problems)
    assert all(p.startswith(str(path)) for p in problems)
    assert "data.name" in text and "'mnist'" in text
    assert "train.epochs" in text and "'three'" in text
    assert "train.colour: unknown key" in text


def test_range_and_path_problems_are_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {pruned: [embed, nope.3]}\ndata: {batch_size: 0}\ntrain: {lr: -1.0}\n")
    with pytest.raises(ConfigError) as info:
        load_trial_config(path)
    text = str(info.value)
    assert "data.batch_size: must be >= 1, got 0" in text
    assert "train.lr" in text and "-1.0" in text
    assert "'nope.3'" in text


def test_bad_override_and_missing_file_are_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        load_trial_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="no such file"):
        load_trial_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"data\.root: is required"):
        load_trial_config(None, ["data.name=cifar10"])
