"""Tests of diffusion_lab.baselines: the time-blind conv stack and the single-resolution CNN (chapter 05)."""
import pytest
import torch

from diffusion_lab.baselines import ConvStack, PlainConvNet
from diffusion_lab.unet import count_parameters


def test_conv_stack_is_blind_to_t_unless_told():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    blind = ConvStack(width=8, depth=3)
    assert blind(x).shape == x.shape
    assert torch.equal(blind(x, torch.tensor([0, 0])), blind(x, torch.tensor([999, 999])))
    aware = ConvStack(width=8, depth=3, time_aware=True)
    assert not torch.allclose(aware(x, torch.tensor([0, 0])), aware(x, torch.tensor([999, 999])))
    with pytest.raises(ValueError, match="time-aware"):
        aware(x)
    with pytest.raises(ValueError):
        ConvStack(depth=1)
    with pytest.raises(ValueError, match="shape"):
        blind(torch.randn(2, 3, 28, 28))


def test_conv_stack_receptive_field_is_2_depth_plus_1():
    torch.manual_seed(0)
    for depth in (2, 3, 4):
        net = ConvStack(width=16, depth=depth).double()
        x = torch.randn(1, 1, 28, 28, dtype=torch.float64, requires_grad=True)
        net(x)[0, 0, 14, 14].backward()
        rows, cols = (x.grad[0, 0] != 0).nonzero(as_tuple=True)
        assert len(rows) > 0
        assert rows.max() - rows.min() + 1 <= 2 * depth + 1 and cols.max() - cols.min() + 1 <= 2 * depth + 1


def test_plain_conv_net_shapes_time_and_size():
    torch.manual_seed(0)
    net = PlainConvNet(width=16, blocks=2)
    x = torch.randn(3, 1, 28, 28)
    assert torch.count_nonzero(net(x, torch.zeros(3, dtype=torch.long))) == 0  # zero-initialised head
    for p in net.parameters():  # give every weight a value so time dependence shows
        torch.nn.init.normal_(p, std=0.1)
    a, b = net(x, torch.zeros(3, dtype=torch.long)), net(x, torch.tensor(500))
    assert a.shape == x.shape and not torch.allclose(a, b)
    assert count_parameters(PlainConvNet(width=16, blocks=4)) > count_parameters(net)
    with pytest.raises(ValueError):
        PlainConvNet(width=12)
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(3, 28, 28), torch.zeros(3))
