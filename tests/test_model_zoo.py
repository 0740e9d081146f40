"""The backprop model zoo: parameter counts, forward shapes, PC node graphs, BP equivalence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pcfast.models import MODELS, build_model, count_parameters
from pcfast.models.cifar_resnet import CifarResNet
from pcfast.models.mixer import MLPMixer
from pcfast.models.resnet18 import ResNet
from pcfast.models.simple import CNN, MLP, ResCNN
from pcfast.pc import PCEngine

# He et al. 2016 / the issue: option-A CIFAR ResNets.
HE_COUNTS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}


@pytest.mark.parametrize("depth", sorted(HE_COUNTS))
def test_cifar_resnet_option_a_and_plain_counts(depth):
    assert count_parameters(build_model(f"resnet{depth}")) == HE_COUNTS[depth]
    # The plain twin has exactly the same layers; option A shortcuts carry no parameters.
    assert count_parameters(build_model(f"plain{depth}")) == HE_COUNTS[depth]


def test_cifar_resnet_option_b_adds_two_projections():
    # Projections 16->32 and 32->64: 1x1 conv weights + BatchNorm weight and bias.
    projections = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    for depth in (20, 56):
        net = build_model(f"resnet{depth}", shortcut="B")
        assert count_parameters(net) == HE_COUNTS[depth] + projections


def test_resnet1202_count_follows_the_layout():
    # Per n: stage-1 blocks 2*(16*16*9 + 32); stages 2/3 two convs per block at 32/64 filters.
    # Closed form (checked against the table at n = 3 and 18): 97216 n - 21926.
    assert HE_COUNTS[20] == 97216 * 3 - 21926 and HE_COUNTS[110] == 97216 * 18 - 21926
    with torch.device("meta"):
        net = build_model("resnet1202")
    assert count_parameters(net) == 97216 * 200 - 21926 == 19_421_274


def test_resnet18_34_counts():
    assert count_parameters(build_model("resnet18")) == 11_173_962
    assert count_parameters(build_model("resnet34")) == 21_282_122


def test_mlp_count_and_batchnorm():
    net = MLP((100, 50), in_features=3072, activation="tanh")
    assert count_parameters(net) == 3072 * 100 + 100 + 100 * 50 + 50 + 50 * 10 + 10
    bn = MLP((100, 50), batchnorm=True)  # BN replaces the hidden biases: +1 weight per unit
    assert count_parameters(bn) == 3072 * 100 + 2 * 100 + 100 * 50 + 2 * 50 + 50 * 10 + 10


def test_cnn_count():
    net = CNN([16, "p", 32, "p"], batchnorm=False)
    expected = (3 * 9 * 16 + 16) + (16 * 9 * 32 + 32) + (32 * 8 * 8 * 10 + 10)
    assert count_parameters(net) == expected
    gap = CNN([16, "p", 32, "p"], batchnorm=True, head="gap")
    assert count_parameters(gap) == 3 * 9 * 16 + 2 * 16 + 16 * 9 * 32 + 2 * 32 + 32 * 10 + 10


def test_mixer_count():
    p, c, n, ds, dc = 4, 128, 2, 64, 512
    s = (32 // p) ** 2
    layer = 2 * c + (s * ds + ds + ds * s + s) + 2 * c + (c * dc + dc + dc * c + c)
    expected = (3 * p * p * c + c) + n * layer + 2 * c + (c * 10 + 10)
    assert count_parameters(MLPMixer(p, c, n, ds, dc)) == expected


def test_rescnn_bottleneck_count():
    net = ResCNN((16, 32), blocks=1, block=("small", "big"))
    stem = 3 * 9 * 16 + 32
    small = 2 * (16 * 9 * 16 + 32)  # identity shortcut
    mid = 32 // 4
    big = (16 * mid + 2 * mid) + (mid * 9 * mid + 2 * mid) + (mid * 32 + 64) + (16 * 32 + 64)
    assert count_parameters(net) == stem + small + big + 32 * 10 + 10


SHAPE_MODELS = [name for name in sorted(MODELS) if name != "resnet1202"]


@pytest.mark.parametrize("name", SHAPE_MODELS)
def test_forward_shapes_batch_1_and_7(name):
    torch.manual_seed(0)
    net = build_model(name).eval()
    with torch.no_grad():
        for batch in (1, 7):
            out = net(torch.randn(batch, 3, 32, 32))
            assert out.shape == (batch, 10)
            assert torch.isfinite(out).all()


def test_forward_shapes_in_train_mode():
    net = build_model("resnet20", shortcut="B").train()
    assert net(torch.randn(7, 3, 32, 32)).shape == (7, 10)


def _pc_models():
    return {
        "mlp_bn": (MLP((32, 16), in_features=3 * 8 * 8, batchnorm=True, activation="gelu"), 8),
        "cnn": (CNN([8, "p", 16, "p"], image_size=8, pool="avg"), 8),
        "resnet_a": (CifarResNet(8, widths=(4, 8, 16)), 8),
        "resnet_b": (CifarResNet(8, shortcut="B", widths=(4, 8, 16)), 8),
        "plain": (CifarResNet(14, plain=True, widths=(4, 8, 8)), 8),
        "rescnn": (ResCNN((8, 16), blocks=1, block=("small", "big")), 8),
        "resnet18": (build_model("resnet18"), 8),
    }


@pytest.mark.parametrize("key", list(_pc_models()))
def test_pc_graph_forward_equals_model_forward(key):
    torch.manual_seed(1)
    net, size = _pc_models()[key]
    x = torch.randn(5, 3, size, size)
    graph = net.pc_graph()
    for mode in (net.train, net.eval):
        mode()
        with torch.no_grad():
            torch.testing.assert_close(graph.forward(x), net(x), rtol=0, atol=0)
    assert {id(p) for p in graph.parameters()} == {id(p) for p in net.parameters()}


def test_resnet_graph_has_shortcut_and_merge_nodes():
    graph = CifarResNet(8, widths=(4, 8, 16)).pc_graph()
    names = [n.name for n in graph.nodes]
    # block0 keeps its shape (identity: the merge reads the stem); blocks 1, 2 subsample.
    assert "block0.shortcut" not in names and "block1.shortcut" in names
    merge0 = next(n for n in graph.nodes if n.name == "block0.merge")
    assert merge0.parents == ("block0.sub2", "stem")
    # stem, 3 x (sub1, sub2, merge), head: the shortcut runs beside sub1/sub2.
    assert graph.depth == 11


@pytest.mark.parametrize("key", ["mlp_bn", "cnn", "resnet_a", "resnet_b", "plain", "rescnn"])
def test_pc_rate_one_equals_backprop(key):
    """FPA PC with rate 1 and T = depth gives BP's gradients of the mean cross-entropy."""
    torch.manual_seed(2)
    net, size = _pc_models()[key]
    net = net.double().train()
    x = torch.randn(6, 3, size, size, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    ref = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    net.zero_grad(set_to_none=True)
    graph = net.pc_graph()
    PCEngine(graph, T=graph.depth, rate=1.0).compute_gradients(x, y)
    for (name, p), g in zip(net.named_parameters(), ref):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12, msg=name)
    assert sum(g.abs().sum() for g in ref) > 0


def test_clear_errors():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)
    with pytest.raises(ValueError, match="shortcut"):
        build_model("resnet20", shortcut="C")
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(50)
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        MLP((8,), activation="swishy")
    with pytest.raises(ValueError, match="'q' at position 1"):
        CNN([8, "q"])
    with pytest.raises(ValueError, match="divisible by patch_size"):
        MLPMixer(patch_size=5)
    with pytest.raises(ValueError, match="in_features"):
        MLP((8,))(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="block must be"):
        ResCNN((8, 16), block=("small",))


def test_models_doc_parameter_table_is_generated_from_the_code():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "param_table.py"
    spec = importlib.util.spec_from_file_location("param_table", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    table = tool.table()
    assert "| resnet110 | `resnet110` | — | 1,727,962 | yes |" in table
    assert tool.main(["--check"]) == 0, "docs/MODELS.md is stale: run python tools/param_table.py"
