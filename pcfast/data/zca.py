"""Per-pixel mean subtraction and ZCA whitening, fitted on the training split, run on device.

Both follow the preprocessor protocol of :mod:`pcfast.data.preprocess`: ``fit(train_uint8_nchw)``
learns the statistics from the training images only, ``__call__(x01)`` maps a float batch in
``[0, 1]`` (after augmentation) to the network input.
"""

from __future__ import annotations

import torch


def _check_uint8_nchw(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        raise ValueError(
            f"fit() takes the training images as a uint8 (N, C, H, W) tensor, got {got}; "
            "pass the raw CIFAR-10 training split, not preprocessed floats"
        )


class PixelMean:
    """Subtract the training set's per-pixel mean image (He et al. 2016, CIFAR-10).

    Args:
        scale: output units per unit of ``[0, 1]`` input. ``255.0`` (default) works on the raw
            0..255 pixel scale, as the paper does; ``1.0`` gives the same divided by 255.

    ``__call__``: ``(N, C, H, W)`` float in ``[0, 1]`` -> ``scale * (x - mean)``, same shape.

    Example::

        prep = PixelMean(scale=1.0).fit(train_uint8)   # train_uint8: (45000, 3, 32, 32)
        x = prep(images_uint8.float() / 255)           # zero mean over the training split
    """

    def __init__(self, scale: float = 255.0) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = float(scale)
        self.mean: torch.Tensor | None = None

    def fit(self, train_images: torch.Tensor) -> PixelMean:
        _check_uint8_nchw(train_images)
        # float64 sum: a float32 running sum of 45k values loses the last digits of the mean.
        self.mean = (train_images.double().mean(dim=0, keepdim=True) / 255).float()
        return self

    def _require_fit(self) -> torch.Tensor:
        if self.mean is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(train_images) first")
        return self.mean

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = self._require_fit()
        if x.shape[1:] != mean.shape[1:]:
            raise ValueError(f"fitted on images {tuple(mean.shape[1:])}, got {tuple(x.shape[1:])}")
        return (x - mean.to(x.device, x.dtype)) * self.scale


class ZCAWhiten(PixelMean):
    """Per-pixel mean subtraction (on the ``[0, 1]`` scale), then ZCA whitening.

    With the training covariance ``Sigma = U diag(s) U^T`` of the flattened, mean-subtracted
    images (``D = C*H*W``), the whitening matrix is ``W = U diag(1 / sqrt(s + eps)) U^T``; the
    whitened training data then has covariance ``U diag(s / (s + eps)) U^T`` (identity as
    ``eps -> 0``). ``eps`` regularises the near-zero eigenvalues of natural images.

    Args:
        eps: added to the eigenvalues (units of the ``[0, 1]`` scale squared).
        chunk: rows per block when accumulating the covariance (bounds the float64 memory).

    ``__call__``: ``(N, C, H, W)`` float in ``[0, 1]`` -> whitened ``(N, C, H, W)``.

    Example::

        prep = ZCAWhiten(eps=1e-2).fit(train_uint8)
        x = prep(batch_uint8.float() / 255)
    """

    def __init__(self, eps: float = 1e-2, chunk: int = 4096) -> None:
        super().__init__(scale=1.0)
        if not eps >= 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        self.eps = float(eps)
        self.chunk = int(chunk)
        self.eigenvalues: torch.Tensor | None = None
        self.eigenvectors: torch.Tensor | None = None
        self.matrix: torch.Tensor | None = None

    def fit(self, train_images: torch.Tensor) -> ZCAWhiten:
        super().fit(train_images)
        n, d = train_images.shape[0], train_images[0].numel()
        if n < 2:
            raise ValueError("ZCA needs at least two training images")
        if n <= d and self.eps == 0:
            raise ValueError(
                f"the training covariance is singular ({n} images for {d} pixel values); "
                "use eps > 0, e.g. ZCAWhiten(eps=1e-2)"
            )
        mean = self.mean.double().flatten()
        rows = [train_images[i:i + self.chunk].flatten(1).double() / 255 - mean
                for i in range(0, n, self.chunk)]
        if n > d:
            s, u = self._eig_covariance(rows, d, n)
        else:
            s, u = self._eig_gram(torch.cat(rows), n)
        self.eigenvalues, self.eigenvectors = s, u
        # W = I / sqrt(eps) + U diag(1/sqrt(s + eps) - 1/sqrt(eps)) U^T: when U spans only the
        # data's range (n <= d) the orthogonal complement has eigenvalue 0 and gets 1/sqrt(eps).
        if u.shape[1] == d:
            w = (u / (s + self.eps).sqrt()) @ u.T
        else:
            base = self.eps ** -0.5
            w = (u * ((s + self.eps).rsqrt() - base)) @ u.T
            w.diagonal().add_(base)
        self.matrix = w.float()
        return self

    def _eig_covariance(self, rows: list[torch.Tensor], d: int, n: int):
        """Eigenpairs of the ``d x d`` covariance, accumulated block by block."""
        cov = torch.zeros(d, d, dtype=torch.float64, device=rows[0].device)
        for block in rows:
            cov.addmm_(block.T, block)
        s, u = torch.linalg.eigh(cov / (n - 1))
        s = s.clamp_min(0)  # round-off makes the smallest eigenvalues slightly negative
        if self.eps == 0 and bool((s == 0).any()):
            raise ValueError(
                "the training covariance is singular (constant or duplicated pixels); "
                "use eps > 0, e.g. ZCAWhiten(eps=1e-2)"
            )
        return s, u

    @staticmethod
    def _eig_gram(x: torch.Tensor, n: int):
        """Nonzero eigenpairs of ``x^T x / (n-1)`` from the ``n x n`` Gram matrix (n <= d)."""
        s, v = torch.linalg.eigh(x @ x.T / (n - 1))
        keep = s > s.max() * 1e-10
        s, v = s[keep], v[:, keep]
        u = (x.T @ v) / ((n - 1) * s).sqrt()  # unit-norm eigenvectors of the covariance
        return s, u

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        centred = super().__call__(x)
        w = self.matrix.to(x.device, x.dtype)
        return (centred.flatten(1) @ w).view_as(x)  # W is symmetric: x W == (W x^T)^T
