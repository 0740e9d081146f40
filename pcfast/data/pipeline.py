"""From a training configuration to device loaders: find the data, split, preprocess, batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pcfast.data.cifar10 import (
    FOLDER,
    CIFAR10Error,
    CIFAR10Split,
    allow_unofficial_default,
    find_cifar10,
    load_cifar10,
    missing_files,
    named_location,
    resolve_root,
)
from pcfast.data.fancy_pca import FancyPCA
from pcfast.data.loader import DeviceLoader
from pcfast.data.preprocess import build_preprocessor
from pcfast.data.synthetic import make_synthetic

AUGMENTS = ("none", "flip", "flip-crop")
SYNTHETIC = "synthetic"  # DataBundle.source of the built-in synthetic set


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
    """Training and test splits and their source (``"cifar10:<path>"`` or ``"synthetic"``).

    ``synthetic=True`` asks for the built-in synthetic set. A location the user named
    (``data_dir``, else ``$PCFAST_CIFAR10_DIR``) must hold a complete, valid copy, or be
    downloaded into with ``download=True``: anything else raises :class:`CIFAR10Error` naming the
    path and what is wrong. Only with no location named does a missing copy (none in
    ``~/.cache/pcfast``, none downloaded) fall back to the synthetic set, said in one line.
    """
    if synthetic:
        train, test = make_synthetic()
        return train, test, SYNTHETIC
    named = named_location(data_dir)
    root = find_cifar10(data_dir, download=download)
    if root is None and named is None:
        log("No CIFAR-10 copy found and none could be downloaded (--data-dir, "
            "PCFAST_CIFAR10_DIR or --download): training on the built-in synthetic dataset.")
        train, test = make_synthetic()
        return train, test, SYNTHETIC
    if named is not None:
        path, how = named
        where = f"the CIFAR-10 location given by {how}, {path},"
        fetch = "" if download else " (add --download to fetch it there)"
        fix = (f"Point {how} at the folder holding a complete {FOLDER} copy{fetch}, or pass "
               "--synthetic for the built-in synthetic dataset")
    else:  # the copy in ~/.cache/pcfast
        where = f"the CIFAR-10 copy in {root}"
        fix = "Delete it (a later --download fetches it again) or replace it with a complete copy"
    if root is None:
        assert named is not None  # an unnamed location without a copy fell back above
        raise CIFAR10Error(f"{where} cannot be used: {_absent(named[0], download)}. {fix}; "
                           "nothing was trained")
    missing = missing_files(root)
    if missing:
        raise CIFAR10Error(f"{where} cannot be used: {resolve_root(root)} is incomplete, "
                           f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing. "
                           f"{fix}; nothing was trained")
    try:
        train = load_cifar10(root, train=True, allow_unofficial=allow_unofficial)
        test = load_cifar10(root, train=False, allow_unofficial=allow_unofficial)
    except CIFAR10Error as exc:  # names the file and the fix (re-download, --allow-unofficial-data)
        raise CIFAR10Error(f"{where} cannot be used: {exc}; nothing was trained") from exc
    return train, test, f"cifar10:{root}"


def _absent(path: Path, download: bool) -> str:
    if not path.exists():
        what = "the folder does not exist"
    elif not path.is_dir():
        what = "it is not a folder"
    else:
        what = f"it holds no {FOLDER} folder"
    if download:
        what += " and downloading CIFAR-10 into it through torchvision failed (offline?)"
    return what


def data_label(source: str) -> str:
    """A short name of a run's data for titles: ``"synthetic data"`` or ``"CIFAR-10"``."""
    return "synthetic data" if source == SYNTHETIC else "CIFAR-10"


def build_data(cfg, device: torch.device, log=print) -> DataBundle:
    """Loaders for the run described by ``cfg`` (a :class:`pcfast.train.TrainConfig`)."""
    if cfg.augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {cfg.augment!r}")
    # The flag or PCFAST_ALLOW_UNOFFICIAL_DATA=1: either one accepts a copy with other md5 sums.
    allow_unofficial = cfg.allow_unofficial_data or allow_unofficial_default()
    train, test, source = load_splits(cfg.data_dir, cfg.download, allow_unofficial,
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
