"""From a training configuration to device loaders: find the data, split, preprocess, batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pcfast.data.cifar10 import CIFAR10Split, find_cifar10, load_cifar10
from pcfast.data.fancy_pca import FancyPCA
from pcfast.data.loader import DeviceLoader
from pcfast.data.preprocess import build_preprocessor
from pcfast.data.synthetic import make_synthetic

AUGMENTS = ("none", "flip", "flip-crop")


@dataclass
class DataBundle:
    """The loaders of one run and where their images came from."""

    train: DeviceLoader
    val: DeviceLoader | None
    test: DeviceLoader
    source: str  # "cifar10:<path>" or "synthetic"


def subset(split: CIFAR10Split, n: int | None) -> CIFAR10Split:
    if n is None or n >= len(split):
        return split
    return CIFAR10Split(split.images[:n], split.labels[:n])


def split_validation(split: CIFAR10Split, n_val: int, seed: int) -> tuple[CIFAR10Split, CIFAR10Split]:
    """A seeded train/validation split (``n_val`` images held out, e.g. 45k/5k)."""
    if not 0 < n_val < len(split):
        raise ValueError(f"validation size must be in 1..{len(split) - 1}, got {n_val}")
    order = np.random.default_rng(seed).permutation(len(split))
    val, train = order[:n_val], order[n_val:]
    return (CIFAR10Split(split.images[train], split.labels[train]),
            CIFAR10Split(split.images[val], split.labels[val]))


def load_splits(data_dir: str | None, download: bool, allow_unofficial: bool,
                synthetic: bool, log=print) -> tuple[CIFAR10Split, CIFAR10Split, str]:
    """Training and test splits: CIFAR-10 when a copy is found (or downloaded), else synthetic."""
    root = None if synthetic else find_cifar10(data_dir, download=download)
    if root is None:
        if not synthetic:
            log("No CIFAR-10 copy found and none could be downloaded (--data-dir, "
                "PCFAST_CIFAR10_DIR or --download): training on the built-in synthetic dataset.")
        train, test = make_synthetic()
        return train, test, "synthetic"
    train = load_cifar10(root, train=True, allow_unofficial=allow_unofficial)
    test = load_cifar10(root, train=False, allow_unofficial=allow_unofficial)
    return train, test, f"cifar10:{root}"


def build_data(cfg, device: torch.device, log=print) -> DataBundle:
    """Loaders for the run described by ``cfg`` (a :class:`pcfast.train.TrainConfig`)."""
    if cfg.augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {cfg.augment!r}")
    train, test, source = load_splits(cfg.data_dir, cfg.download, cfg.allow_unofficial_data,
                                      cfg.synthetic, log)
    val = None
    if cfg.val_split:
        train, val = split_validation(train, cfg.val_split, cfg.seed)
    train, test = subset(train, cfg.train_subset), subset(test, cfg.test_subset)

    def tensors(s: CIFAR10Split) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(s.images).to(device), torch.from_numpy(s.labels).to(device)

    train_x, train_y = tensors(train)
    prep = build_preprocessor(cfg.preprocess).fit(train_x)
    augment = build_augment(cfg.extra_augment, train_x) if cfg.extra_augment else None
    kw = dict(preprocess=prep, device=device)
    train_loader = DeviceLoader(train_x, train_y, cfg.batch_size, shuffle=True,
                                flip=cfg.augment != "none",
                                crop_padding=4 if cfg.augment == "flip-crop" else 0,
                                augment=augment, seed=cfg.seed, drop_last=False, **kw)
    eval_bs = cfg.eval_batch_size
    val_loader = DeviceLoader(*tensors(val), eval_bs, **kw) if val is not None else None
    test_loader = DeviceLoader(*tensors(test), eval_bs, **kw)
    return DataBundle(train_loader, val_loader, test_loader, source)


AUGMENT_FACTORIES: dict = {"fancy-pca": lambda images: FancyPCA().fit(images)}


def build_augment(name: str, train_images: torch.Tensor):
    """An extra training augmentation, fitted on the training images (e.g. ``fancy-pca``)."""
    try:
        factory = AUGMENT_FACTORIES[name]
    except KeyError:
        known = ", ".join(sorted(AUGMENT_FACTORIES)) or "none registered"
        raise ValueError(f"unknown extra augmentation {name!r}; choose from: {known}") from None
    return factory(train_images)
