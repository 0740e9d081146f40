"""Explicit input-VJPs of PC nodes for the fast backend (``pcfast.pc.backends.fast``).

Under FPA every inference step propagates errors down through fixed Jacobians, so each node's
prediction is computed once per batch by :func:`node_forward`, which also returns a
:class:`Rule`: ``rule.vjp(e) -> [J_p^T e for each parent p]`` over tensors saved from that pass.
A rule keeps every per-batch tensor it reads in ``rule.saved`` (ReLU masks, BatchNorm batch
statistics, weights, ...), derived once per batch, so that a CUDA graph captured over one
batch's rules can be replayed for the next batch after copying that batch's ``saved`` tensors
into the captured ones (:meth:`Rule.load_from`).

Known nodes (every node of the model zoo's ``pc_graph()``):

- ``nn.Sequential`` chains (and single modules) of Linear, Conv2d, ``DualPathDWConv``,
  BatchNorm1d/2d (training or eval), ReLU and other elementwise activations (Tanh, Sigmoid,
  GELU, LeakyReLU, ELU, SELU, SiLU, Softplus), AvgPool2d, MaxPool2d, Flatten, Identity and the
  option-A shortcut (subsample + zero channels); a training BatchNorm2d followed by ReLU is one
  fused ``bn_relu_vjp``; with ``kernels="auto"`` a ``DualPathDWConv`` + training BatchNorm2d +
  ReLU (Res-DualNet's depthwise sub-layer) is ONE ``dw_bn_relu_vjp`` whose relax variant also
  applies the PC update of the node it feeds (:meth:`Rule.fused`); a 1x1 stride-1 conv is
  one batched matmul (with ``kernels="auto"`` fused with the update as well), and the merges
  relax the parents whose last contribution they send in the same op;
- merges ``AddReLU`` / ``ConcatReLU`` and the classifier ``Head``.

Any other node falls back to autograd over its feedforward graph (:class:`AutogradRule`; the
same retained graph every step, so BatchNorm running stats move once per batch). Such a rule is
not capturable: the fast backend then runs the steps eagerly instead of in a CUDA graph.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from pcfast.models.cifar_resnet import ShortcutA
from pcfast.models.dualpath import DualPathDWConv
from pcfast.models.layers import AddReLU, ConcatReLU, Head
from pcfast.ops.bn_relu_vjp import bn_relu_vjp, bn_saved_stats
from pcfast.ops.dw_bn_relu_vjp import dw_bn_relu_vjp, dw_bn_relu_vjp_relax
from pcfast.ops.vjp_relax import add_relu_vjp_relax, concat_relu_vjp_relax, conv1x1_vjp_relax

KERNELS = ("auto", "triton", "torch")
ACTIVATIONS = (nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.SiLU, nn.Softplus,
               nn.ReLU6, nn.Hardtanh)


class MaskedError:
    """A ReLU merge's error under its mask, ``error * ~dead``, handed to a parent's last writer
    without being stored: a writer that :meth:`Rule.takes_masked_other` reads ``error`` and
    ``dead`` in its own pass; anywhere else :meth:`tensor` stores it."""

    def __init__(self, error: torch.Tensor, dead: torch.Tensor) -> None:
        self.error, self.dead = error, dead

    @property
    def shape(self) -> torch.Size:
        return self.error.shape

    def tensor(self) -> torch.Tensor:
        return self.error.masked_fill(self.dead, 0.0)


def stored(contributions: Sequence[torch.Tensor | MaskedError]) -> list[torch.Tensor]:
    """``contributions`` with every :class:`MaskedError` stored as a tensor."""
    return [c.tensor() if isinstance(c, MaskedError) else c for c in contributions]


class Rule(ABC):
    """Input-VJP of one node over tensors saved from its feedforward pass.

    ``saved`` holds every per-batch tensor the VJP reads; ``signature`` describes everything
    else (types, shapes, strides, flags), so two rules with one signature differ only in
    ``saved`` values. ``capturable`` is False for rules that run autograd.
    """

    capturable = True

    def __init__(self, signature: tuple, saved: dict[str, torch.Tensor]) -> None:
        self.signature = signature
        self.saved = saved

    @abstractmethod
    def vjp(self, e: torch.Tensor) -> list[torch.Tensor | None]:
        """``J_i^T e`` for every input ``i`` (None where the input receives no error)."""

    def fused(self, e: torch.Tensor, finish: dict[int, tuple], rate: float,
              clamp: float | None, defer: frozenset[int] = frozenset()
              ) -> list[torch.Tensor | MaskedError | None] | None:
        """The VJP with the PC update of the parents whose last contribution it is, in one op.

        ``finish`` maps input index -> ``(e_dest, others, out)``: write
        ``out = lerp(e_dest, clamp(J_i^T e + sum(others)), rate)``. Returns the contributions
        for the other inputs (None at the finished ones), or None when this rule has no fused
        form for this case (the caller then runs :meth:`vjp` and ``pc_relax``). A contribution
        to an input in ``defer`` may be a :class:`MaskedError` (its last writer takes one).
        """
        return None

    def takes_masked_other(self) -> bool:
        """Whether :meth:`fused` reads a :class:`MaskedError` among ``others`` itself."""
        return False

    def tensors(self) -> list[torch.Tensor]:
        """The per-batch tensors, in a fixed order."""
        return [self.saved[k] for k in sorted(self.saved)]

    def load_from(self, other: Rule) -> None:
        """Copy ``other``'s per-batch tensors into this rule's (same signature)."""
        if other.signature != self.signature:
            raise ValueError("rules of different signatures")
        mine, theirs = self.tensors(), other.tensors()
        if mine:
            torch._foreach_copy_(mine, theirs)


# ------------------------------------------------------------------------------ unary steps
class _Step:
    """One module of a chain: ``fn(g, saved) -> g_in``; optionally ``relax(g, saved, e, other,
    rate, clamp, out)``, the same VJP with the PC update of the node it feeds as epilogue."""

    def __init__(self, sig: tuple, saved: dict[str, torch.Tensor],
                 fn: Callable[[torch.Tensor, dict], torch.Tensor],
                 relax: Callable[..., None] | None = None, masked_other: bool = False) -> None:
        """``masked_other``: ``relax`` takes a :class:`MaskedError` as ``other``."""
        self.sig, self.saved, self.fn, self.relax = sig, saved, fn, relax
        self.masked_other = masked_other


def relu_vjp(g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``g`` where the ReLU output ``out`` is positive, else 0: aten's ``threshold_backward``
    (what autograd runs; on the CPU ~10x faster than ``masked_fill`` with a boolean mask)."""
    if g.dtype != out.dtype:  # bfloat16 predictions under autocast, float32 errors
        return g.masked_fill(out <= 0, 0.0)
    return torch.ops.aten.threshold_backward(g, out, 0.0)


