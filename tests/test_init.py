"""Weight initialisation by name: He et al.'s covers the dual-path convs, the seed's presets use
the seed's init (Kaiming fan-out convs, classifier N(0, 0.01))."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pcfast.models import build_model
from pcfast.models.dualpath import DualPathDWConv
from pcfast.models.init import apply_init
from pcfast.train.config import TrainConfig
from pcfast.train.presets import PRESETS


def _dual_path_convs(net: nn.Module) -> list[DualPathDWConv]:
    convs = [m for m in net.modules() if isinstance(m, DualPathDWConv)]
    assert convs, "the model has no dual-path conv to check"
    return convs


def _rel_err(got: float, want: float) -> float:
    return abs(got - want) / want


@pytest.mark.parametrize("init", ["he", "seed"])
def test_kaiming_fan_out_reaches_the_dual_path_convs(init):
    torch.manual_seed(0)
    net = apply_init(build_model("resdualnet"), init)
    for conv in _dual_path_convs(net):
        # The weight of Conv2d(C, 2C, 3, groups=C): fan-out 18 C, std sqrt(2 / (18 C)).
        want = 1.0 / (3.0 * math.sqrt(conv.channels))
        w = conv.weight.detach()
        # >= 288 samples per conv: the sample std is within ~4 % (1 sigma) of the true one.
        assert _rel_err(w.std().item(), want) < 0.2, (conv, w.std().item(), want)
        assert abs(w.mean().item()) < 4 * want / math.sqrt(w.numel())


def test_the_default_init_is_left_alone_and_differs_from_he():
    torch.manual_seed(0)
    default = build_model("resdualnet")
    stds = [c.weight.std().item() for c in _dual_path_convs(apply_init(default, "default"))]
    # PyTorch's conv default (kaiming_uniform, a = sqrt(5), fan-in 9): std 1 / sqrt(27) = 0.19.
    assert all(_rel_err(s, 1 / math.sqrt(27)) < 0.2 for s in stds)
    torch.manual_seed(0)
    he = [c.weight.std().item() for c in _dual_path_convs(apply_init(build_model("resdualnet"),
                                                                      "he"))]
    assert max(he) < 0.5 * min(stds)


def test_seed_init_gives_the_classifier_n_0_001_and_zero_bias():
    torch.manual_seed(0)
    net = apply_init(build_model("resdualnet"), "seed")
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert linears
    for lin in linears:
        assert _rel_err(lin.weight.std().item(), 0.01) < 0.2
        if lin.bias is not None:
            assert torch.count_nonzero(lin.bias) == 0
    torch.manual_seed(0)
    he = [m for m in apply_init(build_model("resdualnet"), "he").modules()
          if isinstance(m, nn.Linear)]
    assert all(m.weight.std().item() > 5 * 0.01 for m in he)  # he's fan-in std differs


@pytest.mark.parametrize("preset", ["seed-pc", "seed-bp"])
def test_seed_presets_use_the_seed_init(preset):
    assert TrainConfig.from_dict(PRESETS[preset]).init == "seed"


def test_unknown_init_names_the_choices():
    with pytest.raises(ValueError, match="unknown init 'xavier'; choose from: default, he, seed"):
        apply_init(build_model("mlp"), "xavier")
