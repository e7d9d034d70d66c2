"""What each built-in dataset is, read without loading it: its shape, the size of its official training set, the
default validation slice, and where the MNIST files live.

One table per fact, for the config checks, the loaders (data.py) and the searcher alike. Imports no torch (nor
numpy, ray, optuna, mlflow) and no other pathsearch module.
"""

from __future__ import annotations

import os
from pathlib import Path

# (channels, image size without data.img_size, classes) of each dataset, as data.py's loaders give them: the digits
# stay 8 x 8 whatever img_size says; an image folder's classes are its train/ class folders
SHAPES: dict[str, tuple[int, int, int | None]] = {
    "digits": (1, 8, 10),
    "synthetic": (1, 8, 4),
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "fashion_mnist": (1, 28, 10),
    "mnist": (1, 28, 10),
    "imagefolder": (3, 224, None),
}
SYNTHETIC_TRAIN_IMAGES = 256  # the synthetic data's training images without data.train_size (data.py makes them)
DIGITS_IMAGES = 1797  # the UCI digits data.py loads; counted here because data.py imports torch
CIFAR_TRAIN_IMAGES = 50000  # the official CIFAR-10/100 training set, which the validation slice is drawn from
CIFAR_VAL_SIZE = 5000  # default size of that slice
MNIST_TRAIN_IMAGES = 60000  # the official MNIST / Fashion-MNIST training set, which the validation slice is drawn from
MNIST_VAL_SIZE = 5000  # default size of that slice: as CIFAR's, and MNIST's customary 55,000 / 5,000 split
# The IDX files torchvision's MNIST / FashionMNIST read from ROOT/<folder>/raw/ (uncompressed)
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_FOLDERS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}  # torchvision's class names
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist: the four .gz files
# name: (what errors call it, official training images, default val_size); val is a seeded slice of the training set
HELD_OUT_VAL = {
    "cifar10": ("CIFAR", CIFAR_TRAIN_IMAGES, CIFAR_VAL_SIZE),
    "cifar100": ("CIFAR", CIFAR_TRAIN_IMAGES, CIFAR_VAL_SIZE),
    "fashion_mnist": ("Fashion-MNIST", MNIST_TRAIN_IMAGES, MNIST_VAL_SIZE),
    "mnist": ("MNIST", MNIST_TRAIN_IMAGES, MNIST_VAL_SIZE),
}


def default_data_root() -> Path:
    """Where `mnist` and `fashion_mnist` live without `data.root`: $XDG_CACHE_HOME (or ~/.cache)/pathsearch/datasets."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pathsearch" / "datasets"


def mnist_raw_folder(name: str, root: str | None) -> Path:
    """ROOT/MNIST/raw or ROOT/FashionMNIST/raw, where torchvision reads (and downloads) the IDX files."""
    base = Path(root).expanduser() if root else default_data_root()
    return base / MNIST_FOLDERS[name] / "raw"


def mnist_missing(name: str, root: str | None) -> str | None:
    """One line naming the IDX files that ROOT lacks and where to get them; None when all four are there."""
    raw = mnist_raw_folder(name, root)
    missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
    if not missing:
        return None
    if name == "fashion_mnist":
        where = (
            f"Debian's package dataset-fashion-mnist ships Fashion-MNIST in {FASHION_MNIST_DEBIAN}/, which "
            "data.download: true unpacks (without it, download fetches from the internet)"
        )
    else:
        where = f"set data.download: true (needs the internet), or place the four uncompressed files in {raw}/"
    return f"dataset {name!r}: {raw}/ lacks {', '.join(missing)} (of {', '.join(MNIST_FILES)}); {where}"


def digits_split_sizes(
    train_size: int | None, val_size: int | None, total: int = DIGITS_IMAGES
) -> tuple[int, int, int]:
    """(train, val, test) sizes of the digits split.

    Args:
        train_size: training images; None: 60% of `total` (rounded down).
        val_size: validation images; None: half of what training leaves (rounded down). The rest is test.
        total: images to split.

    Raises:
        ValueError: naming both sizes and `total`, when fewer than 10 training images, no validation image or no test
            image would remain.
    """
    train = int(0.6 * total) if train_size is None else train_size
    val = (total - train) // 2 if val_size is None else val_size
    sizes = f"digits: train_size {train} + val_size {val}"
    if train < 10:
        raise ValueError(f"{sizes}: train_size must be >= 10 (of the {total} digits)")
    if val < 1:
        raise ValueError(f"{sizes} leave no validation images of the {total} digits")
    if train + val >= total:
        raise ValueError(f"{sizes} leave no test images of the {total} digits")
    return train, val, total - train - val