def squash_vjp(g: torch.Tensor, out: torch.Tensor, tanh: bool) -> torch.Tensor:
    """``g * tanh'`` (``tanh``) or ``g * sigmoid'`` from the output ``out``: aten's
    ``tanh_backward`` / ``sigmoid_backward`` (what autograd runs), in ``g``'s dtype where the
    two differ (bfloat16 predictions under autocast, float32 errors)."""
    if g.dtype != out.dtype:
        o = out.to(g.dtype)
        return g * (1 - o * o) if tanh else g * ((1 - o) * o)
    back = torch.ops.aten.tanh_backward if tanh else torch.ops.aten.sigmoid_backward
    return back(g, out)


def _shape_sig(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.device.type)


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


def _is_avgpool3x3(module: nn.AvgPool2d) -> bool:
    """Whether ``module`` is AvgPool2d(3, stride 1 or 2, padding 1) dividing by 9 everywhere."""
    stride = _pair(module.stride or module.kernel_size)
    return (_pair(module.kernel_size) == (3, 3) and _pair(module.padding) == (1, 1)
            and stride in ((1, 1), (2, 2)) and module.count_include_pad
            and module.divisor_override is None and not module.ceil_mode)


def _bn_train(bn: nn.Module) -> bool:
    return bn.training or bn.running_mean is None


