"""One CUDA-graph capture kept across batches, replaced only when its key changes.

The fast backend captures the whole relaxation (error init + ``T`` steps) once per key (graph
structure and shapes, dtypes, device, ``T``, rate, schedule, clamp, kernels) over static
buffers, and replays it for every later batch with that key after copying the batch's saved
tensors into the captured ones. :class:`CaptureCache` holds that one entry; the capture itself
is any object (a :class:`CudaGraphRelaxation` on CUDA, a fake in the CPU tests).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch


class CaptureCache:
    """Holds one ``(key, entry)``; :meth:`get` builds a new entry only when the key changes.

    Example::

        cache = CaptureCache()
        entry, fresh = cache.get(key, lambda: capture(...))
    """

    def __init__(self) -> None:
        self.key: Hashable | None = None
        self.entry: Any = None
        self.builds = 0

    def get(self, key: Hashable, build: Callable[[], Any]) -> tuple[Any, bool]:
        """``(entry, fresh)``: the cached entry for ``key``, or a newly built one (``fresh``)."""
        if self.entry is not None and self.key == key:
            return self.entry, False
        self.clear()  # free the old graph and its pool before capturing the new one
        entry = build()
        self.key, self.entry = key, entry
        self.builds += 1
        return entry, True

    def clear(self) -> None:
        self.key, self.entry = None, None


class CudaGraphRelaxation:
    """``run()`` (the relaxation over static buffers) captured in a CUDA graph.

    Building it runs ``run()`` once eagerly on a side stream (which warms up every kernel and
    computes this batch's result), then captures it; :meth:`replay` reruns it.
    """

    def __init__(self, run: Callable[[], None], device: torch.device) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()  # warm-up: the real relaxation of the batch that triggered the capture
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            run()  # recorded only

    def replay(self) -> None:
        self.graph.replay()
