"""Preprocessing math: per-pixel mean, ZCA whitening, FancyPCA.

On real CIFAR-10 images when PCFAST_CIFAR10_DIR is set (8x8 centre crops of one batch file, to
keep the covariance small), on synthetic correlated images otherwise.
"""

from __future__ import annotations

import os

import pytest
import torch

from pcfast.data.fancy_pca import FancyPCA
from pcfast.data.zca import PixelMean, ZCAWhiten


def _synthetic(n: int = 6000, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, 8, 8) images with correlated pixels and colours (a random linear mix)."""
    g = torch.Generator().manual_seed(seed)
    d = 3 * 8 * 8
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    z = torch.randn(n, d, generator=g) @ mix.T
    return (128 + 25 * z).round().clamp(0, 255).to(torch.uint8).view(n, 3, 8, 8)


@pytest.fixture(scope="module")
def train_images() -> torch.Tensor:
    root = os.environ.get("PCFAST_CIFAR10_DIR")
    if not root:
        return _synthetic()
    from pcfast.data.cifar10 import read_batch, resolve_root

    images, _ = read_batch(resolve_root(root) / "data_batch_1")
    return torch.from_numpy(images)[:, :, 12:20, 12:20].contiguous()


def _as01(images: torch.Tensor) -> torch.Tensor:
    return images.double() / 255


def test_pixel_mean_gives_zero_training_mean(train_images):
    raw = PixelMean().fit(train_images)
    out = raw(train_images.float() / 255)
    assert out.mean(dim=0).abs().max() < 1e-3  # 0..255 scale
    assert out.abs().max() > 10  # it is on the raw pixel scale
    scaled = PixelMean(scale=1.0).fit(train_images)
    out01 = scaled(train_images.float() / 255)
    assert out01.mean(dim=0).abs().max() < 1e-5
    torch.testing.assert_close(out01 * 255, out, rtol=1e-5, atol=1e-4)
    # per-pixel, not per-channel: the mean image itself, recomputed independently
    torch.testing.assert_close(scaled.mean[0].double(), _as01(train_images).mean(0),
                               rtol=0, atol=1e-6)


def test_zca_whitened_covariance(train_images):
    eps = 1e-2 * float(_as01(train_images).flatten(1).var(0).mean())
    zca = ZCAWhiten(eps=eps).fit(train_images)
    w = zca(train_images.float() / 255).flatten(1).double()
    assert w.mean(0).abs().max() < 1e-4
    cov = torch.cov(w.T)
    u, s = zca.eigenvectors, zca.eigenvalues
    # exact identity: the whitened covariance is U diag(s / (s + eps)) U^T
    torch.testing.assert_close(cov, (u * (s / (s + eps))) @ u.T, rtol=0, atol=2e-3)
    # and it is the identity on every direction whose variance is well above eps
    v = u[:, s > 100 * eps]
    assert v.shape[1] > 10
    torch.testing.assert_close(v.T @ cov @ v, torch.eye(v.shape[1], dtype=torch.float64),
                               rtol=0, atol=2e-2)
    # the eigenvectors are those of the training covariance, computed independently
    ref = torch.cov(_as01(train_images).flatten(1).T)
    torch.testing.assert_close(ref @ u, u * s, rtol=0, atol=1e-8)


def test_zca_tiny_eps_gives_identity_on_well_conditioned_data():
    images = _synthetic(8000, seed=3)
    zca = ZCAWhiten(eps=1e-9).fit(images)
    cov = torch.cov(zca(images.float() / 255).flatten(1).double().T)
    assert (cov - torch.eye(cov.shape[0], dtype=torch.float64)).abs().max() < 1e-3
    # ZCA keeps images close to themselves (symmetric W), unlike PCA whitening: check W = W^T
    torch.testing.assert_close(zca.matrix, zca.matrix.T)


def test_zca_with_fewer_images_than_pixels_matches_the_full_eigendecomposition(train_images):
    few = train_images[:100]  # 100 images, 192 values each: the covariance has rank 99
    eps = 1e-3
    zca = ZCAWhiten(eps=eps).fit(few)
    assert zca.eigenvalues.shape == (99,)
    s, u = torch.linalg.eigh(torch.cov(_as01(few).flatten(1).T))
    ref = (u / (s.clamp_min(0) + eps).sqrt()) @ u.T
    torch.testing.assert_close(zca.matrix.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_fancy_pca_offsets(train_images):
    aug = FancyPCA(sigma=0.1).fit(train_images)
    pixels = train_images.permute(1, 0, 2, 3).reshape(3, -1).double() / 255
    cov = torch.cov(pixels).float()
    u, lam = aug.eigenvectors, aug.eigenvalues
    torch.testing.assert_close(cov @ u, u * lam, rtol=0, atol=1e-6)

    n = 20000
    x = torch.rand(n, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = aug(x, generator=g)
    shift = out - x
    # one constant RGB offset per image
    assert (shift - shift[:, :, :1, :1]).abs().max() < 1e-6
    offsets = shift[:, :, 0, 0].double()
    alpha = offsets @ u.double() / lam.double().sqrt()  # coefficients along p_i / sqrt(lambda_i)
    assert alpha.mean(0).abs().max() < 4 * 0.1 / n**0.5
    torch.testing.assert_close(alpha.std(0), torch.full((3,), 0.1, dtype=torch.float64),
                               rtol=0.05, atol=0)
    # each image's mean moves by exactly its offset, bounded by 5 sigma sqrt(trace(cov))
    mean_shift = (out.mean(dim=(2, 3)) - x.mean(dim=(2, 3))).double()
    torch.testing.assert_close(mean_shift, offsets, rtol=0, atol=1e-5)
    assert mean_shift.norm(dim=1).max() <= 5 * 0.1 * float(cov.trace()) ** 0.5
    # seeded: the same generator state gives the same augmentation
    torch.testing.assert_close(aug(x[:8], torch.Generator().manual_seed(5)),
                               aug(x[:8], torch.Generator().manual_seed(5)))


def test_fancy_pca_literal_lambda_variant(train_images):
    aug = FancyPCA(sqrt=False).fit(train_images)
    alpha = torch.eye(3)
    torch.testing.assert_close(aug.offsets(alpha), (aug.eigenvectors * aug.eigenvalues).T)


def test_clear_errors():
    with pytest.raises(ValueError, match="uint8"):
        PixelMean().fit(torch.rand(4, 3, 8, 8))
    with pytest.raises(RuntimeError, match="call fit"):
        PixelMean()(torch.rand(4, 3, 8, 8))
    with pytest.raises(ValueError, match="eps > 0"):
        ZCAWhiten(eps=0).fit(_synthetic(50))
    with pytest.raises(ValueError, match="RGB"):
        FancyPCA().fit(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
