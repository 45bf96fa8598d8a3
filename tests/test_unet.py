"""The UNet: shapes in every layout, codes and context, frame independence, the shipped checkpoint's layout,
parameter budget, and clear errors."""
import inspect
import json

import pytest
import torch

from diffusion_lab.checkpoint import load_checkpoint
from diffusion_lab.unet import CrossAttention, SinusoidalTimeEmbedding, UNet, count_parameters

TINY = (8, 16, 16)


def perturb(model, keep=lambda name: False, scale=0.05):
    """Move every weight off its initial value (the zero-initialised layers would hide any effect), except the
    parameters whose name `keep` selects."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not keep(name):
                p.add_(scale * torch.randn_like(p))
    return model


def cross_attention_names(model):
    return {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, CrossAttention)
            for p, _ in mod.named_parameters()}


def test_shapes_and_parameter_budget():
    model = UNet(channels=(32, 64, 64), num_classes=10, style_dim=3)
    assert count_parameters(model) < 2_000_000  # the foundation issue's budget for the small UNet
    x = torch.randn(3, 1, 28, 28)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10]), torch.randn(3, 3))
    assert out.shape == x.shape


@pytest.mark.parametrize("kwargs, shape", [
    (dict(), (2, 1, 28, 28)),                                    # MNIST digits
    (dict(in_channels=4), (2, 4, 64, 32)),                       # a piano roll as a rectangular image
    (dict(in_channels=3), (2, 3, 16, 16)),                       # colour
    (dict(in_channels=1), (2, 1, 8, 36)),                        # a wide rectangle
    (dict(in_channels=2, out_channels=4), (2, 2, 12, 20)),       # e.g. a prediction with a variance
    (dict(in_channels=4, dims="1d"), (2, 4, 64)),                # a 1-D signal: 4 channels, length 64
    (dict(dims="2+1d"), (2, 1, 8, 16, 16)),                      # 8-frame clips
    (dict(dims="2+1d"), (2, 1, 1, 8, 12)),                       # one rectangular frame is a clip too
    (dict(channels=(8,)), (2, 1, 5, 7)),                         # one level: no down-sampling, any size
    (dict(channels=(8, 8, 16, 16), dims="1d", in_channels=3), (2, 3, 24)),  # four levels: L divisible by 8
])
def test_forward_keeps_the_shape(kwargs, shape):
    torch.manual_seed(0)
    model = perturb(UNet(**{"channels": TINY, **kwargs}))
    out = model(torch.randn(shape), torch.tensor([3, 700]))
    assert out.shape == (shape[0], kwargs.get("out_channels", shape[1]), *shape[2:])
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3


def test_starts_as_zero_map_and_codes_reach_the_output():
    """The output layer starts at zero (a stable start); once weights move, label and style change the output."""
    torch.manual_seed(0)
    model = UNet(channels=TINY, num_classes=10, style_dim=3)
    x, t = torch.randn(4, 1, 28, 28), torch.full((4,), 10)
    assert model(x, t).abs().max() == 0
    perturb(model)
    base = model(x, t, torch.zeros(4, dtype=torch.long))
    assert not torch.allclose(base, model(x, t, torch.full((4,), 9)))
    assert not torch.allclose(base, model(x, t, torch.zeros(4, dtype=torch.long), torch.ones(4, 3)))
    assert not torch.allclose(base, model(x, t + 500, torch.zeros(4, dtype=torch.long)))


def test_fresh_clip_model_treats_frames_independently():
    """With its temporal convs at their initial zero, the (2+1)-D model denoises a clip exactly as it denoises each
    frame alone; once a temporal conv has weights, the frames inform each other."""
    torch.manual_seed(0)
    model = perturb(UNet(channels=TINY, dims="2+1d", num_classes=10), keep=lambda name: ".temporal." in name)
    x, t, labels = torch.randn(2, 1, 8, 16, 16), torch.tensor([5, 600]), torch.tensor([3, 7])

    def clip_and_frames():
        per_frame = [model(x[:, :, f:f + 1], t, labels) for f in range(x.shape[2])]
        return model(x, t, labels), torch.cat(per_frame, dim=2)

    clip, frames = clip_and_frames()
    assert clip.abs().mean() > 1e-2  # a real output, not the zero map
    torch.testing.assert_close(clip, frames, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model.mid[0].temporal.weight.normal_(0, 0.2)
    clip, frames = clip_and_frames()
    assert (clip - frames).abs().max() > 1e-2


@pytest.mark.parametrize("dims, shape", [("2d", (3, 1, 16, 8)), ("1d", (3, 4, 32)), ("2+1d", (3, 1, 4, 8, 8))])
def test_context_reaches_the_output_and_none_is_the_null_context(dims, shape):
    torch.manual_seed(0)
    model = UNet(in_channels=shape[1], channels=TINY, dims=dims, context_dim=6, num_classes=10).eval()
    cross = cross_attention_names(model)
    layers = [name for name, mod in model.named_modules() if isinstance(mod, CrossAttention)]
    assert len(layers) == 2  # where self-attention sits: the mid block and the lowest level of the up path
    perturb(model, keep=lambda name: name in cross and ".out." in name)  # output projections still at zero
    x, t, labels = torch.randn(shape), torch.tensor([1, 400, 900]), torch.tensor([0, 5, 10])
    context = torch.randn(3, 5, 6)
    base = model(x, t, labels)
    assert torch.equal(model(x, t, labels, context=context), base)  # a zero projection adds nothing yet

    # context=None is exactly the net without cross-attention: copy every other weight into a context_dim=0 UNet
    plain = UNet(in_channels=shape[1], channels=TINY, dims=dims, num_classes=10).eval()
    others = [p for name, p in model.named_parameters() if name not in cross]
    with torch.no_grad():
        for p, q in zip(plain.parameters(), others, strict=True):
            p.copy_(q)
    perturb(model, keep=lambda name: name not in cross)  # now the cross-attention layers have real weights
    torch.testing.assert_close(model(x, t, labels), plain(x, t, labels), rtol=0, atol=0)

    with_context = model(x, t, labels, context=context)
    assert (with_context - base).abs().max() > 1e-3
    assert not torch.allclose(with_context, model(x, t, labels, context=context.flip(0)))
    # an all-zero row is the null context for that sample only, so guidance can batch coded and null rows
    mixed = model(x, t, labels, context=torch.cat([context[:2], torch.zeros(1, 5, 6)]))
    torch.testing.assert_close(mixed[:2], with_context[:2])
    torch.testing.assert_close(mixed[2:], base[2:])


@pytest.mark.parametrize("dims, shape", [("2d", (2, 3, 16, 8)), ("1d", (2, 4, 32)), ("2+1d", (2, 1, 4, 8, 8))])
def test_gradients_reach_every_parameter(dims, shape):
    torch.manual_seed(0)
    model = perturb(UNet(in_channels=shape[1], channels=TINY, dims=dims, context_dim=6, num_classes=10,
                         style_dim=3, blocks_per_level=2))
    out = model(torch.randn(shape), torch.tensor([5, 900]), torch.tensor([1, 10]), torch.randn(2, 3),
                torch.randn(2, 5, 6))
    out.square().mean().backward()
    missed = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missed, missed


def test_state_dict_matches_the_shipped_checkpoint():
    """A UNet built like the shipped model has the same parameter names and shapes as its weights file, so
    UNet changes that would break loading it fail here (the golden-image test checks the numbers)."""
    tensors, meta = load_checkpoint("mnist-cond")
    train = meta["train"]
    model = UNet(in_channels=1, channels=train["channels"], blocks_per_level=train["blocks_per_level"],
                 attention=train["attention"], num_classes=10 if train["conditional"] else None,
                 style_dim=3 if train["style"] else 0)
    shipped = {k[len("net."):]: tuple(v.shape) for k, v in tensors.items() if k.startswith("net.")}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shipped


def test_config_rebuilds_the_net():
    model = UNet(in_channels=4, channels=TINY, dims="1d", context_dim=6, num_classes=10, style_dim=3)
    assert set(model.config) == set(inspect.signature(UNet).parameters)
    rebuilt = UNet(**json.loads(json.dumps(model.config)))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert rebuilt.config == model.config


def test_time_embedding_is_distinct_per_step():
    emb = SinusoidalTimeEmbedding(32)(torch.arange(0, 1000, 100))
    assert emb.shape == (10, 32)
    distances = torch.cdist(emb, emb) + torch.eye(10) * 1e3
    assert distances.min() > 0.1
    with pytest.raises(ValueError):
        SinusoidalTimeEmbedding(7)


def test_bad_input():
    model = UNet(channels=TINY)
    with pytest.raises(ValueError, match=r"needs x_t of shape \(B, 1, H, W\) with H and W divisible by 4"):
        model(torch.randn(2, 3, 28, 28), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="num_classes"):
        model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="style"):
        model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), style=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="context_dim=0"):
        model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), context=torch.zeros(2, 5, 6))
    with pytest.raises(ValueError, match=r"context must have shape \(B, L, 6\)"):
        UNet(channels=TINY, context_dim=6)(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), context=torch.zeros(2, 6))


@pytest.mark.parametrize("kwargs, shape, message", [
    (dict(in_channels=4), (2, 4, 30, 32),
     "UNet(dims='2d', 3 levels) needs x_t of shape (B, 4, H, W) with H and W divisible by 4; got (2, 4, 30, 32)"),
    (dict(in_channels=4), (2, 4, 64), "UNet(dims='2d', 3 levels) needs x_t of shape (B, 4, H, W)"),
    (dict(in_channels=4, dims="1d"), (2, 4, 30),
     "UNet(dims='1d', 3 levels) needs x_t of shape (B, 4, L) with L divisible by 4; got (2, 4, 30)"),
    (dict(dims="2+1d"), (2, 1, 16, 16),
     "UNet(dims='2+1d', 3 levels) needs x_t of shape (B, 1, F, H, W) with H and W divisible by 4 and F >= 1"),
    (dict(dims="2+1d"), (2, 1, 0, 16, 16), "needs x_t of shape (B, 1, F, H, W)"),
    (dict(channels=(8, 8, 16, 16)), (2, 1, 28, 28), "UNet(dims='2d', 4 levels) needs x_t of shape (B, 1, H, W) "
     "with H and W divisible by 8; got (2, 1, 28, 28)"),
])
def test_wrong_shape_names_the_layout_and_the_rule(kwargs, shape, message):
    model = UNet(**{"channels": TINY, **kwargs})
    with pytest.raises(ValueError) as err:
        model(torch.randn(shape), torch.tensor([1, 2]))
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels=()), "at least one width"),
    (dict(channels=(12, 24)), "multiple of 8"),
    (dict(channels=(8, 6)), "4 heads"),
    (dict(channels=(8, 16), dims="3d"), "dims must be one of"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)
