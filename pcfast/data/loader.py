"""A GPU-resident loader: the uint8 dataset lives on the device, augmentation runs there too.

No worker processes, no host-side transforms: per batch, one gather of uint8 images, a random
horizontal flip and a pad-and-crop as tensor ops, then the preprocessor. Shuffling uses a
generator seeded from ``(seed, epoch)``, so a resumed run sees the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F


class DeviceLoader:
    """Batches of ``(x float (B, 3, H, W), y int64 (B,))`` from device-resident uint8 images.

    Args:
        images: ``(N, C, H, W)`` uint8 tensor (moved to ``device``).
        labels: ``(N,)`` integer tensor.
        batch_size: batch size.
        shuffle: reshuffle every epoch (seeded by ``seed`` and the epoch).
        flip: random horizontal flips.
        crop_padding: zero-pad by this many pixels and crop back at a random offset (0: off).
        preprocess: callable on float images in ``[0, 1]`` (e.g. a channel normaliser).
        augment: optional extra callable on float images in ``[0, 1]`` (training only).
        drop_last: drop the last incomplete batch.

    Example::

        loader = DeviceLoader(images, labels, 256, flip=True, crop_padding=4, device="cuda")
        for epoch in range(10):
            loader.set_epoch(epoch)
            for x, y in loader: ...
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = False, flip: bool = False, crop_padding: int = 0,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                 drop_last: bool = False, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.long)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.flip = flip
        self.crop_padding = crop_padding
        self.preprocess = preprocess
        self.augment = augment
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Fix the shuffling and augmentation of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        n = self.images.shape[0]
        order = (torch.randperm(n, generator=g, device=self.device) if self.shuffle
                 else torch.arange(n, device=self.device))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx].float().div_(255)
            if self.flip:
                flip = torch.rand(x.shape[0], device=self.device, generator=g) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            if self.crop_padding:
                x = random_crop(x, self.crop_padding, g)
            if self.augment is not None:
                x = self.augment(x, g)
            if self.preprocess is not None:
                x = self.preprocess(x)
            yield x, self.labels[idx]


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad ``x`` (B, C, H, W) by ``padding`` and crop each image back at a random offset."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (b, 2), device=x.device, generator=generator)
    rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    chan = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[batch, chan, rows, cols]
