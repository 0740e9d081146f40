"""VGG-5 / VGG-7 of the PCX benchmark: layers, parameter counts, shapes, PC graph, PC = BP,
and the ``pcx-vgg5`` / ``pcx-vgg7`` presets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pcfast.models import MODELS, build_model, count_parameters
from pcfast.pc import PCEngine
from pcfast.train.presets import preset_config


def conv(c_in: int, c_out: int, k: int = 3) -> int:
    """Parameters of a k x k conv with bias."""
    return c_in * c_out * k * k + c_out


# The PCX paper's layers (pcx examples/s4_1_discriminative_mode/models.py at c722834):
# VGG-5: 3->128->256->512->512, every conv 3x3 pad 1 + 2x2 max-pool: 32 -> 16 -> 8 -> 4 -> 2;
# linear 512*2*2 -> 10.
VGG5_COUNT = conv(3, 128) + conv(128, 256) + conv(256, 512) + conv(512, 512) + (512 * 2 * 2 * 10 + 10)
# VGG-7: 3->128->128->256->256->512->512 (pad 1,1,1,0,1,0; pools after convs 1, 3, 5):
# 32 -> pool 16 -> 16 -> pool 8 -> 6 -> pool 3 -> 1; linear 512*1*1 -> 10.
VGG7_COUNT = (conv(3, 128) + conv(128, 128) + conv(128, 256) + conv(256, 256) + conv(256, 512)
              + conv(512, 512) + (512 * 10 + 10))


def test_parameter_counts_follow_the_paper_layers():
    # 3,584 + 295,168 + 1,180,160 + 2,359,808 + 20,490
    assert VGG5_COUNT == 3_859_210
    # 3,584 + 147,584 + 295,168 + 590,080 + 1,180,160 + 2,359,808 + 5,130
    assert VGG7_COUNT == 4_581_514
    assert count_parameters(build_model("vgg5")) == VGG5_COUNT
    assert count_parameters(build_model("vgg7")) == VGG7_COUNT
    assert {"vgg5", "vgg7"} <= set(MODELS)


@pytest.mark.parametrize(("name", "spec"), [
    # (out_channels, padding, pool after) per conv, as listed in the PCX models file
    ("vgg5", [(128, 1, True), (256, 1, True), (512, 1, True), (512, 1, True)]),
    ("vgg7", [(128, 1, True), (128, 1, False), (256, 1, True), (256, 0, False), (512, 1, True),
              (512, 0, False)]),
])
def test_layers_are_the_pcx_layers(name, spec):
    net = build_model(name)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.padding[0]) for c in convs] == [(o, p) for o, p, _ in spec]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.bias is not None for c in convs)
    blocks = list(net.layers)[:-1]
    assert [any(isinstance(m, nn.MaxPool2d) for m in b) for b in blocks] == [p for _, _, p in spec]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].out_features == 10


@pytest.mark.parametrize("name", ["vgg5", "vgg7"])
def test_forward_shapes(name):
    torch.manual_seed(0)
    net = build_model(name).eval()
    with torch.no_grad():
        for batch in (1, 7):
            out = net(torch.randn(batch, 3, 32, 32))
            assert out.shape == (batch, 10) and torch.isfinite(out).all()


def test_tiny_imagenet_sizes_follow_the_pcx_vode_shapes():
    # PCX: VGG-5 vodes at s/2, s/4, s/8, s/16; VGG-7's last at (s//4 - 2)//2 - 2.
    s = 56
    v5 = build_model("vgg5", num_classes=200, image_size=s)
    assert v5.feature_shape == (512, s // 16, s // 16)
    v7 = build_model("vgg7", num_classes=200, image_size=s)
    side = (s // 4 - 2) // 2 - 2
    assert v7.feature_shape == (512, side, side) == (512, 4, 4)
    with torch.no_grad():
        assert v7(torch.randn(2, 3, s, s)).shape == (2, 200)
    with pytest.raises(ValueError, match="too small"):
        build_model("vgg7", image_size=16)
    with pytest.raises(ValueError, match="expected an image batch"):
        build_model("vgg5")(torch.randn(2, 3, 28, 28))


def test_default_activations_are_jax_gelu_and_hard_tanh():
    x = torch.linspace(-4, 4, 101)
    # jax.nn.gelu's default is the tanh approximation
    gelu_tanh = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    act5 = build_model("vgg5").layers[0][1]
    torch.testing.assert_close(act5(x), gelu_tanh)
    act7 = build_model("vgg7").layers[0][1]
    torch.testing.assert_close(act7(x), x.clamp(-1, 1))
    with pytest.raises(ValueError, match="unknown activation"):
        build_model("vgg5", activation="swishy")


@pytest.mark.parametrize(("name", "depth"), [("vgg5", 5), ("vgg7", 7)])
def test_pc_graph_one_node_per_block(name, depth):
    torch.manual_seed(1)
    net = build_model(name)
    graph = net.pc_graph()
    assert [n.name for n in graph.nodes] == [f"block{i}" for i in range(depth - 1)] + ["head"]
    assert graph.depth == depth
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(graph.forward(x), net(x), rtol=0, atol=0)
    assert {id(p) for p in graph.parameters()} == {id(p) for p in net.parameters()}


@pytest.mark.parametrize("name", ["vgg5", "vgg7"])
@pytest.mark.parametrize("output_loss", ["ce", "mse"])
def test_pc_rate_one_equals_backprop(name, output_loss):
    """FPA PC with rate 1 and T = depth gives BP's gradients of the mean output loss."""
    torch.manual_seed(2)
    net = build_model(name).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (3,))
    logits = net(x)
    if output_loss == "ce":
        loss = F.cross_entropy(logits, y)
    else:
        loss = 0.5 * (logits - F.one_hot(y, 10).double()).pow(2).sum() / x.shape[0]
    ref = torch.autograd.grad(loss, list(net.parameters()))
    graph = net.pc_graph()
    PCEngine(graph, T=graph.depth, rate=1.0, output_loss=output_loss,
             backend="reference").compute_gradients(x, y)
    for (pname, p), g in zip(net.named_parameters(), ref):
        assert p.grad is not None, pname
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12, msg=pname)
    assert all(g.abs().sum() > 0 for g in ref)


