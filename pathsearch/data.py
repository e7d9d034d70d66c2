"""Datasets for pathsearch trials: `digits` (offline, built in), `synthetic` (tests), `cifar10`/`cifar100`
(torchvision) and `imagefolder` (a root with train/, val/ and optionally test/), with timm's transforms.

Each dataset has a train, a val and (except an imagefolder without test/) a test split: a search selects on val,
only a later confirmation reads test. A dataset is loaded once per process and reused by later trials in that
process (Ray reuses actors).
Imports torch, torchvision, timm and numpy; never ray, optuna or mlflow.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from pathsearch.config import CIFAR_VAL_SIZE, digits_split_sizes

DIGITS_MEAN = 4.88  # pixel statistics of the 1797 images (0..16 grey levels), for normalisation
DIGITS_STD = 6.02
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


@dataclass
class DigitsSplit:
    """The digits as tensors, split into train, val and test (see `load_digits_split`)."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int = 10
    img_size: int = 8
    in_chans: int = 1


@dataclass
class DataBundle:
    """Train, validation and test datasets plus what the model needs to know about them."""

    train: Dataset[Any]
    val: Dataset[Any]
    test: Dataset[Any] | None  # None: this data has no test split (an imagefolder without test/)
    num_classes: int
    img_size: int
    in_chans: int


_CACHE: dict[tuple[Any, ...], DataBundle] = {}
_warned_no_test = False  # the missing imagefolder test/ is said once per process, not once per trial


def load_digits_split(train_size: int | None = None, seed: int = 0, *, val_size: int | None = None) -> DigitsSplit:
    """The 1797 8x8 UCI digits as (1, 8, 8) float images, split by one seeded permutation.

    The first `train_size` images of the permutation are train, the next `val_size` val and the rest test. The
    defaults give 1078 / 359 / 360 images (60% / 20% / 20%).

    Args:
        train_size: number of training images. None: 60% of the images (rounded down). A small training subset
            (e.g. 300) leaves large held-out splits, so that differences between path configurations are measured
            on many images.
        seed: seed of the permutation; the same seed always gives the same split.
        val_size: number of validation images. None: half of what training leaves (rounded down).

    Raises:
        ValueError: naming both sizes and 1797, when fewer than 10 training images, no validation image or no test
            image would remain.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32))[:, None]  # (N, 1, 8, 8)
    images = (images - DIGITS_MEAN) / DIGITS_STD
    labels = torch.from_numpy(digits.target.astype(np.int64))
    n_train, n_val, _ = digits_split_sizes(train_size, val_size, total=len(labels))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train_idx, val_idx, test_idx = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    return DigitsSplit(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        val=TensorDataset(images[val_idx], labels[val_idx]),
        test=TensorDataset(images[test_idx], labels[test_idx]),
    )


def cifar_split_indices(
    total: int, val_size: int = CIFAR_VAL_SIZE, train_size: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices into CIFAR's official training set: one seeded permutation, whose first `val_size`
    indices are val and the next `train_size` (default: all the rest) train. Val does not depend on train_size.

    Raises:
        ValueError: when val_size is not in 1..total-1 or train_size does not fit in what val leaves.
    """
    if not 1 <= val_size < total:
        raise ValueError(f"CIFAR val_size must be in 1..{total - 1} (of {total} training images), got {val_size}")
    left = total - val_size
    if train_size is not None and not 1 <= train_size <= left:
        raise ValueError(f"CIFAR train_size must be in 1..{left} (val_size {val_size} of {total}), got {train_size}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    end = total if train_size is None else val_size + train_size
    return order[val_size:end], order[:val_size]


def make_synthetic(
    num_classes: int = 4,
    img_size: int = 8,
    in_chans: int = 1,
    train_size: int = 256,
    val_size: int = 128,
    seed: int = 0,
) -> DataBundle:
    """Deterministic, tiny and learnable: each class is a fixed random template plus Gaussian noise.

    The test split has `val_size` images, drawn after train and val (so they are the same as without it).
    """
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, in_chans, img_size, img_size, generator=gen)

    def draw(n: int) -> TensorDataset:
        labels = torch.arange(n) % num_classes
        noise = 0.8 * torch.randn(n, in_chans, img_size, img_size, generator=gen)
        return TensorDataset(templates[labels] + noise, labels)

    train, val = draw(train_size), draw(val_size)
    return DataBundle(train, val, draw(val_size), num_classes, img_size, in_chans)


