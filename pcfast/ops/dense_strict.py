"""Strict PC inference on a dense chain, all T steps in one op.

``dense_strict_relax(mu1, weights, biases, values, target, acts, T, rate, sequential, ce,
gram)`` runs ``T`` strict-PC steps over the hidden values ``v_1 .. v_L`` (each ``(N, d_j)``,
updated in place) of a chain whose nodes after the first are ``Linear`` layers with an
elementwise activation:

- node ``k`` (``1 .. L``) predicts ``mu_{k+1} = act_k(v_k W_k^T + b_k)``; ``mu_1`` came from the
  clamped input and is fixed; the last node's output ``mu_out`` meets ``target`` (one-hot)
  through the output error ``e_out = target - p`` with ``p = softmax(mu_out)`` (``ce``) or
  ``mu_out`` (squared error);
- ``g_k = e_{k+1} * act_k'(mu_{k+1})`` is the error at node ``k``'s pre-activation, and a step
  moves ``v_j <- v_j - rate (v_j - mu_j - g_j W_j)``: every value from one prediction pass
  (jacobi) or top-down, each on its children's errors at the current values (``sequential``).

This is the fast backend's strict PC (``PCEngine(fpa=False)``) on such chains (an MLP), with the
step's elementwise work in one pass over all nodes and no Python between steps. With ``gram``
the first hidden value stays out of the loop: its error moves linearly, so its child reads
``s = e_1 W_1^T``, which steps with the Gram matrix ``W_1 W_1^T`` (one matmul per step instead
of the forward and backward pair through ``W_1``); equal up to rounding (tested in float64).
:func:`gram_pays` says when that saves work.

Registered as ``pcfast::dense_strict_relax`` (one dispatched op; mutates ``values``). On CPU it
runs the C++ kernel ``pcfast::dense_strict_relax_cpu`` (``pcfast._C``, ``csrc/dense_strict_cpu.cpp``)
for contiguous float32/float64 tensors, else :func:`dense_strict_relax_ref`; other devices run
the reference (the engine uses this op on the CPU only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pcfast.ops import _ext

__all__ = ["ACTIVATIONS", "activate_", "activation_code", "dense_strict_relax",
           "dense_strict_relax_ref", "gram_pays", "pre_activation_error"]

# Activation codes the op takes (csrc/dense_strict_cpu.cpp).
ACTIVATIONS = {"identity": 0, "tanh": 1, "relu": 2, "sigmoid": 3}
_MODULES = {nn.Identity: "identity", nn.Tanh: "tanh", nn.ReLU: "relu", nn.Sigmoid: "sigmoid"}


def activation_code(module: nn.Module | None) -> int | None:
    """The op's code for an activation module (``None``: identity), or None if it has none."""
    if module is None:
        return ACTIVATIONS["identity"]
    if isinstance(module, nn.ReLU) and module.inplace:
        return None  # its forward would write into the prediction's input
    name = _MODULES.get(type(module))
    return None if name is None else ACTIVATIONS[name]


def activate_(code: int, z: torch.Tensor) -> torch.Tensor:
    """``z <- act(z)`` in place for activation code ``code``; returns ``z``."""
    if code == ACTIVATIONS["tanh"]:
        return z.tanh_()
    if code == ACTIVATIONS["relu"]:
        return z.relu_()
    if code == ACTIVATIONS["sigmoid"]:
        return z.sigmoid_()
    return z