def test_strict_pc_runs_and_is_not_backprop():
    torch.manual_seed(3)
    net = build_model("vgg5").double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (2,))
    ref = torch.autograd.grad(0.5 * (net(x) - F.one_hot(y, 10).double()).pow(2).sum() / 2,
                              list(net.parameters()))
    graph = net.pc_graph()
    first = next(net.parameters())  # block0's conv weight: 4 nodes below the output
    for T in (3, 4):
        net.zero_grad(set_to_none=True)
        PCEngine(graph, T=T, rate=0.1, fpa=False, output_loss="mse",
                 backend="reference").compute_gradients(x, y)
        assert torch.isfinite(first.grad).all()
        if T == 3:  # jacobi: the error front moves one node per step and has not reached block0
            assert first.grad.abs().max() == 0
    assert first.grad.abs().sum() > 0
    assert (first.grad - ref[0]).abs().max() > 1e-3 * ref[0].abs().max()


@pytest.mark.parametrize(("preset", "model", "T", "lr_x", "momentum", "lr", "wd", "act"), [
    ("pcx-vgg5", "vgg5", 7, 0.02348681827141059, 0.3, 2.657691155688603e-4,
     6.6559627972820395e-3, "gelu"),
    ("pcx-vgg7", "vgg7", 11, 0.01927208236479854, 0.85, 1.5756692930515384e-4,
     2.7480603900710354e-5, "hard_tanh"),
])
def test_pcx_presets(preset, model, T, lr_x, momentum, lr, wd, act):
    cfg = preset_config(preset)
    assert (cfg.model, cfg.rule, cfg.T, cfg.batch_size, cfg.epochs) == (model, "pc", T, 128, 50)
    assert (cfg.fpa, cfg.schedule, cfg.output_loss, cfg.pc_backend) == (False, "jacobi", "mse",
                                                                         "auto")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == ("adamw", lr, wd)
    assert cfg.model_kwargs == {"activation": act} and cfg.augment == "flip-crop"
    assert (cfg.rate, cfg.state_momentum, cfg.state_nesterov) == (lr_x, momentum, False)
    assert count_parameters(build_model(cfg.model, **cfg.model_kwargs)) == (
        VGG5_COUNT if model == "vgg5" else VGG7_COUNT)
