import pytest
import torch

from pcfast import PCResDualNet, ResDualNet, count_parameters
from pcfast.models.dualpath import DualPathDWConv


def test_parameter_count_is_the_seed_networks():
    assert count_parameters(ResDualNet()) == 141_354


def test_dual_path_conv_sums_the_two_outputs_of_a_grouped_conv():
    torch.manual_seed(0)
    conv = DualPathDWConv(5, stride=2)
    x = torch.randn(2, 5, 9, 9)
    grouped = torch.nn.functional.conv2d(x, conv.weight, stride=2, padding=1, groups=5)
    expected = grouped[:, 0::2] + grouped[:, 1::2]
    torch.testing.assert_close(conv(x), expected)


def test_forward_shape_and_pc_graph_matches_forward():
    torch.manual_seed(0)
    net = ResDualNet().eval()
    x = torch.randn(3, 3, 32, 32)
    out = net(x)
    assert out.shape == (3, 10)
    graph = net.pc_graph()
    torch.testing.assert_close(graph.forward(x), out)
    kinds = [n.name.split(".")[-1] for n in graph.nodes]
    # one node per sub-layer: 8 blocks x (dw1, pw, dw2, merge) + 4 shortcut nodes (concat blocks)
    assert kinds.count("merge") == 8 and kinds.count("shortcut") == 4
    assert kinds.count("dw1") == kinds.count("pw") == kinds.count("dw2") == 8
    assert graph.depth == 34
    # stem + 36 block nodes + one head node (global pool and classifier): the README's count
    assert len(graph.nodes) == 38 and kinds[0] == "stem" and kinds[-1] == "head"


def test_blocks_use_add_and_concat_merges_where_shapes_demand():
    net = ResDualNet()
    concat = [b.concat for b in net.blocks]
    assert concat == [True, False, True, False, True, False, True, False]


@pytest.mark.parametrize("bad, error", [
    (torch.randn(3, 32, 32), ValueError),
    (torch.randn(2, 1, 32, 32), ValueError),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError),
])
def test_bad_input_gets_a_clear_error(bad, error):
    net = PCResDualNet(T=1)
    with pytest.raises(error, match="expected"):
        net(bad)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(error, match="expected"):
        net.pc_step(bad, torch.zeros(bad.shape[0], dtype=torch.long), opt)


def test_bad_labels_get_a_clear_error():
    net = PCResDualNet(T=1)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="int64"):
        net.pc_step(x, torch.zeros(2), None)
    with pytest.raises(ValueError, match="batch sizes differ"):
        net.pc_step(x, torch.zeros(3, dtype=torch.long), None)


def test_pc_step_trains_in_a_users_loop():
    torch.manual_seed(0)
    net = PCResDualNet(T=1, rate=1.0, schedule="sequential")  # one sweep reaches the stem
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in net.parameters()]
    first = net.pc_step(x, y, opt)
    for _ in range(3):
        last = net.pc_step(x, y, opt)
    assert torch.isfinite(first.energy) and first.loss.item() > 0
    assert last.loss.item() < first.loss.item()  # fitting one batch
    moved = sum(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert moved == len(before)
