"""A Res-DualNet depthwise sub-layer case for the fused-op tests: float64 tensors of
``out = ReLU(BN_train(dual_path_dwconv(x, w, stride)))`` and a gradient ``g`` of ``out``'s shape.

Example::

    t = dw_case((2, 3, 7, 9), stride=2)   # keys x, w, gamma, beta, z, out, g
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pcfast.ops.dwconv import dual_path_dwconv_ref

EPS = 1e-5


def dw_case(shape, stride, affine=True, seed=0) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    wt = torch.randn(2 * c, 1, 3, 3, generator=gen, dtype=torch.float64) * 0.5
    gamma = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5 if affine else None
    beta = torch.randn(c, generator=gen, dtype=torch.float64) * 0.3 if affine else None
    z = dual_path_dwconv_ref(x, wt, stride)
    out = torch.relu(F.batch_norm(z, None, None, gamma, beta, training=True, eps=EPS))
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    return dict(x=x, w=wt, gamma=gamma, beta=beta, z=z, out=out, g=g)
