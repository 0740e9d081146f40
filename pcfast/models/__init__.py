"""Models: plain ``nn.Module``s that BP trains directly and the PC engine wraps into node graphs.

``build_model(name, **kwargs)`` builds any registered model; ``MODELS`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pcfast.models.dualpath import DualPathDWConv
from pcfast.models.pc_resdualnet import PCResDualNet
from pcfast.models.resdualnet import ResDualNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resdualnet": ResDualNet,
}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``factory`` buildable by name (``pcfast train --model NAME``)."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is registered already")
    MODELS[name] = factory


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name``."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(sorted(MODELS))}") from None
    return factory(**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MODELS", "DualPathDWConv", "PCResDualNet", "ResDualNet", "build_model",
           "count_parameters", "register_model"]
