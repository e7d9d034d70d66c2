"""Datasets for pathsearch trials: the offline built-in `digits` data (scikit-learn's bundled UCI digits).

Imports torch and numpy (and scikit-learn for the bundled data); never ray, optuna or mlflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

DIGITS_MEAN = 4.88  # pixel statistics of the 1797 images (0..16 grey levels), for normalisation
DIGITS_STD = 6.02


@dataclass
class DigitsSplit:
    train: TensorDataset
    val: TensorDataset
    num_classes: int = 10
    img_size: int = 8
    in_chans: int = 1


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
