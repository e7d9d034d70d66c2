"""Pretrained weights: a checkpoint file (`model.weights`) or timm's published weights (`model.pretrained`) fill the
model through timm's own loader, and each way they cannot (a file that is not there or not a checkpoint, a model they
cannot fill, published weights not cached on an offline machine, position embeddings re-initialised over them) is one
line naming the file, the key and the value, before anything runs. No downloads: published weights come from a
Hugging Face cache made in a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file

from pathsearch.config import load_trial_config
from pathsearch.config.typed import ConfigError
from pathsearch.ensemble.weights import read_weights
from pathsearch.preflight import load_trial
from pathsearch.trial.train import build_model, load_trial_data

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "search_spaces" / "digits_tiny.yaml"
SMALL = ["model.kwargs.depth=2", "model.pos_embed_std=null"]  # digits_tiny.yaml's model, two blocks deep
DIGITS_VIT = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def saved_vit(path: Path, seed: int = 0, **overrides: int) -> dict[str, torch.Tensor]:
    """A timm ViT (digits_tiny.yaml's, two blocks deep) with random weights, saved to `path`: safetensors, or a torch
    file nested under 'model' as timm's training script saves it. Returns its state dict."""
    torch.manual_seed(seed)
    state = timm.create_model("vit_tiny_patch16_224", **{**DIGITS_VIT, **overrides}).state_dict()
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state, "epoch": 3}, path)
    return state


def built(sets: list[str]) -> dict[str, torch.Tensor]:
    """The timm ViT of the trial `sets` configure (validated first, as `train` does), as a trial builds it."""
    cfg = load_trial(DIGITS, sets)
    return build_model(cfg, load_trial_data(cfg), seed=1).vit.state_dict()


def refusal(sets: list[str]) -> str:
    """The one problem `train` and `search` would stop on."""
    with pytest.raises(ConfigError) as raised:
        load_trial(DIGITS, sets)
    assert len(raised.value.problems) == 1, raised.value.problems
    return raised.value.problems[0]


def test_a_weights_file_is_loaded_by_timms_loader_and_adapted_to_the_data(tmp_path, monkeypatch):
    """The file's tensors are the model's; one of 3 x 16 x 16 images (patches of 4) and 5 classes fills the digits'
    model through timm's adaptations: channels summed, patch kernels and position embeddings resampled, head reset.
    A relative path is the working directory's."""
    same = saved_vit(tmp_path / "digits.pth")
    monkeypatch.chdir(tmp_path)
    assert load_trial_config(DIGITS, [*SMALL, "model.weights=digits.pth"]).model.weights == str(tmp_path / "digits.pth")
    loaded = built([*SMALL, "model.weights=digits.pth"])
    assert set(loaded) == set(same) and all(torch.equal(loaded[k], v) for k, v in same.items())  # the head too

    other = saved_vit(tmp_path / "rgb.safetensors", in_chans=3, img_size=16, patch_size=4, num_classes=5)
    loaded = built([*SMALL, f"model.weights={tmp_path / 'rgb.safetensors'}"])
    assert loaded["patch_embed.proj.weight"].shape == (64, 1, 2, 2) and loaded["pos_embed"].shape == (1, 17, 64)
    assert loaded["head.weight"].shape == (10, 64)
    assert all(torch.equal(loaded[k], v) for k, v in other.items() if k.startswith("blocks."))

    # a pathsearch checkpoint (model_N.safetensors) holds its timm ViT under `vit.`, beside the path configuration
    from pathsearch.ensemble.model import PathEnsembleViT

    torch.manual_seed(0)
    wrapped = PathEnsembleViT(timm.create_model("vit_tiny_patch16_224", **DIGITS_VIT)).state_dict()
    save_file(wrapped, str(tmp_path / "model_0.safetensors"))
    assert read_weights(tmp_path / "model_0.safetensors").keys() == same.keys()