# The autograd nodes of training BatchNorm on the CPU whose saved ``result1``/``result2`` are
# the batch mean and inverse standard deviation (as aten's native_batch_norm returns them).
_CPU_BN_NODES = ("NativeBatchNormBackward0", "BatchNormWithUpdateBackward0")


def batch_stats(y: torch.Tensor, z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``mean`` and ``invstd`` of training BN ``y = bn(z)``: on the CPU the ones its
    autograd node saved for the backward (no second pass over ``z``, which costs as much as
    the BN itself there), else computed again by :func:`bn_saved_stats`."""
    fn = y.grad_fn
    if z.device.type == "cpu" and type(fn).__name__ in _CPU_BN_NODES:
        mean, invstd = getattr(fn, "_saved_result1", None), getattr(fn, "_saved_result2", None)
        c = (z.shape[1],)
        if (isinstance(mean, torch.Tensor) and isinstance(invstd, torch.Tensor)
                and mean.shape == c and invstd.shape == c):
            return mean.detach(), invstd.detach()
    return bn_saved_stats(z, eps)


def bn_train_forward(bn: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
    """``y = bn(z)`` for a BatchNorm in training mode, with the batch ``mean`` and ``invstd`` it
    normalised with, from one pass on the CPU (:func:`batch_stats`). Without grad (strict PC's
    steps) an autograd node is recorded for that alone, on a detached input, and dropped with
    the graph: ``y`` comes back detached, as a no-grad forward would give it."""
    if not torch.is_grad_enabled() and z.device.type == "cpu":
        with torch.enable_grad():
            y = bn(z.detach().requires_grad_(True))
        mean, invstd = batch_stats(y, z, bn.eps)
        return y.detach(), mean, invstd
    y = bn(z)
    mean, invstd = batch_stats(y, z.detach(), bn.eps)
    return y, mean, invstd


def _bn_backward(g: torch.Tensor, s: dict, train: bool, eps: float) -> torch.Tensor:
    z = s["z"]
    weight = s.get("weight")
    if train:
        gz, _, _ = torch.ops.aten.native_batch_norm_backward(
            g.to(z.dtype), z, weight, None, None, s["mean"], s["invstd"], True, eps,
            [True, False, False])
        return gz
    return g.to(z.dtype) * s["scale"]


def _unary(module: nn.Module, x: torch.Tensor, kernels: str) -> tuple[torch.Tensor, _Step]:
    """Forward one known module; return its output and its VJP step."""
    bn_stats = None
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and _bn_train(module):
        y, *bn_stats = bn_train_forward(module, x)
    else:
        y = module(x)
    xd, yd = x.detach(), y.detach()
    name = type(module).__name__
    if isinstance(module, nn.Linear):
        return y, _Step((name,), {"w": module.weight.detach()}, lambda g, s: g.to(s["w"].dtype) @ s["w"])
    if isinstance(module, nn.ReLU):
        return y, _Step((name, _shape_sig(yd)), {"out": yd}, lambda g, s: relu_vjp(g, s["out"]))
    if isinstance(module, (nn.Tanh, nn.Sigmoid)):
        # aten's own backward from the output: one pass over (g, y) per call, the same bytes as
        # a multiply by a stored derivative, without forming that derivative (two more passes
        # per batch, every step under strict PC, where each rule is used once).
        tanh = isinstance(module, nn.Tanh)
        return y, _Step((name, _shape_sig(yd)), {"out": yd},
                        lambda g, s: squash_vjp(g, s["out"], tanh))
    if isinstance(module, ACTIVATIONS):
        # Elementwise: the derivative is taken once per batch, each step is one multiply.
        with torch.enable_grad():
            xx = xd.requires_grad_(True) if not xd.requires_grad else xd
            (deriv,) = torch.autograd.grad(module(xx), xx, torch.ones_like(yd))
        return y, _Step((name, _shape_sig(yd)), {"deriv": deriv.detach()},
                        lambda g, s: g * s["deriv"])
    if isinstance(module, (nn.Identity, nn.Flatten)):
        shape = xd.shape
        return y, _Step((name, tuple(shape)), {}, lambda g, s: g.reshape(shape))
    if isinstance(module, DualPathDWConv):
        stride, shape = module.stride, xd.shape
        return y, _Step((name, stride, tuple(shape), kernels), {"w": module.weight.detach()},
                        lambda g, s: _dwconv_input_vjp(g, s["w"], stride, shape, kernels))
    if (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding == (0, 0) and module.groups == 1):
        # A 1x1 conv is a matmul over channels: J^T g = W^T @ g per pixel (one bmm).
        n, cin, h, w = xd.shape
        wt = module.weight.detach().reshape(module.out_channels, cin).t().contiguous()
        relax = None
        if kernels == "auto":
            def relax(g, s, e_dest, other, rate, clamp, out) -> None:
                conv1x1_vjp_relax(g.to(s["wt"].dtype), s["wt"], e_dest, other, rate, clamp, out)

        return y, _Step((name, "1x1", tuple(xd.shape), kernels), {"wt": wt},
                        lambda g, s: torch.matmul(s["wt"], g.to(s["wt"].dtype).reshape(
                            n, -1, h * w)).view(n, cin, h, w), relax)
    if isinstance(module, nn.Conv2d):
        shape = xd.shape
        args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                    groups=module.groups)
        return y, _Step((name, tuple(shape), tuple(args.items())), {"w": module.weight.detach()},
                        lambda g, s: torch.nn.grad.conv2d_input(shape, s["w"], g.to(s["w"].dtype),
                                                                **args))
    if isinstance(module, nn.AvgPool2d) and kernels != "torch" and _is_avgpool3x3(module):
        # A 3x3 average pool with padding 1 counting the padding is a depthwise 3x3 conv with
        # the kernel 1/9: its input-VJP is the dwconv op's, with both paths at 1/18 (the summed
        # kernel is then exactly fl(1/9)); aten's avg_pool2d_backward is much slower on CPU.
        stride, shape = _pair(module.stride or module.kernel_size)[0], xd.shape
        w = torch.full((2 * shape[1], 1, 3, 3), 1.0 / 18.0, dtype=xd.dtype, device=xd.device)
        return y, _Step((name, "avg3x3", stride, tuple(shape), kernels), {"w": w},
                        lambda g, s: _dwconv_input_vjp(g, s["w"], stride, shape, kernels))
    if isinstance(module, nn.AvgPool2d):
        args = (_pair(module.kernel_size), _pair(module.stride or module.kernel_size),
                _pair(module.padding), module.ceil_mode, module.count_include_pad,
                module.divisor_override)
        return y, _Step((name, args, _shape_sig(xd)), {"x": xd},
                        lambda g, s: torch.ops.aten.avg_pool2d_backward(
                            g.to(s["x"].dtype), s["x"], *args))
    if isinstance(module, nn.MaxPool2d):
        k = _pair(module.kernel_size)
        args = (k, _pair(module.stride or module.kernel_size), _pair(module.padding),
                _pair(module.dilation), module.ceil_mode)
        _, idx = F.max_pool2d(xd, *args, return_indices=True)
        return y, _Step((name, args, _shape_sig(xd)), {"x": xd, "idx": idx},
                        lambda g, s: torch.ops.aten.max_pool2d_with_indices_backward(
                            g.to(s["x"].dtype), s["x"], *args, s["idx"]))
    if isinstance(module, ShortcutA):
        cin, st, shape = xd.shape[1], module.stride, xd.shape

        def shortcut_a(g: torch.Tensor, s: dict) -> torch.Tensor:
            # Adjoint of "subsample by st, then append zero channels": keep the first cin
            # channels and scatter them back to every st-th pixel (zeros elsewhere).
            g = g[:, :cin]
            g = torch.ops.aten.slice_backward(g, [shape[0], cin, g.shape[2], shape[3]], 3, 0,
                                              shape[3], st)
            return torch.ops.aten.slice_backward(g, list(shape), 2, 0, shape[2], st)

        return y, _Step((name, cin, st, tuple(shape)), {}, shortcut_a)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        train = _bn_train(module)
        s = {"z": xd}
        if module.weight is not None:
            s["weight"] = module.weight.detach()
        if train:
            s["mean"], s["invstd"] = bn_stats
        else:
            scale = torch.rsqrt(module.running_var.detach() + module.eps)
            if module.weight is not None:
                scale = scale * module.weight.detach()
            s["scale"] = scale.view(1, -1, *([1] * (xd.dim() - 2))).to(xd.dtype)
        eps = module.eps
        return y, _Step((name, train, _shape_sig(xd), module.weight is not None), s,
                        lambda g, s: _bn_backward(g, s, train, eps))
    raise TypeError(f"no input-VJP rule for {name}")


def _known_unary(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if isinstance(module, (nn.ReLU, *ACTIVATIONS)):
        return not getattr(module, "inplace", False)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return True
    return isinstance(module, (nn.Linear, nn.Identity, nn.Flatten, DualPathDWConv, nn.AvgPool2d,
                               nn.MaxPool2d, ShortcutA))


def _fuse_bn_relu(m: nn.Module, nxt: nn.Module | None) -> bool:
    return (isinstance(m, nn.BatchNorm2d) and _bn_train(m) and isinstance(nxt, nn.ReLU)
            and not nxt.inplace)


def _chain_modules(fn: object) -> list[nn.Module] | None:
    if isinstance(fn, nn.Sequential):
        mods = list(fn)
    elif isinstance(fn, nn.Module):
        mods = [fn]
    else:
        return None
    return mods if mods and all(_known_unary(m) for m in mods) else None


class ChainRule(Rule):
    """A chain of unary steps, applied in reverse."""

    def __init__(self, steps: list[_Step]) -> None:
        saved = {f"{i}.{k}": v for i, st in enumerate(steps) for k, v in st.saved.items()}
        super().__init__(("chain", *(st.sig for st in steps)), saved)
        self.steps = steps

    def vjp(self, e: torch.Tensor) -> list[torch.Tensor | None]:
        g = e
        for i in range(len(self.steps) - 1, -1, -1):
            st = self.steps[i]
            g = st.fn(g, st.saved)
        return [g]

    def fused(self, e, finish, rate, clamp, defer=frozenset()):
        st = self.steps[0]
        if len(self.steps) != 1 or st.relax is None or set(finish) != {0}:
            return None
        e_dest, others, out = finish[0]
        if len(others) > 1 or any(o.shape != e_dest.shape for o in others):
            return None
        other = others[0] if others else None
        if isinstance(other, MaskedError) and not st.masked_other:
            other = other.tensor()
        st.relax(e, st.saved, e_dest, other, rate, clamp, out)
        return [None]

    def takes_masked_other(self) -> bool:
        return len(self.steps) == 1 and self.steps[0].masked_other


def _dw_bn_relu_step(conv: DualPathDWConv, bn: nn.BatchNorm2d, relu: nn.ReLU,
                     x: torch.Tensor) -> tuple[torch.Tensor, _Step]:
    """``ReLU(BN_train(dwconv(x)))`` as ONE VJP step (:func:`~pcfast.ops.dw_bn_relu_vjp`), with
    the ReLU mask and the batch statistics derived once here."""
    z = conv(x)
    y, mean, invstd = bn_train_forward(bn, z)
    out = relu(y)
    zd = z.detach()
    s = {"z": zd, "dead": out.detach() <= 0, "mean": mean, "invstd": invstd,
         "w": conv.weight.detach()}
    if bn.weight is not None:
        s["gamma"] = bn.weight.detach()
    stride, in_h, in_w = conv.stride, x.shape[2], x.shape[3]

    def fn(g: torch.Tensor, s: dict) -> torch.Tensor:
        return dw_bn_relu_vjp(g.to(s["z"].dtype), s["z"], s["dead"], s.get("gamma"), s["mean"],
                              s["invstd"], s["w"].to(s["z"].dtype), stride, in_h, in_w)

    def relax(g, s, e_dest, other, rate, clamp, out) -> None:
        other_dead = None
        if isinstance(other, MaskedError):  # read in the op's epilogue, never stored
            other, other_dead = other.error, other.dead
        dw_bn_relu_vjp_relax(g.to(s["z"].dtype), s["z"], s["dead"], s.get("gamma"), s["mean"],
                             s["invstd"], s["w"].to(s["z"].dtype), stride, e_dest, other, rate,
                             clamp, out, other_dead)

    return out, _Step(("dw_bn_relu", stride, tuple(x.shape), _shape_sig(zd),
                       bn.weight is not None), s, fn, relax, masked_other=True)


def _bn_relu_step(bn: nn.BatchNorm2d, relu: nn.ReLU, z: torch.Tensor,
                  kernels: str) -> tuple[torch.Tensor, _Step]:
    y, mean, invstd = bn_train_forward(bn, z)
    out = relu(y)
    zd, outd = z.detach(), out.detach()
    s = {"z": zd, "out": outd, "mean": mean, "invstd": invstd}
    if bn.weight is not None:
        s["gamma"] = bn.weight.detach()
    backend = kernels

    def fn(g: torch.Tensor, s: dict) -> torch.Tensor:
        return bn_relu_vjp(g.to(s["z"].dtype), s["z"], s["out"], s.get("gamma"), s["mean"],
                           s["invstd"], backend=backend)

    return out, _Step(("bn_relu", _shape_sig(zd), bn.weight is not None, kernels), s, fn)


def _run_chain(mods: Sequence[nn.Module], x: torch.Tensor, kernels: str) -> tuple[torch.Tensor, Rule]:
    steps: list[_Step] = []
    i = 0
    while i < len(mods):
        m, nxt = mods[i], (mods[i + 1] if i + 1 < len(mods) else None)
        if (kernels == "auto" and isinstance(m, DualPathDWConv) and i + 2 < len(mods)
                and _fuse_bn_relu(nxt, mods[i + 2])):
            x, st = _dw_bn_relu_step(m, nxt, mods[i + 2], x)
            i += 3
        elif _fuse_bn_relu(m, nxt):
            x, st = _bn_relu_step(m, nxt, x, kernels)
            i += 2
        else:
            x, st = _unary(m, x, kernels)
            i += 1
        steps.append(st)
    return x, ChainRule(steps)


class MergeRule(Rule):
    """``ReLU(a + b)`` (both parents get the masked error) or ``ReLU(cat(a, b))`` (split)."""

    def __init__(self, out: torch.Tensor, split: int | None, fuse: bool = False) -> None:
        # The fused merge kernels read the mask; the plain VJP derives it from the output.
        saved = {"dead": out <= 0, "out": out} if fuse else {"out": out}
        super().__init__(("merge", split, _shape_sig(out), fuse), saved)
        self.split, self.fuse = split, fuse

    def vjp(self, e: torch.Tensor) -> list[torch.Tensor | None]:
        g = relu_vjp(e, self.saved["out"])
        if self.split is None:
            return [g, g]
        return [g[:, :self.split], g[:, self.split:]]

    def fused(self, e, finish, rate, clamp, defer=frozenset()):
        if not self.fuse or any(others for _, others, _ in finish.values()):
            return None
        if self.split is None and set(finish) == {0}:
            e_a, _, out_a = finish[0]
            dead = self.saved["dead"]
            if 1 in defer:  # parent b's last writer reads e and the mask: g is not stored
                add_relu_vjp_relax(e, dead, e_a, rate, clamp, out_a, store_g=False)
                return [None, MaskedError(e, dead)]
            g = add_relu_vjp_relax(e, dead, e_a, rate, clamp, out_a)
            return [None, g]
        if self.split is not None and set(finish) == {0, 1}:
            (e_a, _, out_a), (e_b, _, out_b) = finish[0], finish[1]
            concat_relu_vjp_relax(e, self.saved["dead"], e_a, e_b, rate, clamp, out_a, out_b)
            return [None, None]
        return None


class HeadRule(Rule):
    """Global mean pool + linear: ``J^T e = (e @ W / HW)`` broadcast over the pixels."""

    def __init__(self, head: Head, x: torch.Tensor) -> None:
        hw = x.shape[2] * x.shape[3]
        w = head.fc.weight.detach()
        super().__init__(("head", _shape_sig(x)), {"w": w / hw})
        self.shape = x.shape

    def vjp(self, e: torch.Tensor) -> list[torch.Tensor | None]:
        w = self.saved["w"]
        return [(e.to(w.dtype) @ w)[:, :, None, None].expand(self.shape)]


class AutogradRule(Rule):
    """Autograd over the node's retained feedforward graph (any node; not capturable)."""

    capturable = False

    def __init__(self, mu: torch.Tensor, inputs: Sequence[torch.Tensor],
                 needs_grad: Sequence[bool]) -> None:
        super().__init__(("autograd", id(mu)), {})
        self.mu, self.inputs, self.needs = mu, list(inputs), list(needs_grad)

    def vjp(self, e: torch.Tensor) -> list[torch.Tensor | None]:
        wanted = [x for x, n in zip(self.inputs, self.needs) if n]
        grads = iter(torch.autograd.grad(self.mu, wanted, e.to(self.mu.dtype), retain_graph=True,
                                         allow_unused=True))
        out: list[torch.Tensor | None] = []
        for x, n in zip(self.inputs, self.needs):
            gr = next(grads) if n else None
            out.append(torch.zeros_like(x) if n and gr is None else gr)
        return out


def has_rule(fn: object) -> bool:
    """Whether ``fn`` gets an explicit VJP (else the autograd fallback)."""
    return isinstance(fn, (AddReLU, ConcatReLU, Head)) or _chain_modules(fn) is not None


def node_forward(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                 needs_grad: Sequence[bool], kernels: str = "auto") -> tuple[torch.Tensor, Rule]:
    """Compute ``mu = fn(*inputs)`` (with autograd, for the weight gradients) and its VJP rule.

    Args:
        fn: the node's callable.
        inputs: its parents' values; those with ``needs_grad`` are leaves requiring grad.
        needs_grad: which inputs receive errors (hidden parents).
        kernels: ``"auto"``, ``"triton"`` or ``"torch"`` for the fused ops in the rules.

    Returns:
        ``(mu, rule)`` with ``rule.vjp(e)`` a list of ``J^T e`` per input.

    Example::

        mu, rule = node_forward(net.blocks[0].dw1, [x_leaf], [True])
        (dx,) = rule.vjp(torch.randn_like(mu))
    """
    if isinstance(fn, (AddReLU, ConcatReLU)) and len(inputs) == 2:
        mu = fn(*inputs)
        split = inputs[0].shape[1] if isinstance(fn, ConcatReLU) else None
        return mu, MergeRule(mu.detach(), split, fuse=kernels == "auto")
    if isinstance(fn, Head) and len(inputs) == 1:
        return fn(inputs[0]), HeadRule(fn, inputs[0].detach())
    mods = _chain_modules(fn)
    if mods is not None and len(inputs) == 1:
        return _run_chain(mods, inputs[0], kernels)
    mu = fn(*inputs)
    return mu, AutogradRule(mu, inputs, needs_grad)


__all__ = ["ACTIVATIONS", "KERNELS", "AutogradRule", "Rule", "has_rule", "node_forward"]
