"""Style codes and classifier-free guidance (chapter 07): the null code, standardised style codes and their
inverse, code dropout at the advertised rates, and the guidance rule pred_null + s (pred_code - pred_null)."""
from __future__ import annotations

import pytest
import torch

from diffusion_lab.conditioning import (attributes_from_code, drop_codes, guided, interpolate_codes, null_labels,
                                        null_style, style_code)
from diffusion_lab.unet import UNet

MEAN, STD = [0.1, 2.0], [0.2, 0.5]


def test_null_codes():
    assert null_labels(3, 10).tolist() == [10, 10, 10]
    assert null_labels(2, 10).dtype == torch.long
    assert torch.equal(null_style(2, 3), torch.zeros(2, 3))


def test_style_code_standardises_and_appends_the_presence_flag():
    attributes = torch.tensor([[0.1, 2.0], [0.5, 1.0]])
    code = style_code(attributes, MEAN, STD)
    assert code.shape == (2, 3)
    assert torch.allclose(code, torch.tensor([[0.0, 0.0, 1.0], [2.0, -2.0, 1.0]]))
    # "average style" (z = 0) is not the null style: the flag tells them apart
    assert not torch.equal(code[0], null_style(1, 3)[0])


def test_style_code_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        style_code(torch.zeros(2), MEAN, STD)
    with pytest.raises(ValueError, match="2 entries"):
        style_code(torch.zeros(4, 2), [0.0], [1.0])


def test_attributes_from_code_inverts_style_code():
    attributes = torch.tensor([[0.3, 1.7], [-0.2, 2.9], [0.0, 0.0]])
    assert torch.allclose(attributes_from_code(style_code(attributes, MEAN, STD), MEAN, STD), attributes, atol=1e-6)
    with pytest.raises(ValueError, match="null style"):
        attributes_from_code(null_style(1, 3), MEAN, STD)
    with pytest.raises(ValueError, match="2 entries"):
        attributes_from_code(style_code(attributes, MEAN, STD), [0.0], [1.0])
    with pytest.raises(ValueError, match=r"\(B, S\+1\)"):
        attributes_from_code(torch.ones(3), MEAN, STD)