def test_weights_that_cannot_fill_the_model_are_one_line_naming_the_parameter_its_shapes_and_the_keys(tmp_path):
    path = tmp_path / "digits.safetensors"
    saved_vit(path)
    got = f", got {str(path)!r}"
    cases = {  # overrides of digits_tiny.yaml: what the line says after `model.weights: `
        "model.kwargs.embed_dim=32": "the weights cannot fill this model: cls_token is (1, 1, 32) here and (1, 1, 64) "
        "in the weights (model.kwargs.embed_dim: 32 here, 64 in the weights)",
        "model.kwargs.depth=3": "the weights cannot fill this model: they lack its blocks.2.norm1.weight (and 11 more) "
        "(model.kwargs.depth: 3 here, 2 in the weights)",
    }
    for override, says in cases.items():
        assert refusal([*SMALL, f"model.weights={path}", override]) == f"{DIGITS}: model.weights: {says}{got}"
    shallower = refusal([*SMALL, f"model.weights={path}", "model.kwargs.depth=1", "model.distill.students=[1]"])
    assert shallower.startswith(f"{DIGITS}: model.weights: the weights hold blocks.1.")  # the first in the file
    assert shallower.endswith(f" (and 11 more), which this model has no place for (model.kwargs.depth: 1 here, 2 in "
                              f"the weights){got}")  # fmt: skip
    # timm itself loads a deeper checkpoint into a shallower model where it resets the head: the model is filled
    saved_vit(tmp_path / "five.safetensors", num_classes=5)
    load_trial(DIGITS, [*SMALL, f"model.weights={tmp_path / 'five.safetensors'}", "model.kwargs.depth=1",
                        "model.distill.students=[1]"])  # fmt: skip

    (tmp_path / "notes.pth").write_text("not a checkpoint")
    (tmp_path / "folder").mkdir()
    files = {
        "notes.pth": "not a torch checkpoint (timm reads a file ending in .safetensors as safetensors, any other with "
        "torch.load): ",
        "missing.pth": "no such file",
        "folder": "is a folder; give the checkpoint file in it",
    }
    for name, says in files.items():
        line = refusal([*SMALL, f"model.weights={tmp_path / name}"])
        assert line.startswith(f"{DIGITS}: model.weights: {says}") and line.endswith(f", got {str(tmp_path / name)!r}")
    line = refusal([*SMALL, f"model.weights={path}", "model.pretrained=true"])
    assert line == f"{DIGITS}: model.weights: a weights file and timm's published weights (model.pretrained: true) " \
        f"are two starting points; keep one{got}"  # fmt: skip


def test_position_embeddings_are_drawn_over_pretrained_ones_only_when_the_file_says_so(tmp_path):
    """pos_embed_std would silently replace the weights' position embeddings: refused unless reinit_pos_embed."""
    path = tmp_path / "digits.safetensors"
    state = saved_vit(path)
    weights = f"model.weights={path}"
    assert refusal(["model.kwargs.depth=2", weights]) == (
        f"{DIGITS}: model.pos_embed_std: would overwrite the pretrained position embeddings; leave it out, or set "
        "model.reinit_pos_embed: true to replace them, got 1.0"
    )
    assert refusal([*SMALL, weights, "model.reinit_pos_embed=true"]) == (
        f"{DIGITS}: model.reinit_pos_embed: needs model.pos_embed_std, the std of the new position embeddings, got True"
    )
    loaded = built(["model.kwargs.depth=2", weights, "model.reinit_pos_embed=true"])
    assert not torch.equal(loaded["pos_embed"], state["pos_embed"]) and loaded["pos_embed"].std() > 0.5  # std 1.0
    assert torch.equal(loaded["blocks.1.mlp.fc2.weight"], state["blocks.1.mlp.fc2.weight"])


def hub_cache(root: Path, model: torch.nn.Module | None) -> Path:
    """A Hugging Face cache under `root` holding timm's published weights for `test_vit` (timm's own tiny test ViT:
    64 wide, 6 blocks, 2 heads, as digits_tiny.yaml's model) as `model`'s, or nothing with None. Its layout is
    huggingface_hub's: refs/main names a snapshot folder holding the file."""
    repo = root / "models--timm--test_vit.r160_in1k"
    if model is not None:
        commit = "0" * 40
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        save_file(model.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))
    root.mkdir(exist_ok=True)
    return root


