"""Models: plain ``nn.Module``s that BP trains directly and the PC engine wraps into node graphs.

``build_model(name, **kwargs)`` builds any registered model; ``MODELS`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pcfast.dtp.net import DTPNet
from pcfast.models.cifar_resnet import CifarResNet, cifar_resnet_factory
from pcfast.models.dualpath import DualPathDWConv
from pcfast.models.mixer import MLPMixer
from pcfast.models.pc_resdualnet import PCResDualNet
from pcfast.models.resdualnet import ResDualNet
from pcfast.models.resnet18 import ResNet, resnet18, resnet34
from pcfast.models.simple import CNN, MLP, ResCNN
from pcfast.models.vgg import VGG, vgg5, vgg7

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resdualnet": ResDualNet,
    # CIFAR ResNets of He et al. 2016 (option A shortcuts; shortcut="B" for projections)
    **{f"resnet{d}": cifar_resnet_factory(d, plain=False) for d in (20, 32, 44, 56, 110, 1202)},
    **{f"plain{d}": cifar_resnet_factory(d, plain=True) for d in (20, 32, 44, 56, 110)},
    "resnet18": resnet18,
    "resnet34": resnet34,
    "mlp": MLP,
    "cnn": CNN,
    "rescnn": ResCNN,
    "mixer": MLPMixer,
    # the DTP baseline MLP (forward and feedback layers); BP trains its forward layers
    "dtp-mlp": DTPNet,
    # the CIFAR-10 nets of the PCX benchmark (Pinchetti et al., ICLR 2025)
    "vgg5": vgg5,
    "vgg7": vgg7,
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


__all__ = ["CNN", "MLP", "MODELS", "CifarResNet", "DualPathDWConv", "MLPMixer", "PCResDualNet",
           "ResCNN", "ResDualNet", "ResNet", "VGG", "build_model", "count_parameters", "register_model"]
