from __future__ import annotations

import pytest
import torch
from PIL import Image

from pathsearch.data import load_data, load_digits_split, make_synthetic


def test_digits_split_is_seeded_and_holds_out_the_rest():
    a, b = load_digits_split(300, seed=0), load_digits_split(300, seed=0)
    assert len(a.train) == 300 and len(a.val) == 1497
    assert torch.equal(a.train.tensors[1], b.train.tensors[1])
    c = load_digits_split(300, seed=1)
    assert not torch.equal(a.train.tensors[1], c.train.tensors[1])
    assert a.train.tensors[0].shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError, match="1797"):
        load_digits_split(1797)


def test_datasets_are_loaded_once_per_process():
    first = load_data("digits", train_size=300)
    assert load_data("digits", train_size=300) is first
    assert load_data("digits", train_size=400) is not first


def test_synthetic_is_deterministic():
    a, b = make_synthetic(seed=3), make_synthetic(seed=3)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])  # type: ignore[attr-defined]
    assert a.num_classes == 4


def _write_images(folder, classes, per_class=2, size=12):
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), color=(40 * i, 80, 120)).save(folder / c / f"{i}.png")


def test_imagefolder_loads_with_timm_transforms(tmp_path):
    _write_images(tmp_path / "train", ["cat", "dog"])
    _write_images(tmp_path / "val", ["cat", "dog"], per_class=1)
    bundle = load_data("imagefolder", root=str(tmp_path), img_size=16)
    assert bundle.num_classes == 2 and len(bundle.train) == 4 and len(bundle.val) == 2
    image, label = bundle.val[0]
    assert tuple(image.shape) == (3, 16, 16) and label == 0


def test_imagefolder_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_data("imagefolder", root=str(tmp_path / "nowhere"))
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match=r"train.*has no class folders"):
        load_data("imagefolder", root=str(tmp_path))
    _write_images(tmp_path / "train", ["cat", "dog"])
    (tmp_path / "val" / "cat").mkdir()
    with pytest.raises(ValueError, match=r"\['cat'\].*hold no images"):
        load_data("imagefolder", root=str(tmp_path))
    _write_images(tmp_path / "val", ["cat", "bird"])
    with pytest.raises(ValueError, match=r"only in train: \['dog'\]; only in val: \['bird'\]"):
        load_data("imagefolder", root=str(tmp_path))


def test_cifar_errors_name_the_root(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_data("cifar10", root=str(tmp_path / "missing"))
    # An existing but empty root without download: torchvision's own integrity check, reported with the path.
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_data("cifar100", root=str(tmp_path))
    with pytest.raises(ValueError, match=r"needs data\.root"):
        load_data("cifar10")