def test_interpolate_codes_walks_a_straight_line_and_keeps_the_flag():
    a, b = torch.tensor([-2.0, 0.0, 1.0]), torch.tensor([2.0, 1.0, 1.0])
    path = interpolate_codes(a, b, 5)
    assert path.shape == (5, 3)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    assert torch.allclose(path[2], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.all(path[:, -1] == 1)
    with pytest.raises(ValueError, match="null code"):
        interpolate_codes(a, torch.zeros(3), 3)
    with pytest.raises(ValueError, match="at least 2"):
        interpolate_codes(a, b, 1)
    with pytest.raises(ValueError, match="same shape"):
        interpolate_codes(a, b[:2], 3)


def test_drop_codes_drops_at_the_advertised_rates():
    n = 20_000
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    style = style_code(torch.randn(n, 2, generator=torch.Generator().manual_seed(1)), [0.0, 0.0], [1.0, 1.0])
    new_labels, new_style = drop_codes(labels, style, 10, p_uncond=0.1, p_uncond_style=0.2,
                                       generator=torch.Generator().manual_seed(2))
    no_label = new_labels == 10
    no_style = new_style[:, -1] == 0
    assert no_label.float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert no_style.float().mean().item() == pytest.approx(0.3, abs=0.012)  # whole code, or the style alone
    assert torch.all(no_style[no_label])  # a dropped label always drops the style too
    assert torch.equal(new_labels[~no_label], labels[~no_label])  # kept codes are untouched
    assert torch.equal(new_style[~no_style], style[~no_style])
    assert torch.all(new_style[no_style] == 0)


def test_drop_codes_edge_cases():
    labels = torch.arange(10)
    same, none = drop_codes(labels, None, 10, 0.0)
    assert torch.equal(same, labels) and none is None
    assert drop_codes(None, None, 10, 0.5) == (None, None)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        drop_codes(labels, None, 10, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        drop_codes(labels, None, 10, 0.1, p_uncond_style=-0.1)


class Recorder(torch.nn.Module):
    """A fake denoiser whose output depends on the code in a known way, and that counts its calls."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x_t, t, labels=None, style=None):
        self.calls += 1
        out = x_t.clone()
        if labels is not None:
            out = out + (labels.float() + 1)[:, None, None, None]  # null label 10 -> +11
        if style is not None:
            out = out + style.sum(1)[:, None, None, None]
        return out


def test_guidance_is_null_plus_guidance_times_the_difference_in_one_forward_pass():
    model = Recorder()
    x_t, t = torch.zeros(2, 1, 28, 28), torch.tensor([5, 5])
    labels = torch.tensor([3, 7])
    style = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 1.0]])
    code = model(x_t, t, labels, style)
    null = model(x_t, t, null_labels(2, 10), torch.zeros_like(style))
    model.calls = 0
    for guidance in (0.0, 1.0, 2.5):
        out = guided(model, labels, style, guidance)(x_t, t)
        assert torch.allclose(out, null + guidance * (code - null))
    assert model.calls == 3  # one call per weight: code and null share a batch (1 needs no null pass)


def test_guidance_with_labels_only_and_style_only():
    model = Recorder()
    x_t, t = torch.zeros(1, 1, 28, 28), torch.tensor([1])
    out = guided(model, torch.tensor([2]), None, 3.0)(x_t, t)
    assert torch.allclose(out, torch.full_like(out, 11 + 3.0 * (3 - 11)))
    style = torch.tensor([[0.5, 0.5, 1.0]])
    out = guided(model, None, style, 2.0)(x_t, t)
    assert torch.allclose(out, torch.full_like(out, 2.0 * 2.0))


def test_guidance_needs_the_number_of_classes():
    plain = lambda x_t, t, labels=None, style=None: x_t  # noqa: E731  has no num_classes attribute
    with pytest.raises(ValueError, match="num_classes"):
        guided(plain, torch.tensor([1]), None, 2.0)


def test_guided_unet_runs_with_class_and_style_codes():
    net = UNet(channels=(8, 16, 16), attention=False, num_classes=10, style_dim=3).eval()
    x_t, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 900])
    style = style_code(torch.tensor([[0.2, 2.0], [-0.1, 1.5]]), MEAN, STD)
    with torch.no_grad():
        out = guided(net, torch.tensor([1, 8]), style, 2.0)(x_t, t)
    assert out.shape == x_t.shape and torch.isfinite(out).all()


# ------------------------------------------------------------- the chapter 07 style explorer (widgets.py)
def _style_model(style=True):
    from diffusion_lab.training import TrainConfig, build_denoiser

    config = TrainConfig(channels=(8, 16, 16), attention=False, style=style, T=50,
                         style_mean=(0.1, 2.0) if style else (), style_std=(0.3, 0.5) if style else ())
    torch.manual_seed(0)
    return build_denoiser(config)


def test_sample_style_and_style_frame():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusion_lab import widgets

    denoiser = _style_model()
    x_T = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x0 = widgets.sample_style(denoiser, 4, 0.3, 2.5, x_T, steps=2, guidance=2.0)
    assert x0.shape == (3, 1, 28, 28) and x0.min() >= -1 and x0.max() <= 1
    fig = widgets.style_frame(denoiser, 4, 0.3, 2.5, seed=1, n=2, steps=2)
    title = fig.axes[0].get_title()
    assert "digit 4" in title and "asked slant +0.30" in title and "measured" in title
    plt.close(fig)
    with pytest.raises(ValueError, match="digit"):
        widgets.sample_style(denoiser, 12, 0.0, 2.0, x_T, steps=2)
    with pytest.raises(ValueError, match="positive"):
        widgets.sample_style(denoiser, 1, 0.0, 0.0, x_T, steps=2)
    with pytest.raises(ValueError, match="style codes"):
        widgets.sample_style(_style_model(style=False), 1, 0.0, 2.0, x_T, steps=2)


def test_style_explorer_builds_and_reacts():
    import ipywidgets  # noqa: F401  (a test requirement: when missing this fails, it does not skip)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusion_lab import widgets

    denoiser = _style_model()
    box = widgets.style_explorer(denoiser, n=2, steps=2)
    (digit, _seed), (slant, thickness) = box.children[0].children, box.children[1].children
    assert slant.min < denoiser.style_mean[0] < slant.max and thickness.min > 0
    assert thickness.max == pytest.approx(denoiser.style_mean[1] + 2.5 * denoiser.style_std[1], abs=0.01)
    digit.value = 7        # each change redraws; none may raise
    slant.value = slant.max
    plt.close("all")