def pre_activation_error(code: int, e: torch.Tensor, mu: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    """``scale * e * act'`` (a new tensor; unscaled for None) from the activation's output
    ``mu``, as the VJP rules take the derivative (aten's ``tanh_backward``, ...)."""
    if code == ACTIVATIONS["tanh"]:
        out = torch.ops.aten.tanh_backward(e, mu)
    elif code == ACTIVATIONS["relu"]:
        out = torch.ops.aten.threshold_backward(e, mu, 0)
    elif code == ACTIVATIONS["sigmoid"]:
        out = torch.ops.aten.sigmoid_backward(e, mu)
    else:
        return e.clone() if scale is None else e * scale
    return out if scale is None else out.mul_(scale)


def dense_strict_relax_ref(mu1: torch.Tensor, weights: list[torch.Tensor],
                           biases: list[torch.Tensor | None], values: list[torch.Tensor],
                           target: torch.Tensor, acts: list[int], T: int, rate: float,
                           sequential: bool, ce: bool, gram: bool = False) -> None:
    """PyTorch reference of :func:`dense_strict_relax` (same arguments, ``values`` updated in
    place; ``gram`` is accepted and ignored: the reference takes the straight steps).

    Example::

        dense_strict_relax_ref(mu1, [W1, W2], [b1, b2], [v1, v2], onehot, [1, 0], 20, 0.1,
                               False, False)
    """
    L = len(values)

    def predict(k: int) -> torch.Tensor:
        return activate_(acts[k], F.linear(values[k], weights[k], biases[k]))

    def child_error(k: int, mu: torch.Tensor) -> torch.Tensor:
        """g_k from node k's prediction ``mu`` at the current values."""
        e = values[k + 1] - mu if k + 1 < L else target - (torch.softmax(mu, 1) if ce else mu)
        return pre_activation_error(acts[k], e, mu)

    def own(j: int, mus: list[torch.Tensor]) -> torch.Tensor:
        return mu1 if j == 0 else mus[j - 1]

    with torch.no_grad():
        for _ in range(T):
            if not sequential:
                mus = [predict(k) for k in range(L)]
                gs = [child_error(k, mus[k]) for k in range(L)]
                new = [values[j] - rate * (values[j] - own(j, mus) - gs[j] @ weights[j])
                       for j in range(L)]
                for v, n in zip(values, new):
                    v.copy_(n)
                continue
            mus: list[torch.Tensor | None] = [None] * L
            mus[L - 1] = predict(L - 1)
            for j in range(L - 1, -1, -1):
                g = child_error(j, mus[j])
                if j > 0:
                    mus[j - 1] = predict(j - 1)
                values[j].copy_(values[j] - rate * (values[j] - own(j, mus) - g @ weights[j]))


def gram_pays(batch: int, widths: list[int], T: int) -> bool:
    """Whether carrying the first hidden value by its Gram matrix takes fewer multiply-adds.

    ``widths``: ``[d_1, out_1]`` (the first hidden value's width and its child's). Straight:
    ``2 T N d_1 out_1``; Gram: ``T N out_1^2`` per batch plus ``out_1^2 d_1`` (the Gram matrix)
    and ``3 N d_1 out_1`` (its start, the constant part and the final value).
    """
    d1, out1 = widths
    straight = 2 * T * batch * d1 * out1
    gram = T * batch * out1 * out1 + out1 * out1 * d1 + 3 * batch * d1 * out1
    return gram < straight


def _cpu_kernel_fits(mu1, weights, biases, values, target) -> bool:
    tensors = [mu1, target, *weights, *values, *(b for b in biases if b is not None)]
    dtype = mu1.dtype
    if dtype not in (torch.float32, torch.float64):
        return False
    if any(t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous() for t in tensors):
        return False
    return _ext.has_kernel("dense_strict_relax_cpu", "cpu")


@torch.library.custom_op("pcfast::dense_strict_relax", mutates_args=("values",))
def _dense_strict_op(mu1: torch.Tensor, weights: list[torch.Tensor],
                     biases: list[torch.Tensor | None], values: list[torch.Tensor],
                     target: torch.Tensor, acts: list[int], T: int, rate: float,
                     sequential: bool, ce: bool, gram: bool) -> None:
    if _cpu_kernel_fits(mu1, weights, biases, values, target):
        torch.ops.pcfast.dense_strict_relax_cpu(mu1, weights, biases, values, target, acts, T,
                                                rate, sequential, ce, gram)
        return
    dense_strict_relax_ref(mu1, weights, biases, values, target, acts, T, rate, sequential, ce)


@_dense_strict_op.register_fake
def _dense_strict_fake(mu1, weights, biases, values, target, acts, T, rate, sequential, ce,
                       gram) -> None:
    return None


def _check(mu1, weights, biases, values, target, acts, T, rate) -> None:
    L = len(values)
    if not (L and len(weights) == L and len(biases) == L and len(acts) == L):
        raise ValueError(f"dense_strict_relax: one weight, bias and activation per hidden value, "
                         f"got {len(weights)}, {len(biases)}, {len(acts)} for {L} values")
    if T < 0 or not rate > 0:
        raise ValueError(f"dense_strict_relax: T >= 0 and rate > 0 needed, got T={T}, "
                         f"rate={rate}")
    if set(acts) - set(ACTIVATIONS.values()):
        raise ValueError(f"dense_strict_relax: activation codes must be in {ACTIVATIONS}, "
                         f"got {acts}")
    if mu1.shape != values[0].shape:
        raise ValueError(f"dense_strict_relax: mu1 {tuple(mu1.shape)} does not match the first "
                         f"value {tuple(values[0].shape)}")
    n = values[0].shape[0]
    for k, (v, w) in enumerate(zip(values, weights)):
        out = values[k + 1].shape[1:] if k + 1 < L else target.shape[1:]
        if v.dim() != 2 or v.shape[0] != n or w.shape != (out[0], v.shape[1]):
            raise ValueError(f"dense_strict_relax: weight {k} {tuple(w.shape)} does not map value "
                             f"{k} {tuple(v.shape)} to {tuple(out)} features")
    if target.shape[0] != n:
        raise ValueError(f"dense_strict_relax: target has {target.shape[0]} rows, values {n}")


def dense_strict_relax(mu1: torch.Tensor, weights: list[torch.Tensor],
                       biases: list[torch.Tensor | None], values: list[torch.Tensor],
                       target: torch.Tensor, acts: list[int], T: int, rate: float,
                       sequential: bool = False, ce: bool = False, gram: bool = False) -> None:
    """Run ``T`` strict PC steps over ``values`` (in place).

    Args:
        mu1: ``(N, d_1)`` the first hidden value's fixed prediction.
        weights: ``W_k`` ``(out_k, d_k)`` for nodes ``1 .. L`` (``out_k = d_{k+1}``; the last
            maps to the target's width).
        biases: ``b_k`` ``(out_k,)`` or None.
        values: ``v_1 .. v_L``, ``(N, d_j)``, updated in place.
        target: ``(N, C)`` one-hot target of the output.
        acts: activation code per node (:data:`ACTIVATIONS`).
        T, rate: steps and state rate.
        sequential: top-down sweeps instead of jacobi steps.
        ce: cross-entropy output (softmax probabilities' error) instead of squared error.
        gram: carry the first hidden value by its Gram matrix (:func:`gram_pays`).

    Example::

        dense_strict_relax(mu1, [W1, W2], [b1, b2], [v1, v2], onehot, [1, 0], 20, 0.1)
    """
    _check(mu1, weights, biases, values, target, acts, T, rate)
    # Inference moves the values only: the weights enter as constants.
    weights = [w.detach() for w in weights]
    biases = [None if b is None else b.detach() for b in biases]
    args = (mu1.detach(), weights, biases, list(values), target, [int(a) for a in acts], int(T),
            float(rate), bool(sequential), bool(ce), bool(gram))
    plain = (torch._C._len_torch_dispatch_stack() == 0 and not torch.compiler.is_compiling()
             and all(type(t) is torch.Tensor for t in (mu1, target, *values)))
    if plain and _cpu_kernel_fits(mu1, weights, biases, values, target):
        # The op's CPU implementation without the custom-op dispatch around it; under a
        # dispatch mode (bench/cost.py's count) or torch.compile the public op runs.
        torch.ops.pcfast.dense_strict_relax_cpu(*args)
        return
    _dense_strict_op(*args)