def load_data(
    name: str,
    root: str | None = None,
    download: bool = False,
    train_size: int | None = None,
    split_seed: int = 0,
    img_size: int | None = None,
    auto_augment: str | None = None,
    val_size: int | None = None,
) -> DataBundle:
    """Loads a dataset by name, once per process: later calls with the same arguments reuse it.

    `train_size`, `val_size` and `split_seed` set the split (see `DataConfig`). Missing roots, empty folders,
    train/val/test class mismatches and sizes that do not fit raise ValueError naming the path or the sizes.
    """
    key = (name, root, download, train_size, val_size, split_seed, img_size, auto_augment)
    if key not in _CACHE:
        _CACHE[key] = _load(name, root, download, train_size, val_size, split_seed, img_size, auto_augment)
    return _CACHE[key]


def _load(
    name: str,
    root: str | None,
    download: bool,
    train_size: int | None,
    val_size: int | None,
    split_seed: int,
    img_size: int | None,
    auto_augment: str | None,
) -> DataBundle:
    if name == "digits":
        split = load_digits_split(train_size, split_seed, val_size=val_size)
        return DataBundle(split.train, split.val, split.test, split.num_classes, split.img_size, split.in_chans)
    if name == "synthetic":
        return make_synthetic(train_size=train_size or 256, val_size=val_size or 128, seed=split_seed)
    if name in ("cifar10", "cifar100"):
        path = _require_root(name, root, must_exist=not download)
        return _load_cifar(name, path, download, img_size, auto_augment, train_size, val_size, split_seed)
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


def _load_cifar(
    name: str,
    root: Path,
    download: bool,
    img_size: int | None,
    auto_augment: str | None,
    train_size: int | None,
    val_size: int | None,
    split_seed: int,
) -> DataBundle:
    from torchvision import datasets

    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    size = img_size or 32
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    eval_transform = _transforms(size, False, None, mean, std)
    try:
        # Two views of the training files: val images are scored like test ones, without augmentation.
        train_view = cls(
            str(root), train=True, download=download, transform=_transforms(size, True, auto_augment, mean, std)
        )
        val_view = cls(str(root), train=True, download=False, transform=eval_transform)
        test = cls(str(root), train=False, download=download, transform=eval_transform)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
        raise ValueError(f"dataset {name!r} at {str(root)!r}: {err}") from None
    train_idx, val_idx = cifar_split_indices(
        len(train_view), CIFAR_VAL_SIZE if val_size is None else val_size, train_size, split_seed
    )
    train = Subset(train_view, train_idx.tolist())
    val = Subset(val_view, val_idx.tolist())
    return DataBundle(train, val, test, 10 if name == "cifar10" else 100, size, 3)


def _load_imagefolder(root: Path, img_size: int | None, auto_augment: str | None) -> DataBundle:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import datasets

    global _warned_no_test
    has_test = (root / "test").is_dir()
    classes = {}
    for split in ("train", "val", "test") if has_test else ("train", "val"):
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
    for split in classes:
        if classes[split] != classes["train"]:
            only_train = sorted(set(classes["train"]) - set(classes[split]))
            only_split = sorted(set(classes[split]) - set(classes["train"]))
            raise ValueError(
                f"imagefolder: classes of {str(root / 'train')!r} and {str(root / split)!r} differ "
                f"(only in train: {only_train}; only in {split}: {only_split})"
            )
    if not has_test and not _warned_no_test:
        warnings.warn(
            f"imagefolder: {root / 'test'} does not exist: no test split, no test figure will be reported",
            stacklevel=2,
        )
        _warned_no_test = True
    size = img_size or 224
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    eval_transform = _transforms(size, False, None, mean, std)
    train = datasets.ImageFolder(str(root / "train"), transform=_transforms(size, True, auto_augment, mean, std))
    val = datasets.ImageFolder(str(root / "val"), transform=eval_transform)
    test = datasets.ImageFolder(str(root / "test"), transform=eval_transform) if has_test else None
    return DataBundle(train, val, test, len(classes["train"]), size, 3)
