"""The CIFAR-10 reader: official format written here, md5 handling, corrupt files, torchvision."""

import hashlib
import pickle

import numpy as np
import pytest

from pcfast.data import cifar10 as c10
from pcfast.data.cifar10 import CIFAR10Error, find_cifar10, load_cifar10, read_batch


def _write_batch(path, images, labels, bytes_keys: bool):
    entry = {"batch_label": "testing batch", "labels": [int(v) for v in labels],
             "data": images.reshape(len(images), 3072), "filenames": ["x.png"] * len(images)}
    if bytes_keys:
        entry = {k.encode(): v for k, v in entry.items()}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


@pytest.fixture
def tiny_copy(tmp_path):
    """A cifar-10-batches-py folder with 6 files of 4 images each (bytes keys for the first 3)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected = {}
    for i, name in enumerate(c10.TRAIN_FILES + c10.TEST_FILES):
        images = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, 4)
        _write_batch(folder / name, images, labels, bytes_keys=i < 3)
        expected[name] = (images, labels)
    return tmp_path, expected


def test_reads_both_key_kinds_in_the_official_layout(tiny_copy):
    root, expected = tiny_copy
    train = load_cifar10(root, train=True, allow_unofficial=True)
    test = load_cifar10(root, train=False, allow_unofficial=True)
    want = np.concatenate([expected[n][0] for n in c10.TRAIN_FILES])
    np.testing.assert_array_equal(train.images, want)
    np.testing.assert_array_equal(train.labels, np.concatenate([expected[n][1] for n in c10.TRAIN_FILES]))
    np.testing.assert_array_equal(test.images, expected["test_batch"][0])
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert train.images.shape == (20, 3, 32, 32)


def test_an_unofficial_copy_is_refused_unless_allowed(tiny_copy):
    root, _ = tiny_copy
    with pytest.raises(CIFAR10Error, match="not the official"):
        load_cifar10(root, train=False, allow_unofficial=False)
    assert len(load_cifar10(root, train=False, allow_unofficial=True)) == 4


def test_official_md5_sums_are_accepted_without_the_flag(tiny_copy, monkeypatch):
    root, _ = tiny_copy
    folder = root / "cifar-10-batches-py"
    sums = {n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in c10.OFFICIAL_MD5}
    monkeypatch.setattr(c10, "OFFICIAL_MD5", sums)
    assert len(load_cifar10(root, train=True, allow_unofficial=False)) == 20


def test_the_environment_variable_allows_an_unofficial_copy(tiny_copy, monkeypatch):
    root, _ = tiny_copy
    monkeypatch.setenv("PCFAST_ALLOW_UNOFFICIAL_DATA", "1")
    assert len(load_cifar10(root, train=False)) == 4


def test_a_truncated_file_is_named_in_the_error(tiny_copy):
    root, _ = tiny_copy
    path = root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(CIFAR10Error, match="data_batch_3.*truncated or corrupt"):
        load_cifar10(root, train=True, allow_unofficial=True)


def test_a_corrupt_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x02this is not a pickle at all")
    with pytest.raises(CIFAR10Error, match="data_batch_1"):
        read_batch(path)


def test_wrong_contents_are_named_in_the_error(tmp_path):
    path = tmp_path / "test_batch"
    _write_batch(path, np.zeros((2, 3, 32, 32), np.uint8), [0, 1], bytes_keys=False)
    entry = pickle.loads(path.read_bytes())
    entry["data"] = entry["data"][:, :100]
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(CIFAR10Error, match="test_batch.*3072"):
        read_batch(path)


def test_a_missing_folder_or_file_is_reported(tmp_path):
    with pytest.raises(CIFAR10Error, match="no cifar-10-batches-py"):
        load_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(CIFAR10Error, match="missing"):
        load_cifar10(tmp_path, train=False, allow_unofficial=True)


def test_find_prefers_the_given_folder_then_the_environment(tiny_copy, tmp_path, monkeypatch):
    root, _ = tiny_copy
    monkeypatch.setenv("PCFAST_CIFAR10_DIR", str(root))
    assert find_cifar10(None) == root
    monkeypatch.delenv("PCFAST_CIFAR10_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))
    assert find_cifar10(tmp_path / "nowhere") is None


def test_real_copy_matches_torchvisions_reader(cifar10_dir):
    from torchvision.datasets import CIFAR10

    class Unchecked(CIFAR10):
        # The re-encoded copy has other md5 sums than the ones torchvision insists on.
        def _check_integrity(self) -> bool:
            return True

        def _load_meta(self) -> None:
            self.classes = []

    for train in (True, False):
        ours = load_cifar10(cifar10_dir, train=train, allow_unofficial=True)
        theirs = Unchecked(str(cifar10_dir), train=train, download=False)
        assert len(ours) == (50_000 if train else 10_000)
        np.testing.assert_array_equal(ours.images, theirs.data.transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(ours.labels, np.asarray(theirs.targets))


def test_download_goes_through_torchvision_and_failure_means_none(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.delenv("PCFAST_CIFAR10_DIR", raising=False)  # the fakes below stand in for it
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    calls = []

    class Offline:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    assert find_cifar10(tmp_path / "dl", download=True) is None
    assert calls == [(str(tmp_path / "dl"), True, True)]

    class Online:
        def __init__(self, root, train, download):
            (tmp_path / "dl" / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Online)
    assert find_cifar10(tmp_path / "dl", download=True) == tmp_path / "dl"
