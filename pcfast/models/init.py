"""Weight initialisation by name (``--init``): PyTorch's defaults, He et al.'s, the seed's."""

from __future__ import annotations

from torch import nn

from pcfast.models.dualpath import DualPathDWConv


def he_init(model: nn.Module) -> nn.Module:
    """He (Kaiming normal, ReLU gain) init for every convolution and linear layer of ``model``.

    Convolutions get ``N(0, 2 / (k*k*out_channels))`` (fan-out, as in He et al. 2015 and the
    CIFAR ResNets of He et al. 2016), the dual-path depthwise convs included (their ``(2C, 1, 3,
    3)`` weight is that of ``Conv2d(C, 2C, 3, groups=C)``: std ``1 / (3 sqrt(C))``); linear
    layers get ``N(0, 2 / in_features)``; biases are zero; BatchNorm/LayerNorm/GroupNorm weights
    are one and their biases zero.

    Returns the model, initialised in place.

    Example::

        net = he_init(CifarResNet(20))
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, DualPathDWConv)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def seed_init(model: nn.Module) -> nn.Module:
    """The seed project's init (its Res-DualNet runs): :func:`he_init` for every convolution,
    the dual-path depthwise convs included, and ``N(0, 0.01)`` weights with zero biases for the
    linear layers (the classifier). Returns the model, initialised in place.

    Example::

        net = seed_init(ResDualNet())
    """
    he_init(model)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


INITS = {"he": he_init, "seed": seed_init}


def apply_init(model: nn.Module, name: str) -> nn.Module:
    """Re-initialise ``model`` by name (``--init``): ``"default"`` keeps the model's own init,
    ``"he"`` is :func:`he_init`, ``"seed"`` :func:`seed_init`. Returns the model.

    Example::

        apply_init(net, "he")
    """
    if name == "default":
        return model
    try:
        return INITS[name](model)
    except KeyError:
        raise ValueError(
            f"unknown init {name!r}; choose from: default, {', '.join(sorted(INITS))}"
        ) from None
