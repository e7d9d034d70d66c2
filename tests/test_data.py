from __future__ import annotations

import gzip
import hashlib
import struct
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from pathsearch.config import load_trial_config
from pathsearch.config.typed import ConfigError
from pathsearch.trial import data
from pathsearch.trial.data import (
    DIGITS_MEAN,
    DIGITS_STD,
    cifar_split_indices,
    load_data,
    load_digits_split,
    make_synthetic,
)


def _rows(dataset) -> Counter:
    """(image bytes, label) of each row, counted: the digits hold a few duplicate images."""
    images, labels = dataset.tensors
    return Counter((x.numpy().tobytes(), int(y)) for x, y in zip(images, labels, strict=True))


def test_digits_default_split_is_60_20_20():
    split = load_digits_split()
    assert (len(split.train), len(split.val), len(split.test)) == (1078, 359, 360)
    split = load_digits_split(300, seed=0)
    assert (len(split.train), len(split.val), len(split.test)) == (300, 748, 749)
    split = load_digits_split(300, seed=0, val_size=200)
    assert (len(split.train), len(split.val), len(split.test)) == (300, 200, 1297)
    assert split.train.tensors[0].shape[1:] == (1, 8, 8)


def test_digits_train_val_test_partition_the_1797_images():
    split = load_digits_split(300, seed=0, val_size=200)
    digits = load_digits()
    images = (torch.from_numpy(digits.images.astype(np.float32))[:, None] - DIGITS_MEAN) / DIGITS_STD
    everything = _rows(torch.utils.data.TensorDataset(images, torch.from_numpy(digits.target)))
    parts = [_rows(split.train), _rows(split.val), _rows(split.test)]
    assert parts[0] + parts[1] + parts[2] == everything  # each image in exactly one split
    for i, j in ((0, 1), (0, 2), (1, 2)):
        shared = parts[i] & parts[j]
        assert all(everything[row] > 1 for row in shared)  # only duplicate images can appear in two splits


def test_digits_split_is_seeded():
    a, b, c = load_digits_split(300, seed=0), load_digits_split(300, seed=0), load_digits_split(300, seed=1)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).tensors[0], getattr(b, name).tensors[0])
        assert not torch.equal(getattr(a, name).tensors[0], getattr(c, name).tensors[0])


def test_digits_sizes_leaving_no_test_or_val_image_are_rejected():
    with pytest.raises(ValueError, match=r"train_size 300 \+ val_size 1497 leave no test images of the 1797 digits"):
        load_digits_split(300, val_size=1497)
    with pytest.raises(ValueError, match=r"train_size 1796 \+ val_size 0 leave no validation images of the 1797"):
        load_digits_split(1796)
    with pytest.raises(ValueError, match=r"train_size 1797 \+ val_size 1 leave no test images of the 1797"):
        load_digits_split(1797, val_size=1)
    with pytest.raises(ValueError, match=r"train_size 5 \+ val_size 896: train_size must be >= 10 .*1797"):
        load_digits_split(5)


def test_datasets_are_loaded_once_per_process():
    first = load_data("digits", train_size=300)
    assert load_data("digits", train_size=300) is first
    assert load_data("digits", train_size=400) is not first
    assert load_data("digits", train_size=300, val_size=100) is not first
    assert len(load_data("digits", train_size=300, val_size=100).val) == 100  # type: ignore[arg-type]


def test_synthetic_is_deterministic():
    a, b = make_synthetic(seed=3), make_synthetic(seed=3)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])  # type: ignore[attr-defined]
    assert a.num_classes == 4


def test_synthetic_has_a_deterministic_test_split():
    a, b = make_synthetic(seed=3), make_synthetic(seed=3, val_size=32)
    assert a.test is not None and b.test is not None
    assert len(a.test) == 128 and len(b.test) == len(b.val) == 32  # type: ignore[arg-type]
    assert torch.equal(a.test.tensors[0], make_synthetic(seed=3).test.tensors[0])  # type: ignore[union-attr]
    assert not torch.equal(a.test.tensors[0], a.val.tensors[0])  # type: ignore[attr-defined]
    assert len(load_data("synthetic", val_size=16).test) == 16  # type: ignore[arg-type]


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


