"""Weight initialisation used by the backprop model zoo."""

from __future__ import annotations

from torch import nn


def he_init(model: nn.Module) -> nn.Module:
    """He (Kaiming normal, ReLU gain) init for every convolution and linear layer of ``model``.

    Convolutions get ``N(0, 2 / (k*k*out_channels))`` (fan-out, as in He et al. 2015 and the
    CIFAR ResNets of He et al. 2016); linear layers get ``N(0, 2 / in_features)``; biases are
    zero; BatchNorm/LayerNorm/GroupNorm weights are one and their biases zero.

    Returns the model, initialised in place.

    Example::

        net = he_init(CifarResNet(20))
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
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


INITS = {"he": he_init}


def apply_init(model: nn.Module, name: str) -> nn.Module:
    """Re-initialise ``model`` by name (``--init``): ``"default"`` keeps the model's own init,
    ``"he"`` is :func:`he_init`. Returns the model.

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
