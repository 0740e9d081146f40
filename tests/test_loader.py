"""The device-resident loader: order, seeding, flips, crops, preprocessing, splits."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pcfast.data import ChannelNormalize, CIFAR10Split, DeviceLoader, make_synthetic, split_validation


def _indexed_images(n: int) -> torch.Tensor:
    """Images whose pixel (0, 0, 0) holds their index, the rest random: order is recoverable."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return images


def test_each_epoch_is_a_seeded_permutation_with_labels_aligned():
    images = _indexed_images(50)
    labels = torch.arange(50) % 10
    loader = DeviceLoader(images, labels, 16, shuffle=True, seed=3)
    assert len(loader) == 4
    seen = []
    for x, y in loader:
        idx = (x[:, 0, 0, 0] * 255).round().long()
        assert torch.equal(y, labels[idx])
        seen.append(idx)
    order0 = torch.cat(seen)
    assert sorted(order0.tolist()) == list(range(50))
    again = torch.cat([(x[:, 0, 0, 0] * 255).round().long() for x, _ in loader])
    assert torch.equal(order0, again)  # same epoch, same order
    loader.set_epoch(1)
    order1 = torch.cat([(x[:, 0, 0, 0] * 255).round().long() for x, _ in loader])
    assert not torch.equal(order0, order1)


def test_drop_last_and_unshuffled_order():
    loader = DeviceLoader(_indexed_images(10), torch.zeros(10, dtype=torch.long), 4, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    assert (batches[0][0][:, 0, 0, 0] * 255).round().long().tolist() == [0, 1, 2, 3]


def test_flips_are_random_and_whole_images():
    images = _indexed_images(200)
    loader = DeviceLoader(images, torch.zeros(200, dtype=torch.long), 200, flip=True)
    (x, _), = list(loader)
    original = images.float() / 255
    same = (x == original).flatten(1).all(1)
    flipped = (x == original.flip(3)).flatten(1).all(1)
    assert (same | flipped).all()
    assert 60 < flipped.sum() < 140


def test_crops_are_windows_of_the_zero_padded_image():
    images = _indexed_images(12)
    loader = DeviceLoader(images, torch.zeros(12, dtype=torch.long), 12, crop_padding=2, seed=1)
    (x, _), = list(loader)
    padded = F.pad(images.float() / 255, (2, 2, 2, 2))
    offsets = set()
    for i in range(12):
        hits = [(r, c) for r in range(5) for c in range(5)
                if torch.equal(padded[i, :, r:r + 8, c:c + 8], x[i])]
        assert hits, f"image {i} is no window of its padded original"
        offsets.add(hits[0])
    assert len(offsets) > 3


def test_channel_normalisation_is_fitted_on_the_training_images():
    train, _ = make_synthetic(500, 10)
    images = torch.from_numpy(train.images)
    prep = ChannelNormalize().fit(images)
    x = prep(images.float() / 255)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def test_validation_split_is_disjoint_and_seeded():
    images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1).repeat(3, 1)
    split = CIFAR10Split(images, np.arange(100) % 10)
    train, val = split_validation(split, 10, seed=0)
    assert len(train) == 90 and len(val) == 10
    assert not set(train.images[:, 0, 0, 0]) & set(val.images[:, 0, 0, 0])
    again, _ = split_validation(split, 10, seed=0)
    np.testing.assert_array_equal(train.images, again.images)
    with pytest.raises(ValueError, match="validation size"):
        split_validation(split, 100, seed=0)


def test_bad_loader_input_is_rejected():
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="labels"):
        DeviceLoader(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), 2)


@pytest.mark.gpu
def test_the_loader_keeps_data_on_the_gpu(cuda_device):
    loader = DeviceLoader(_indexed_images(64), torch.zeros(64, dtype=torch.long), 16, shuffle=True,
                          flip=True, crop_padding=4, device=cuda_device)
    x, y = next(iter(loader))
    assert x.is_cuda and y.is_cuda and x.shape == (16, 3, 8, 8)
