"""Datasets for pathsearch trials: `digits` (offline, built in), `synthetic` (tests), `cifar10`/`cifar100`
(torchvision) and `imagefolder` (a root with train/ and val/), with timm's transforms.

A dataset is loaded once per process and reused by later trials in that process (Ray reuses actors).
Imports torch, torchvision, timm and numpy; never ray, optuna or mlflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

DIGITS_MEAN = 4.88  # pixel statistics of the 1797 images (0..16 grey levels), for normalisation
DIGITS_STD = 6.02
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


@dataclass
class DigitsSplit:
    train: TensorDataset
    val: TensorDataset
    num_classes: int = 10
    img_size: int = 8
    in_chans: int = 1


@dataclass
class DataBundle:
    """Train and validation datasets plus what the model needs to know about them."""

    train: Dataset[Any]
    val: Dataset[Any]
    num_classes: int
    img_size: int
    in_chans: int


_CACHE: dict[tuple[Any, ...], DataBundle] = {}


def load_digits_split(train_size: int | None = None, seed: int = 0) -> DigitsSplit:
    """The 1797 8x8 UCI digits as (1, 8, 8) float images, split by a seeded permutation.

    Args:
        train_size: number of training images; the rest are held out for validation. None: an 80/20 split.
            A small training subset (e.g. 300) leaves a large held-out split on which path configurations
            differ by more than seed noise (FIELD-NOTES.md).
        seed: seed of the permutation; the same seed always gives the same split.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32))[:, None]  # (N, 1, 8, 8)
    images = (images - DIGITS_MEAN) / DIGITS_STD
    labels = torch.from_numpy(digits.target.astype(np.int64))
    total = len(labels)
    train_size = int(0.8 * total) if train_size is None else train_size
    if not 10 <= train_size < total:
        raise ValueError(f"digits train_size must be in 10..{total - 1}, got {train_size}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    train_idx, val_idx = order[:train_size], order[train_size:]
    return DigitsSplit(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        val=TensorDataset(images[val_idx], labels[val_idx]),
    )


def make_synthetic(
    num_classes: int = 4,
    img_size: int = 8,
    in_chans: int = 1,
    train_size: int = 256,
    val_size: int = 128,
    seed: int = 0,
) -> DataBundle:
    """Deterministic, tiny and learnable: each class is a fixed random template plus Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, in_chans, img_size, img_size, generator=gen)

    def draw(n: int) -> TensorDataset:
        labels = torch.arange(n) % num_classes
        noise = 0.8 * torch.randn(n, in_chans, img_size, img_size, generator=gen)
        return TensorDataset(templates[labels] + noise, labels)

    return DataBundle(draw(train_size), draw(val_size), num_classes, img_size, in_chans)


def load_data(
    name: str,
    root: str | None = None,
    download: bool = False,
    train_size: int | None = None,
    split_seed: int = 0,
    img_size: int | None = None,
    auto_augment: str | None = None,
) -> DataBundle:
    """Loads a dataset by name, once per process: later calls with the same arguments reuse it.

    Missing roots, empty folders and train/val class mismatches raise ValueError naming the path.
    """
    key = (name, root, download, train_size, split_seed, img_size, auto_augment)
    if key not in _CACHE:
        _CACHE[key] = _load(name, root, download, train_size, split_seed, img_size, auto_augment)
    return _CACHE[key]


def _load(
    name: str,
    root: str | None,
    download: bool,
    train_size: int | None,
    split_seed: int,
    img_size: int | None,
    auto_augment: str | None,
) -> DataBundle:
    if name == "digits":
        split = load_digits_split(train_size, split_seed)
        return DataBundle(split.train, split.val, split.num_classes, split.img_size, split.in_chans)
    if name == "synthetic":
        return make_synthetic(train_size=train_size or 256, seed=split_seed)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, _require_root(name, root, must_exist=not download), download, img_size, auto_augment)
    if name == "imagefolder":
        return _load_imagefolder(_require_root(name, root, must_exist=True), img_size, auto_augment)
    raise ValueError(f"unknown dataset {name!r}: expected digits, synthetic, cifar10, cifar100 or imagefolder")


def _require_root(name: str, root: str | None, must_exist: bool) -> Path:
    if not root:
        raise ValueError(f"dataset {name!r} needs data.root")
    path = Path(root).expanduser()
    if must_exist and not path.is_dir():
        raise ValueError(f"dataset {name!r}: root {str(path)!r} does not exist (set data.download: true for CIFAR)")
    return path


def _transforms(img_size: int, is_training: bool, auto_augment: str | None, mean: Any, std: Any) -> Any:
    from timm.data import create_transform

    return create_transform(
        img_size, is_training=is_training, auto_augment=auto_augment if is_training else None, mean=mean, std=std
    )


def _load_cifar(name: str, root: Path, download: bool, img_size: int | None, auto_augment: str | None) -> DataBundle:
    from torchvision import datasets

    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    size = img_size or 32
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train = cls(
            str(root), train=True, download=download, transform=_transforms(size, True, auto_augment, mean, std)
        )
        val = cls(str(root), train=False, download=download, transform=_transforms(size, False, None, mean, std))
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
        raise ValueError(f"dataset {name!r} at {str(root)!r}: {err}") from None
    return DataBundle(train, val, 10 if name == "cifar10" else 100, size, 3)


def _load_imagefolder(root: Path, img_size: int | None, auto_augment: str | None) -> DataBundle:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import datasets

    classes = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise ValueError(f"imagefolder: {str(folder)!r} does not exist (expected {root}/train and {root}/val)")
        names = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not names:
            raise ValueError(f"imagefolder: {str(folder)!r} has no class folders")
        empty = [n for n in names if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in (folder / n).iterdir())]
        if empty:
            raise ValueError(f"imagefolder: class folder(s) {empty} in {str(folder)!r} hold no images")
        classes[split] = names
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise ValueError(
            f"imagefolder: classes of {str(root / 'train')!r} and {str(root / 'val')!r} differ "
            f"(only in train: {only_train}; only in val: {only_val})"
        )
    size = img_size or 224
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    train = datasets.ImageFolder(str(root / "train"), transform=_transforms(size, True, auto_augment, mean, std))
    val = datasets.ImageFolder(str(root / "val"), transform=_transforms(size, False, None, mean, std))
    return DataBundle(train, val, len(classes["train"]), size, 3)
