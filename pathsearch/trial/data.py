"""Datasets for pathsearch trials: `digits` (offline, built in), `synthetic` (tests), `cifar10`/`cifar100`
(torchvision, with timm's transforms), `fashion_mnist`/`mnist` (torchvision's parser, held as normalised tensors)
and `imagefolder` (a root with train/, val/ and optionally test/, with timm's transforms).

Each dataset has a train, a val and (except an imagefolder without test/) a test split: a search selects on val,
only a later confirmation reads test. A dataset is loaded once per process and reused by later trials in that
process (Ray reuses actors).
Imports torch, torchvision, timm and numpy; never ray, optuna or mlflow.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, Subset, TensorDataset

from pathsearch.config.datasets import (
    CIFAR_VAL_SIZE,
    FASHION_MNIST_DEBIAN,
    MNIST_FILES,
    MNIST_VAL_SIZE,
    SHAPES,
    SYNTHETIC_TRAIN_IMAGES,
    digits_split_sizes,
    mnist_missing,
    mnist_raw_folder,
)

DIGITS_MEAN = 4.88  # pixel statistics of the 1797 images (0..16 grey levels), for normalisation
DIGITS_STD = 6.02
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
# pixel mean / std of each official training set (0..1 grey levels), for normalisation
MNIST_STATS = {"fashion_mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}
# md5 of the uncompressed official Fashion-MNIST files. Debian recompressed the .gz files (other md5 sums than the ones
# torchvision checks), but their content is upstream's: these sums check what is unpacked from them.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
IDX_MAGIC = {"images": 2051, "labels": 2049}  # uint8 3-d and 1-d IDX files


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


AUGMENTED = ("cifar10", "cifar100", "imagefolder")  # the datasets whose images go through timm's transforms


def data_shape(name: str, root: str | None, img_size: int | None) -> tuple[int, int, int | None]:
    """(channels, image size, classes) that `load_data(name, root, img_size=img_size)` would give the model, read
    without loading an image; classes None where an image folder's train/ cannot be listed (its loader says why)."""
    chans, native, classes = SHAPES[name]
    size = native if name == "digits" else img_size or native
    if name == "imagefolder" and root:
        train = Path(root).expanduser() / "train"
        classes = sum(1 for p in train.iterdir() if p.is_dir()) if train.is_dir() else None
    return chans, size, classes


_CACHE: dict[tuple[Any, ...], DataBundle] = {}
_warned_no_test = False  # the missing imagefolder test/ is said once per process, not once per trial