def test_published_weights_are_checked_from_the_hugging_face_cache_and_never_fetched(tmp_path, monkeypatch):
    """Cached weights are read from the cache (the trial's timm loads them offline); not cached, an offline hub
    is refused, and otherwise the model timm registers for them stands in for their shapes."""
    torch.manual_seed(3)
    published = timm.create_model("test_vit")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", published)))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    sets = ["model.name=test_vit", "model.pretrained=true", "model.pos_embed_std=null"]
    loaded = built(sets)
    assert all(torch.equal(loaded[k], v) for k, v in published.state_dict().items() if k.startswith("blocks."))
    assert refusal([*sets, "model.kwargs.embed_dim=32"]) == (
        f"{DIGITS}: model.pretrained: timm's published weights for 'test_vit' (timm/test_vit.r160_in1k) cannot fill "
        "this model: cls_token is (1, 1, 32) here and (1, 1, 64) in the weights (model.kwargs.embed_dim: 32 here, 64 "
        "in the weights), got True"
    )

    empty = hub_cache(tmp_path / "empty", None)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(empty))
    line = refusal(sets)
    assert line.startswith(f"{DIGITS}: model.pretrained: timm's published weights for 'test_vit' (timm/test_vit.r160_"
                           f"in1k) are not in the Hugging Face cache ({empty}) and the hub is offline")  # fmt: skip
    assert line.endswith("start from a file with model.weights, got True")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    load_trial(DIGITS, sets)  # their shapes fill it: a trial may fetch them
    line = refusal(["model.pretrained=true", "model.pos_embed_std=null"])  # digits_tiny.yaml's own 64-wide model
    assert "(timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k), as timm registers them (not cached yet), cannot" in line
    assert "(model.kwargs.embed_dim: 64 here, 192 in the weights; model.kwargs.depth: 6 here, 12 in" in line


def test_a_search_whose_published_weights_are_not_cached_offline_exits_2_writing_nothing(tmp_path):
    """As a user runs it: HF_HUB_OFFLINE and HF_HOME in the environment, `pathsearch search`: exit 2 and one line,
    before Ray starts; no run folder, no MLflow store."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    sets = ["--set", "model.pretrained=true", "model.pos_embed_std=null"]
    result = subprocess.run([sys.executable, "-m", "pathsearch.cli", "search", str(DIGITS), *sets], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"pathsearch search: error: {DIGITS}: model.pretrained: timm's published weights ")
    assert f"are not in the Hugging Face cache ({tmp_path / 'hf' / 'hub'})" in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.endswith(", got True\n"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/, no mlflow.db, nothing in the HF cache


def test_a_trained_checkpoint_is_read_back_without_the_weights_file_it_started_from(tmp_path):
    """`load_checkpoint_model` (confirmation, export, fit-scales) rebuilds a trial's model from its checkpoint alone:
    the weights file it started from may be gone, and the config it returns still says where the trial started."""
    from pathsearch.trial.train import fit, load_checkpoint_model

    weights = tmp_path / "start.safetensors"
    saved_vit(weights)
    cfg = load_trial(DIGITS, [*SMALL, f"model.weights={weights}", "train.epochs=1", "train.threads=1"])
    result = fit(cfg, lambda metrics, checkpoint: None, work_dir=tmp_path / "trial")
    trained = build_model(cfg, load_trial_data(cfg), seed=cfg.train.seed)  # (the file is read here, still there)
    weights.unlink()
    model, loaded = load_checkpoint_model(result.checkpoint_dir)
    assert loaded.model.weights == str(weights) and not loaded.model.pretrained
    assert model.vit.pos_embed.shape == trained.vit.pos_embed.shape
    assert not torch.equal(model.vit.pos_embed, trained.vit.pos_embed)  # trained for an epoch: the checkpoint's own
