"""FancyPCA colour augmentation (Krizhevsky et al. 2012), fitted on the training split.

Every image gets one random RGB offset along the principal axes of the training pixels' colour
distribution: ``x + sum_i alpha_i * sqrt(lambda_i) * p_i`` with ``alpha_i ~ N(0, sigma)`` drawn
per image, ``(lambda_i, p_i)`` the eigenpairs of the 3x3 RGB covariance of all training pixels
(``[0, 1]`` scale). The square root follows the widely used reference implementation (the
``Lighting`` transform of fb.resnet.torch), which keeps the offset in pixel units; pass
``sqrt=False`` for the literal ``alpha_i * lambda_i`` of the paper's formula.
"""

from __future__ import annotations

import torch

from pcfast.data.zca import _check_uint8_nchw


class FancyPCA:
    """Random per-image colour shift along the training set's RGB principal components.

    Args:
        sigma: standard deviation of ``alpha`` (0.1 in the paper).
        sqrt: scale the axes by ``sqrt(lambda_i)`` (default) or by ``lambda_i``.

    ``__call__(x, generator=None)``: ``(N, 3, H, W)`` float in ``[0, 1]`` -> same shape; no
    clamping, so each image's channel means move by exactly its offset (bounded by
    ``|alpha|_max * sqrt(trace(Sigma))``, i.e. by ``5 sigma sqrt(trace)`` except with
    probability below 1e-6 per image).

    Example::

        aug = FancyPCA().fit(train_uint8)                    # (N, 3, 32, 32) uint8
        x = aug(batch_uint8.float() / 255, generator=g)
    """

    def __init__(self, sigma: float = 0.1, sqrt: bool = True) -> None:
        if not sigma >= 0:
            raise ValueError(f"sigma must be non-negative, got {sigma}")
        self.sigma = float(sigma)
        self.sqrt = sqrt
        self.eigenvalues: torch.Tensor | None = None
        self.eigenvectors: torch.Tensor | None = None

    def fit(self, train_images: torch.Tensor) -> FancyPCA:
        _check_uint8_nchw(train_images)
        if train_images.shape[1] != 3:
            raise ValueError(f"FancyPCA works on RGB images, got {train_images.shape[1]} channels")
        pixels = train_images.permute(1, 0, 2, 3).reshape(3, -1).double() / 255
        cov = torch.cov(pixels)
        s, u = torch.linalg.eigh(cov)
        self.eigenvalues = s.clamp_min(0).float()
        self.eigenvectors = u.float()
        return self

    @property
    def axes(self) -> torch.Tensor:
        """``(3, 3)``: column ``i`` is ``p_i`` scaled by ``sqrt(lambda_i)`` (or ``lambda_i``)."""
        if self.eigenvalues is None:
            raise RuntimeError("FancyPCA is not fitted: call fit(train_images) first")
        scale = self.eigenvalues.sqrt() if self.sqrt else self.eigenvalues
        return self.eigenvectors * scale

    def offsets(self, alpha: torch.Tensor) -> torch.Tensor:
        """RGB offsets ``(N, 3)`` for coefficients ``alpha`` ``(N, 3)``."""
        return alpha @ self.axes.to(alpha.device, alpha.dtype).T

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an RGB batch (N, 3, H, W), got {tuple(x.shape)}")
        alpha = torch.randn(x.shape[0], 3, device=x.device, generator=generator) * self.sigma
        return x + self.offsets(alpha.to(x.dtype))[:, :, None, None]