def test_imagefolder_test_folder_is_the_test_split(tmp_path):
    _write_images(tmp_path / "train", ["cat", "dog"])
    _write_images(tmp_path / "val", ["cat", "dog"], per_class=1)
    _write_images(tmp_path / "test", ["cat", "dog"], per_class=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a root with test/ warns about nothing
        bundle = load_data("imagefolder", root=str(tmp_path), img_size=16)
    assert bundle.test is not None and len(bundle.test) == 6  # type: ignore[arg-type]
    image, label = bundle.test[5]
    assert tuple(image.shape) == (3, 16, 16) and label == 1
    _write_images(tmp_path / "test", ["bird"])
    with pytest.raises(ValueError, match=r"only in train: \[\]; only in test: \['bird'\]"):
        load_data("imagefolder", root=str(tmp_path), img_size=8)


def test_imagefolder_without_test_folder_has_no_test_split_and_says_so_once(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_warned_no_test", False)  # once per process: earlier tests may have said it
    for root in (tmp_path / "a", tmp_path / "b"):
        _write_images(root / "train", ["cat", "dog"])
        _write_images(root / "val", ["cat", "dog"], per_class=1)
    message = f"imagefolder: {tmp_path / 'a' / 'test'} does not exist: no test split, no test figure will be reported"
    with pytest.warns(UserWarning) as record:
        assert load_data("imagefolder", root=str(tmp_path / "a"), img_size=16).test is None
    assert [str(w.message) for w in record] == [message]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second root without test/: not said again
        assert load_data("imagefolder", root=str(tmp_path / "b"), img_size=16).test is None


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


# torchvision checks each CIFAR batch file against fixed md5 sums, so no tiny CIFAR can be written for a test: the
# split is tested through the function that _load_cifar uses to draw its indices.
def test_cifar_val_is_a_seeded_slice_of_the_training_set_apart_from_train():
    train, val = cifar_split_indices(50000)
    assert len(val) == 5000 and len(train) == 45000
    assert sorted(torch.cat([train, val]).tolist()) == list(range(50000))  # disjoint, nothing left out
    again_train, again_val = cifar_split_indices(50000, seed=0)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert not torch.equal(val, cifar_split_indices(50000, seed=1)[1])
    small_train, same_val = cifar_split_indices(50000, 5000, train_size=1000)
    assert torch.equal(same_val, val)  # a training subset leaves val as it was
    assert len(small_train) == 1000 and not set(small_train.tolist()) & set(val.tolist())
    with pytest.raises(ValueError, match=r"val_size must be in 1\.\.49999"):
        cifar_split_indices(50000, val_size=50000)
    with pytest.raises(ValueError, match=r"train_size must be in 1\.\.45000"):
        cifar_split_indices(50000, 5000, train_size=45001)


def _problems(tmp_path, data_section: str) -> str:
    path = tmp_path / "sizes.yaml"
    path.write_text(f"data: {data_section}\n")
    with pytest.raises(ConfigError) as info:
        load_trial_config(path)
    assert all(p.startswith(str(path)) for p in info.value.problems)
    return str(info.value)


def test_split_sizes_are_validated_with_file_key_and_value(tmp_path):
    text = _problems(tmp_path, "{name: digits, train_size: 300, val_size: 1497}")
    assert (
        "data.val_size: digits: train_size 300 + val_size 1497 leave no test images of the 1797 digits, got 1497"
        in text
    )
    text = _problems(tmp_path, "{name: digits, train_size: 1797}")
    assert "data.train_size: digits: train_size 1797 + val_size 0 leave no validation images" in text
    assert "got 1797" in text
    assert "data.val_size: must be >= 1, got 0" in _problems(tmp_path, "{name: synthetic, val_size: 0}")
    text = _problems(tmp_path, f"{{name: cifar10, root: {tmp_path}, val_size: 50000}}")
    assert "data.val_size: must be < 50000, the CIFAR training images, got 50000" in text
    text = _problems(tmp_path, f"{{name: cifar100, root: {tmp_path}, train_size: 45001}}")
    assert "data.train_size: must be <= 45000, the CIFAR training images left by val_size 5000, got 45001" in text
    assert load_trial_config(None, ["data.train_size=300", "data.val_size=1496"]).data.val_size == 1496


# --- fashion_mnist and mnist: torchvision's classes, held as normalised tensors ---------------------------------------


def _write_mnist(raw, train=120, test=30, seed=0):
    """Tiny MNIST-format files (IDX: big-endian magic 2051 images / 2049 labels, then the sizes) with the names
    torchvision reads from ROOT/MNIST/raw/, uncompressed; torchvision only checks that they exist."""
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    written = {}
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
        written[prefix] = (images, labels)
    return written


def _run_train(tmp_path, data_section: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "bad.yaml").write_text(
        "model: {kwargs: {depth: 2, embed_dim: 32, num_heads: 2, patch_size: 7}}\n"
        f"data: {data_section}\ntrain: {{epochs: 1, warmup_epochs: 0}}\n"
    )
    cmd = [sys.executable, "-m", "pathsearch.cli", "train", "bad.yaml", "--no-progress"]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(
    not data.FASHION_MNIST_DEBIAN.is_dir(),
    reason=f"needs Debian's dataset-fashion-mnist package ({data.FASHION_MNIST_DEBIAN} does not exist)",
)
def test_fashion_mnist_is_unpacked_from_debians_package_and_split_like_cifar(tmp_path):
    from torchvision import datasets

    bundle = load_data("fashion_mnist", root=str(tmp_path), download=True, train_size=1000, val_size=500)
    raw = tmp_path / "FashionMNIST" / "raw"
    for name, md5 in data.FASHION_MNIST_MD5.items():  # the official files, where torchvision reads them
        assert hashlib.md5((raw / name).read_bytes()).hexdigest() == md5
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (1000, 500, 10000)  # type: ignore[arg-type]
    assert (bundle.num_classes, bundle.img_size, bundle.in_chans) == (10, 28, 1)
    official = datasets.FashionMNIST(str(tmp_path), train=True)
    assert len(official) == 60000
    train_idx, val_idx = cifar_split_indices(60000, 500, 1000, seed=0)
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    mean, std = data.MNIST_STATS["fashion_mnist"]
    for split, idx in ((bundle.train, train_idx), (bundle.val, val_idx)):  # drawn from the training set, normalised
        images, labels = split.tensors  # type: ignore[attr-defined]
        assert images.shape[1:] == (1, 28, 28) and images.dtype == torch.float32
        assert torch.equal(((images[:, 0] * std + mean) * 255).round().to(torch.uint8), official.data[idx])
        assert torch.equal(labels, official.targets[idx])
    test_images, test_labels = bundle.test.tensors  # type: ignore[union-attr]
    assert test_images.shape == (10000, 1, 28, 28) and sorted(test_labels.unique().tolist()) == list(range(10))
    assert torch.equal(test_labels, datasets.FashionMNIST(str(tmp_path), train=False).targets)
    again = load_data("fashion_mnist", root=str(tmp_path), train_size=1000, val_size=500)  # files there: no download
    assert torch.equal(again.val.tensors[0], bundle.val.tensors[0])  # type: ignore[attr-defined]
    other = load_data("fashion_mnist", root=str(tmp_path), train_size=1000, val_size=500, split_seed=1)
    assert not torch.equal(other.val.tensors[1], bundle.val.tensors[1])  # type: ignore[attr-defined]
    full = load_data("fashion_mnist", root=str(tmp_path))  # defaults: val 5000, train all the rest
    assert (len(full.train), len(full.val), len(full.test)) == (55000, 5000, 10000)  # type: ignore[arg-type]
    assert abs(float(full.train.tensors[0].mean())) < 0.01  # type: ignore[attr-defined]


def test_mnist_reads_idx_files_placed_under_root(tmp_path):
    written = _write_mnist(tmp_path / "MNIST" / "raw")
    bundle = load_data("mnist", root=str(tmp_path), train_size=50, val_size=20, split_seed=3)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (50, 20, 30)  # type: ignore[arg-type]
    assert (bundle.num_classes, bundle.img_size, bundle.in_chans) == (10, 28, 1)
    _, val_idx = cifar_split_indices(120, 20, 50, seed=3)
    mean, std = data.MNIST_STATS["mnist"]
    images, labels = bundle.val.tensors  # type: ignore[attr-defined]
    assert images.shape == (20, 1, 28, 28)
    restored = ((images[:, 0] * std + mean) * 255).round().to(torch.uint8)
    assert torch.equal(restored, torch.from_numpy(written["train"][0][val_idx.numpy()]))
    assert torch.equal(labels, torch.from_numpy(written["train"][1][val_idx.numpy()]).long())
    test_images = bundle.test.tensors[0]  # type: ignore[union-attr]
    assert torch.equal(
        ((test_images[:, 0] * std + mean) * 255).round().to(torch.uint8), torch.from_numpy(written["t10k"][0])
    )
    resized = load_data("mnist", root=str(tmp_path), train_size=50, val_size=20, img_size=32)
    assert resized.img_size == 32 and resized.train.tensors[0].shape == (50, 1, 32, 32)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"MNIST val_size must be in 1\.\.119 \(of 120 training images\), got 5000"):
        load_data("mnist", root=str(tmp_path))


def test_mnist_downloads_through_torchvisions_own_code_from_an_http_mirror(tmp_path, monkeypatch):
    """download: true fetches with torchvision's own downloader (HTTP, md5 check, gunzip) from a mirror on loopback
    serving tiny IDX files: the path that fetches the real files where the internet is reachable."""
    import functools
    import http.server
    import threading

    from torchvision import datasets

    mirror = tmp_path / "mirror"
    written = _write_mnist(mirror, train=60, test=20, seed=5)
    resources = []
    for plain in sorted(mirror.iterdir()):
        packed = plain.with_name(plain.name + ".gz")
        packed.write_bytes(gzip.compress(plain.read_bytes()))
        resources.append((packed.name, hashlib.md5(packed.read_bytes()).hexdigest()))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(datasets.MNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"])
        monkeypatch.setattr(datasets.MNIST, "resources", resources)
        bundle = load_data("mnist", root=str(tmp_path / "data"), download=True, train_size=30, val_size=10)
    finally:
        server.shutdown()
    raw = tmp_path / "data" / "MNIST" / "raw"
    for plain in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        assert (raw / plain).read_bytes() == (mirror / plain).read_bytes()  # fetched and unpacked where it reads
    mean, std = data.MNIST_STATS["mnist"]
    test_images, test_labels = bundle.test.tensors  # type: ignore[union-attr]
    restored = ((test_images[:, 0] * std + mean) * 255).round().to(torch.uint8)
    assert torch.equal(restored, torch.from_numpy(written["t10k"][0]))
    assert torch.equal(test_labels, torch.from_numpy(written["t10k"][1]).long())
    assert (len(bundle.train), len(bundle.val)) == (30, 10)  # type: ignore[arg-type]


def test_missing_mnist_files_name_the_files_and_where_to_get_them(tmp_path, monkeypatch):
    """Through `pathsearch train` (the config check: exit 2 before a run folder), then load_data itself."""
    result = _run_train(tmp_path, f"{{name: fashion_mnist, root: {tmp_path / 'data'}}}")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, lines
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert (
        f"data.root: dataset 'fashion_mnist': {raw}/ lacks train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        in lines[0]
    )
    assert "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte" in lines[0]
    assert (
        "Debian's package dataset-fashion-mnist ships Fashion-MNIST in /usr/share/datasets/fashion-mnist/" in lines[0]
    )
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
    with pytest.raises(ValueError, match=r"MNIST/raw/ lacks t10k-labels-idx1-ubyte .*set data\.download: true"):
        _write_mnist(tmp_path / "MNIST" / "raw")
        (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
        load_data("mnist", root=str(tmp_path))
    # download allowed, every mirror failing (no network needed): torchvision's attempts, on one line
    from torchvision import datasets

    monkeypatch.setattr(datasets.MNIST, "mirrors", ["file:///nonexistent-mirror/"])
    with pytest.raises(ValueError) as info:
        load_data("mnist", root=str(tmp_path / "empty"), download=True)
    message = str(info.value)
    assert "\n" not in message and "lacks train-images-idx3-ubyte" in message
    assert "download failed: Error downloading train-images-idx3-ubyte.gz: Tried file:///nonexistent-mirror/" in message


def test_a_bad_idx_file_is_one_line_naming_it(tmp_path):
    """A wrong magic number through `pathsearch train` (found when the data loads: exit 2, no run folder left), a
    truncated file and a gzip file under the uncompressed name through load_data."""
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist(raw)
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(struct.pack(">I", 2052) + images.read_bytes()[4:])
    result = _run_train(tmp_path, f"{{name: mnist, root: {tmp_path}, train_size: 50, val_size: 20}}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"pathsearch train: error: dataset 'mnist': {images}: magic number 2052 where an uncompressed IDX images "
        "file has 2051: not MNIST-format data"
    ]
    assert not any((tmp_path / "runs" / "train").iterdir())  # the run's folder was removed again
    _write_mnist(raw)
    labels = raw / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-5])
    with pytest.raises(ValueError, match=rf"{labels}: truncated or corrupt IDX labels file \(torchvision: shape"):
        load_data("mnist", root=str(tmp_path), train_size=50, val_size=20)
    _write_mnist(raw)
    (raw / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 100) + bytes(100))  # valid, too few
    with pytest.raises(ValueError, match=rf"{images} holds 120 images but .*train-labels-idx1-ubyte 100 labels"):
        load_data("mnist", root=str(tmp_path), train_size=50, val_size=20)
    _write_mnist(raw)
    images.write_bytes(gzip.compress(images.read_bytes()))
    with pytest.raises(ValueError, match=rf"{images}: magic number 52\d+ where an uncompressed IDX images file"):
        load_data("mnist", root=str(tmp_path), train_size=50, val_size=20)


