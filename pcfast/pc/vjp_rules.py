"""Explicit input-VJPs of PC nodes for the fast engine (``pcfast.pc.fast``).

Under FPA every inference step propagates errors down through fixed Jacobians, so each node's
prediction is computed once per batch by :func:`node_forward`, which also returns a closure
``vjp(e) -> tuple(J_p^T e for each parent p)`` over tensors saved from that pass. The closure is
called every step and runs no autograd for known layers:

- ``nn.Sequential`` (and single modules) made of Linear, Conv2d, AvgPool2d, ReLU, Flatten,
  Identity, ``DualPathDWConv`` and BatchNorm(train)+ReLU pairs (one fused ``bn_relu_vjp``) —
  this covers Res-DualNet's stem and dw sub-layers, pw 1x1 convs and the AvgPool shortcut;
- merges ``AddReLU`` / ``ConcatReLU`` (ReLU mask, then identity / channel split) and ``Head``
  (global mean pool + linear).

Any other node falls back to autograd over its feedforward graph (``torch.autograd.grad`` with
the graph retained: the same closure each step, no forward re-run, so BatchNorm running stats
move once per batch as in the reference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from pcfast.models.dualpath import DualPathDWConv
from pcfast.models.layers import AddReLU, ConcatReLU, Head
from pcfast.ops.bn_relu_vjp import bn_relu_vjp, bn_saved_stats

Vjp = Callable[[torch.Tensor], tuple[torch.Tensor | None, ...]]
UnaryVjp = Callable[[torch.Tensor], torch.Tensor]
KERNELS = ("auto", "triton", "torch")


def _dwconv_input_vjp(g: torch.Tensor, weight: torch.Tensor, stride: int,
                      in_shape: torch.Size, kernels: str) -> torch.Tensor:
    """Input-VJP of the dual-path dwconv: one depthwise transposed conv with the summed kernel."""
    g = g.to(weight.dtype)
    if kernels != "torch":
        from pcfast.ops import _ext

        if _ext.has_kernel("dwconv_bwd_input", g.device.type):
            return torch.ops.pcfast.dwconv_bwd_input(g, weight, stride, in_shape[2], in_shape[3])
    c = in_shape[1]
    summed = weight.reshape(c, 2, 3, 3).sum(1).unsqueeze(1)
    return torch.nn.grad.conv2d_input(in_shape, summed, g, stride=stride, padding=1, groups=c)


def _bn_uses_batch_stats(bn: nn.Module) -> bool:
    return isinstance(bn, nn.BatchNorm2d) and (bn.training or bn.running_mean is None)


def _unary(module: nn.Module, x: torch.Tensor, kernels: str) -> tuple[torch.Tensor, UnaryVjp]:
    """Forward one known module; return its output and input-VJP closure."""
    y = module(x)
    xd, yd = x.detach(), y.detach()
    if isinstance(module, nn.Linear):
        w = module.weight.detach()
        return y, lambda g: g.to(w.dtype) @ w
    if isinstance(module, nn.ReLU):
        return y, lambda g: torch.where(yd > 0, g, 0.0)
    if isinstance(module, (nn.Identity, nn.Flatten)):
        return y, lambda g: g.reshape(xd.shape)
    if isinstance(module, DualPathDWConv):
        w = module.weight.detach()
        return y, lambda g: _dwconv_input_vjp(g, w, module.stride, xd.shape, kernels)
    if isinstance(module, nn.Conv2d):
        w = module.weight.detach()
        return y, lambda g: torch.nn.grad.conv2d_input(
            xd.shape, w, g.to(w.dtype), stride=module.stride, padding=module.padding,
            dilation=module.dilation, groups=module.groups)
    if isinstance(module, nn.AvgPool2d):
        args = (_pair(module.kernel_size), _pair(module.stride or module.kernel_size),
                _pair(module.padding), module.ceil_mode, module.count_include_pad,
                module.divisor_override)
        return y, lambda g: torch.ops.aten.avg_pool2d_backward(g.to(xd.dtype), xd, *args)
    raise TypeError(f"no input-VJP rule for {type(module).__name__}")


def _known_unary(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if isinstance(module, nn.ReLU):
        return not module.inplace
    return isinstance(module, (nn.Linear, nn.Identity, nn.Flatten, DualPathDWConv, nn.AvgPool2d))


def _chain_plan(mods: Sequence[nn.Module]) -> list[tuple[str, tuple[nn.Module, ...]]] | None:
    """Group a module chain into ``("bn_relu", (bn, relu))`` and ``("unary", (m,))`` steps."""
    plan, i = [], 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if _bn_uses_batch_stats(m) and isinstance(nxt, nn.ReLU) and not nxt.inplace:
            plan.append(("bn_relu", (m, nxt)))
            i += 2
        elif _known_unary(m):
            plan.append(("unary", (m,)))
            i += 1
        else:
            return None
    return plan


def _run_chain(plan, x: torch.Tensor, kernels: str) -> tuple[torch.Tensor, UnaryVjp]:
    vjps: list[UnaryVjp] = []
    for kind, mods in plan:
        if kind == "bn_relu":
            bn, relu = mods
            z = x
            x = relu(bn(z))
            zd, outd = z.detach(), x.detach()
            mean, invstd = bn_saved_stats(zd, bn.eps)
            gamma = bn.weight.detach() if bn.weight is not None else None
            vjps.append(lambda g, zd=zd, outd=outd, gamma=gamma, mean=mean, invstd=invstd:
                        bn_relu_vjp(g.to(zd.dtype), zd, outd, gamma, mean, invstd,
                                    backend=kernels))
        else:
            x, v = _unary(mods[0], x, kernels)
            vjps.append(v)

    def vjp(g: torch.Tensor) -> torch.Tensor:
        for v in reversed(vjps):
            g = v(g)
        return g

    return x, vjp


def _chain_modules(fn: object) -> list[nn.Module] | None:
    if isinstance(fn, nn.Sequential):
        return list(fn)
    if isinstance(fn, nn.Module) and (_known_unary(fn) or _bn_uses_batch_stats(fn)):
        return [fn]
    return None


def has_rule(fn: object) -> bool:
    """Whether ``fn`` gets an explicit VJP (else the autograd fallback)."""
    if isinstance(fn, (AddReLU, ConcatReLU, Head)):
        return True
    mods = _chain_modules(fn)
    return mods is not None and _chain_plan(mods) is not None


def node_forward(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                 needs_grad: Sequence[bool], kernels: str = "auto") -> tuple[torch.Tensor, Vjp]:
    """Compute ``mu = fn(*inputs)`` (with autograd, for the weight gradients) and its input-VJP.

    Args:
        fn: the node's callable.
        inputs: its parents' values; those with ``needs_grad`` are leaves requiring grad.
        needs_grad: which inputs receive errors (hidden parents).
        kernels: ``"auto"``, ``"triton"`` or ``"torch"`` for the fused ops in the closures.

    Returns:
        ``(mu, vjp)`` with ``vjp(e)`` a tuple of ``J^T e`` per input (``None`` where not needed).

    Example::

        mu, vjp = node_forward(net.blocks[0].dw1, [x_leaf], [True])
        (dx,) = vjp(torch.randn_like(mu))
    """
    if isinstance(fn, (AddReLU, ConcatReLU)):
        a, b = inputs
        mu = fn(a, b)
        out = mu.detach()
        split = a.shape[1]

        def merge_vjp(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.where(out > 0, e, 0.0)
            if isinstance(fn, ConcatReLU):
                return g[:, :split], g[:, split:]
            return g, g

        return mu, merge_vjp
    if isinstance(fn, Head):
        (x,) = inputs
        mu = fn(x)
        w = fn.fc.weight.detach()
        shape, hw = x.shape, x.shape[2] * x.shape[3]
        return mu, lambda e: ((e.to(w.dtype) @ w / hw)[:, :, None, None].expand(shape),)
    mods = _chain_modules(fn)
    plan = _chain_plan(mods) if mods is not None else None
    if plan is not None and len(inputs) == 1:
        mu, vjp1 = _run_chain(plan, inputs[0], kernels)
        return mu, lambda e: (vjp1(e),)
    return _autograd_forward(fn, inputs, needs_grad)


def _autograd_forward(fn, inputs, needs_grad) -> tuple[torch.Tensor, Vjp]:
    mu = fn(*inputs)
    wanted = [x for x, n in zip(inputs, needs_grad) if n]

    def vjp(e: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = iter(torch.autograd.grad(mu, wanted, e, retain_graph=True, allow_unused=True))
        out = []
        for x, n in zip(inputs, needs_grad):
            gr = next(grads) if n else None
            out.append(torch.zeros_like(x) if n and gr is None else gr)
        return tuple(out)

    return mu, vjp


__all__ = ["KERNELS", "has_rule", "node_forward"]