class TensorBatches:
    """Batches of an in-memory TensorDataset, cut on the tensors' own device: no per-image Python, no collation, no
    host copy per batch (on a GPU the dataset is copied there once and every batch is an index_select).

    Hand-written because torch's DataLoader fetches and collates image by image. It draws from its generator (and,
    like the DataLoader, from torch's global RNG once per pass) exactly as `DataLoader(dataset, batch_size,
    shuffle, generator=generator, drop_last=drop_last)` does, so the same seed gives the same batches in the same
    order and a checkpointed generator resumes the same order. With `shard=(rank, world)` each batch is this
    worker's part of the global batch (`shard_of`).
    """

    def __init__(
        self,
        tensors: tuple[torch.Tensor, ...],
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last
        self.num_items = len(tensors[0])
        self.shard = shard

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_items // self.batch_size
        return -(-self.num_items // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # DataLoader's iterator draws a base seed for its workers from the generator (the global RNG without one)
        # before its sampler draws the permutation: the same draws, in the same order, keep the same batches
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        device = self.tensors[0].device
        order = torch.randperm(self.num_items, generator=self.generator) if self.shuffle else None
        if order is not None:  # one host-to-device copy per pass, queued without waiting
            order = order.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else order.to(device)
        for k in range(len(self)):
            start = k * self.batch_size
            if order is None and self.shard is None:
                yield tuple(t[start : start + self.batch_size] for t in self.tensors)
                continue
            if order is None:
                index = torch.arange(start, min(start + self.batch_size, self.num_items), device=device)
            else:
                index = order[start : start + self.batch_size]
            if self.shard is not None:
                index = shard_of(index, *self.shard)
            yield tuple(t.index_select(0, index) for t in self.tensors)
        if order is not None:  # RandomSampler draws a second, empty, permutation when it is exhausted (its
            torch.randperm(self.num_items, generator=self.generator)  # `num_samples % n` tail): so do we


def shard_of(batch: Any, rank: int, world: int) -> Any:
    """Worker `rank`'s part of a global batch (indices) split over `world` workers: contiguous, sizes differing by
    at most one. Every worker draws the same global order from the same generator and keeps its part, so the
    workers' batches together are exactly the one-process trial's batch. Hand-written because torch's
    DistributedSampler draws an order of its own (seed + epoch, not the checkpointed generator) and pads the epoch
    with repeated images: the batches would differ from a one-worker trial's."""
    if isinstance(batch, torch.Tensor):
        return batch.tensor_split(world)[rank]
    return [int(i) for i in np.array_split(np.asarray(batch), world)[rank]]


class ShardedBatches(BatchSampler):
    """A BatchSampler's global batches, each cut to this worker's part (`shard_of`), for DataLoader-fed datasets."""

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool, shard: tuple[int, int]) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.shard = shard

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            yield shard_of(batch, *self.shard)


def on_device(dataset: Any, device: torch.device) -> Any:
    """An in-memory TensorDataset with its tensors on `device` (no copy when they are there already: several loaders,
    one per seed, can share one copy); any other dataset unchanged."""
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t.to(device) for t in dataset.tensors))
    return dataset


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    device: torch.device,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
    shard: tuple[int, int] | None = None,
) -> TensorBatches | DataLoader[Any]:
    """The loader of one split for a trial on `device`: an in-memory TensorDataset (digits, synthetic, mnist,
    fashion_mnist) is moved there once and batched there (`TensorBatches`); any other dataset (CIFAR, imagefolder:
    decoded and augmented per image on the CPU) goes through a DataLoader that pins memory on CUDA and keeps its
    workers alive between epochs. Both give the same batches for the same generator. `shard=(rank, world)`: this
    worker's part of each global batch of `batch_size` images (a data-parallel trial)."""
    if isinstance(dataset, TensorDataset):
        return TensorBatches(on_device(dataset, device).tensors, batch_size, shuffle, generator, drop_last, shard)
    if shard is not None:  # the sampler DataLoader(shuffle=...) would make, drawing from the same generator
        sized: Any = dataset  # a map-style dataset: it has a length
        sampler = RandomSampler(sized, generator=generator) if shuffle else SequentialSampler(sized)
        return DataLoader(
            dataset,
            batch_sampler=ShardedBatches(sampler, batch_size, drop_last, shard),
            generator=generator,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


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
    total: int, val_size: int = CIFAR_VAL_SIZE, train_size: int | None = None, seed: int = 0, what: str = "CIFAR"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices into CIFAR's (or `what`'s: MNIST's) official training set: one seeded permutation, whose
    first `val_size` indices are val and the next `train_size` (default: all the rest) train. Val does not depend on
    train_size.

    Raises:
        ValueError: when val_size is not in 1..total-1 or train_size does not fit in what val leaves.
    """
    if not 1 <= val_size < total:
        raise ValueError(f"{what} val_size must be in 1..{total - 1} (of {total} training images), got {val_size}")
    left = total - val_size
    if train_size is not None and not 1 <= train_size <= left:
        raise ValueError(f"{what} train_size must be in 1..{left} (val_size {val_size} of {total}), got {train_size}")
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
        return make_synthetic(
            train_size=train_size or SYNTHETIC_TRAIN_IMAGES,
            val_size=val_size or 128,
            seed=split_seed,
            img_size=img_size or 8,
        )
    if name in ("cifar10", "cifar100"):
        path = _require_root(name, root, must_exist=not download)
        return _load_cifar(name, path, download, img_size, auto_augment, train_size, val_size, split_seed)
    if name in ("fashion_mnist", "mnist"):
        return _load_mnist(name, root, download, train_size, val_size, split_seed, img_size)
    if name == "imagefolder":
        return _load_imagefolder(_require_root(name, root, must_exist=True), img_size, auto_augment)
    raise ValueError(
        f"unknown dataset {name!r}: expected digits, synthetic, cifar10, cifar100, fashion_mnist, mnist or imagefolder"
    )


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
    chans, native, classes = SHAPES[name]
    size = img_size or native
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
    assert classes is not None  # a named dataset knows its classes
    return DataBundle(train, val, test, classes, size, chans)


def _load_mnist(
    name: str,
    root: str | None,
    download: bool,
    train_size: int | None,
    val_size: int | None,
    split_seed: int,
    img_size: int | None,
) -> DataBundle:
    """MNIST or Fashion-MNIST through torchvision's own classes (download, IDX parser), held as normalised tensors.

    Val is a seeded slice of the official training set, train a subset of the rest (as CIFAR's); test is the official
    test set. Images are (1, 28, 28), resized once to `img_size` when it is given and not 28.
    """
    from torchvision import datasets

    cls = datasets.FashionMNIST if name == "fashion_mnist" else datasets.MNIST
    raw = mnist_raw_folder(name, root)
    base = raw.parent.parent
    if download and name == "fashion_mnist" and FASHION_MNIST_DEBIAN.is_dir():
        _unpack_debian_fashion_mnist(raw)
    train_images, train_labels = _read_mnist(name, cls, base, raw, train=True, download=download)
    test_images, test_labels = _read_mnist(name, cls, base, raw, train=False, download=False)
    train_idx, val_idx = cifar_split_indices(
        len(train_labels),
        MNIST_VAL_SIZE if val_size is None else val_size,
        train_size,
        split_seed,
        what="Fashion-MNIST" if name == "fashion_mnist" else "MNIST",
    )
    mean, std = MNIST_STATS[name]
    chans, native, classes = SHAPES[name]
    size = img_size or native

    def tensors(images: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
        x = (images[:, None].float() / 255 - mean) / std  # (N, 1, 28, 28), normalised once
        if size != 28:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return TensorDataset(x, labels)

    train = tensors(train_images[train_idx], train_labels[train_idx])
    val = tensors(train_images[val_idx], train_labels[val_idx])
    assert classes is not None
    return DataBundle(train, val, tensors(test_images, test_labels), classes, size, chans)


def _unpack_debian_fashion_mnist(raw: Path) -> None:
    """The offline source: unpacks the IDX files that `raw` lacks from Debian's dataset-fashion-mnist package with
    torchvision's own `extract_archive` and checks each against the official md5 sum (torchvision's
    `check_integrity`) before it is moved into `raw`; nothing is left there from a failed file.

    (torchvision's download cannot take the folder as a `file://` mirror: its `_urlretrieve` reads `response.length`,
    which only HTTP responses have, and it checks the .gz md5 sums of upstream's files, which Debian's are not.)
    """
    import tempfile
    import zlib

    from torchvision.datasets.utils import check_integrity, extract_archive

    missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
    if not missing:
        return
    raw.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw) as scratch:
        for filename in missing:
            source = FASHION_MNIST_DEBIAN / f"{filename}.gz"
            if not source.is_file():
                return  # an incomplete package: torchvision's download fetches what is left
            try:
                unpacked = Path(extract_archive(str(source), scratch))
            except (OSError, EOFError, zlib.error) as err:
                raise ValueError(f"dataset 'fashion_mnist': cannot unpack {source}: {err}") from None
            if not check_integrity(str(unpacked), FASHION_MNIST_MD5[filename]):
                raise ValueError(
                    f"dataset 'fashion_mnist': {source} does not hold the official {filename} (md5 differs); "
                    "reinstall Debian's dataset-fashion-mnist package"
                )
            unpacked.replace(raw / filename)


def _read_mnist(
    name: str, cls: Any, base: Path, raw: Path, train: bool, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of one official split, read by torchvision's class; every way
    it fails is a one-line ValueError naming the file (or the missing files)."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    prefix = "train" if train else "t10k"
    files = {"images": raw / f"{prefix}-images-idx3-ubyte", "labels": raw / f"{prefix}-labels-idx1-ubyte"}
    try:
        dataset = cls(str(base), train=train, download=download)
    except (AssertionError, RuntimeError, OSError, ValueError, TypeError, KeyError, IndexError) as err:
        # torchvision's "Dataset not found", a download every mirror failed (OSError: urllib's URLError or a timeout,
        # which its mirror loop lets out), or its IDX parser failing
        missing = mnist_missing(name, str(base))
        if missing is not None:
            if not download:
                raise ValueError(missing) from None
            tried = " ".join(str(err).split())  # torchvision's "Error downloading ...: Tried <mirror>, got: ..."
            raise ValueError(f"{missing}; download failed: {tried}") from None
        if isinstance(err, OSError):
            raise
        for kind, path in files.items():  # which file: read each again with torchvision's reader
            try:
                (read_image_file if kind == "images" else read_label_file)(str(path))
            except Exception as bad:  # any failure of the parser is this file's
                raise ValueError(_idx_problem(name, path, kind, bad)) from None
        raise ValueError(f"dataset {name!r}: {files['images']}, {files['labels']}: unreadable ({err})") from None
    images, labels = dataset.data, dataset.targets
    if tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"dataset {name!r}: {files['images']}: images of {tuple(images.shape[1:])} pixels, not 28x28")
    if len(images) != len(labels):
        raise ValueError(
            f"dataset {name!r}: {files['images']} holds {len(images)} images but {files['labels']} {len(labels)} labels"
        )
    if len(labels) and int(labels.max()) > 9:
        raise ValueError(f"dataset {name!r}: {files['labels']}: a label {int(labels.max())}, outside 0..9")
    return images, labels


def _idx_problem(name: str, path: Path, kind: str, err: BaseException) -> str:
    """One line on an IDX file torchvision's parser rejected: a wrong magic number, else truncated or corrupt."""
    with path.open("rb") as f:
        head = f.read(4)
    magic = int.from_bytes(head, "big") if len(head) == 4 else None
    expected = IDX_MAGIC[kind]
    if magic != expected:
        return (
            f"dataset {name!r}: {path}: magic number {magic} where an uncompressed IDX {kind} file has {expected}: "
            "not MNIST-format data"
        )
    why = " ".join(str(err).split()) or type(err).__name__
    return f"dataset {name!r}: {path}: truncated or corrupt IDX {kind} file (torchvision: {why})"


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
    chans, native, _ = SHAPES["imagefolder"]
    size = img_size or native
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    eval_transform = _transforms(size, False, None, mean, std)
    train = datasets.ImageFolder(str(root / "train"), transform=_transforms(size, True, auto_augment, mean, std))
    val = datasets.ImageFolder(str(root / "val"), transform=eval_transform)
    test = datasets.ImageFolder(str(root / "test"), transform=eval_transform) if has_test else None
    return DataBundle(train, val, test, len(classes["train"]), size, chans)
