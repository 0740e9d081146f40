"""Reader for the standard ``cifar-10-batches-py`` folder (the official Python-2 pickles).

The official files are verified against their published md5 sums. A copy whose sums differ (a
re-encoded copy, say) is refused with a message that says so, unless the caller passes
``allow_unofficial=True`` (``--allow-unofficial-data`` on the command line, or the environment
variable ``PCFAST_ALLOW_UNOFFICIAL_DATA=1``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
TEST_FILES = ("test_batch",)
OFFICIAL_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
ENV_VAR = "PCFAST_CIFAR10_DIR"  # a folder holding cifar-10-batches-py
CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class CIFAR10Error(RuntimeError):
    """A CIFAR-10 file is missing, corrupt, truncated or not the official one."""


@dataclass
class CIFAR10Split:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64, both numpy arrays."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file; accepts dicts with ``str`` or ``bytes`` keys.

    Returns ``(images (N, 3, 32, 32) uint8, labels (N,) int64)``.
    """
    path = Path(path)
    if not path.is_file():
        raise CIFAR10Error(f"CIFAR-10 file {path} is missing")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except Exception as exc:  # pickle raises many types on damaged input
        raise CIFAR10Error(
            f"CIFAR-10 file {path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
            "delete the folder and download it again"
        ) from exc
    if not isinstance(entry, dict):
        raise CIFAR10Error(f"CIFAR-10 file {path} holds a {type(entry).__name__}, not a dict")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    labels = entry.get("labels", entry.get("fine_labels"))
    data = entry.get("data")
    if data is None or labels is None:
        raise CIFAR10Error(f"CIFAR-10 file {path} has no 'data' or 'labels' entry")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CIFAR10Error(
            f"CIFAR-10 file {path}: 'data' must be uint8 of shape (N, 3072), "
            f"got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise CIFAR10Error(f"CIFAR-10 file {path}: labels do not match the images or leave 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def allow_unofficial_default() -> bool:
    return os.environ.get("PCFAST_ALLOW_UNOFFICIAL_DATA", "") not in ("", "0")


def verify_files(folder: Path, names: tuple[str, ...], allow_unofficial: bool) -> bool:
    """Check the md5 sums; return True when every file is the official one."""
    bad = [n for n in names if (folder / n).is_file() and md5sum(folder / n) != OFFICIAL_MD5[n]]
    if bad and not allow_unofficial:
        raise CIFAR10Error(
            f"{', '.join(bad)} in {folder} do not match the official CIFAR-10 md5 sums: this is not "
            "the official copy (a re-encoded one?). Pass allow_unofficial=True "
            "(--allow-unofficial-data, or PCFAST_ALLOW_UNOFFICIAL_DATA=1) to use it anyway"
        )
    return not bad


def resolve_root(root: str | os.PathLike) -> Path:
    """Accept the folder holding ``cifar-10-batches-py`` or that folder itself."""
    root = Path(root).expanduser()
    if (root / FOLDER).is_dir():
        return root / FOLDER
    if root.name == FOLDER and root.is_dir():
        return root
    raise CIFAR10Error(f"no {FOLDER} folder in {root}")


def load_cifar10(root: str | os.PathLike, train: bool = True,
                 allow_unofficial: bool | None = None) -> CIFAR10Split:
    """Load the training (50,000) or test (10,000) split from a ``cifar-10-batches-py`` copy.

    Example::

        split = load_cifar10("~/data", train=False)   # ~/data/cifar-10-batches-py
        split.images.shape                             # (10000, 3, 32, 32)
    """
    folder = resolve_root(root)
    names = TRAIN_FILES if train else TEST_FILES
    if allow_unofficial is None:
        allow_unofficial = allow_unofficial_default()
    # Read first: a truncated or corrupt file is reported as such, not as an md5 mismatch.
    parts = [read_batch(folder / n) for n in names]
    verify_files(folder, names, allow_unofficial)
    return CIFAR10Split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def missing_files(root: str | os.PathLike) -> list[str]:
    """The files of a complete copy (five training batches and the test batch) absent in ``root``."""
    folder = resolve_root(root)
    return [n for n in TRAIN_FILES + TEST_FILES if not (folder / n).is_file()]


def named_location(data_dir: str | os.PathLike | None = None) -> tuple[Path, str] | None:
    """The CIFAR-10 location the user named, and how: ``(path, "--data-dir")`` for ``data_dir``,
    which wins over ``(path, "PCFAST_CIFAR10_DIR")`` for the environment variable.

    None when neither is given: only then may a caller fall back to other data.
    """
    if data_dir:
        return Path(data_dir).expanduser(), "--data-dir"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser(), ENV_VAR
    return None


def _holds_copy(path: Path) -> bool:
    return (path / FOLDER).is_dir() or (path.name == FOLDER and path.is_dir())


def find_cifar10(data_dir: str | os.PathLike | None = None, download: bool = False) -> Path | None:
    """The folder holding ``cifar-10-batches-py`` (or that folder itself), or None.

    A named location, ``data_dir`` or else ``$PCFAST_CIFAR10_DIR``, is the only place looked at:
    the flag wins over the environment and neither falls through to another copy. With no
    location named it looks in ``~/.cache/pcfast``. With ``download=True`` it fetches CIFAR-10
    through torchvision into the named location (or the cache) when none is there and the
    machine is online; None when that fails.
    """
    named = named_location(data_dir)
    target = named[0] if named else Path.home() / ".cache" / "pcfast"
    if _holds_copy(target):
        return target
    if not download:
        return None
    try:
        import torchvision.datasets

        # torchvision announces every attempt; the caller says in one line what came of it.
        with contextlib.redirect_stdout(io.StringIO()):
            torchvision.datasets.CIFAR10(str(target), train=True, download=True)
            torchvision.datasets.CIFAR10(str(target), train=False, download=True)
    except Exception:  # offline, blocked, or no torchvision: the caller decides
        return None
    return target if (target / FOLDER).is_dir() else None