def test_mnist_split_sizes_are_validated_against_the_60000_training_images(tmp_path):
    text = _problems(tmp_path, "{name: fashion_mnist, download: true, train_size: 55001}")
    assert (
        "data.train_size: must be <= 55000, the Fashion-MNIST training images left by val_size 5000, got 55001" in text
    )
    text = _problems(tmp_path, "{name: mnist, download: true, val_size: 60000}")
    assert "data.val_size: must be < 60000, the MNIST training images, got 60000" in text
    text = _problems(tmp_path, "{name: mnist, download: true, val_size: 10000, train_size: 50001}")
    assert "data.train_size: must be <= 50000, the MNIST training images left by val_size 10000, got 50001" in text
    assert load_trial_config(None, ["data.name=mnist", "data.download=true", "data.train_size=55000"]).data.train_size


def test_the_shape_validation_reads_is_the_shape_the_loader_gives():
    """pathsearch.preflight sizes the meta-device model by data_shape, without loading images: it must be what
    load_data gives the real model (digits stay 8 x 8 whatever img_size says)."""
    from pathsearch.trial.data import data_shape, load_data

    for name, img_size in (("digits", None), ("digits", 16), ("synthetic", None), ("synthetic", 12)):
        bundle = load_data(name, img_size=img_size)
        assert data_shape(name, None, img_size) == (bundle.in_chans, bundle.img_size, bundle.num_classes), name
