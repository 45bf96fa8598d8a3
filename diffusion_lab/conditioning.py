"""Style codes: what we tell the denoiser about the image we want, and how to turn that up.

A code has two parts. The class label is an integer 0..K-1, with K itself reserved as the null label
("no class given"). The continuous style is a vector of standardised attributes (chapter 07 uses
slant and stroke thickness) followed by a 1; the all-zero vector is the null style. The trailing 1
lets the network tell "average style" (attributes near 0) apart from "no style given".

Classifier-free guidance (Ho & Salimans 2022) trains one network on both coded and null inputs by
dropping codes at random, then at sampling time pushes the prediction away from the null one.
Introduced in chapter 07; the quickstart uses class labels only.
"""
from __future__ import annotations

import torch


def null_labels(batch: int, num_classes: int, device=None) -> torch.Tensor:
    return torch.full((batch,), num_classes, dtype=torch.long, device=device)


def style_code(attributes: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, S) raw attributes -> (B, S+1) code: standardised attributes plus the presence flag 1."""
    if attributes.ndim != 2:
        raise ValueError(f"style attributes must have shape (B, S), got {tuple(attributes.shape)}")
    mean = torch.as_tensor(mean, dtype=torch.float32, device=attributes.device)
    std = torch.as_tensor(std, dtype=torch.float32, device=attributes.device)
    if mean.shape != attributes.shape[1:] or std.shape != attributes.shape[1:]:
        raise ValueError(f"mean/std must have {attributes.shape[1]} entries, got {tuple(mean.shape)}, {tuple(std.shape)}")
    z = (attributes.float() - mean) / std
    return torch.cat([z, torch.ones_like(z[:, :1])], dim=1)


def null_style(batch: int, dim: int, device=None) -> torch.Tensor:
    """The null style code: all zeros, including the presence flag."""
    return torch.zeros(batch, dim, device=device)


def drop_codes(labels: torch.Tensor | None, style: torch.Tensor | None, num_classes: int | None, p_uncond: float,
               p_uncond_style: float = 0.0, generator: torch.Generator | None = None, context: torch.Tensor | None = None):
    """Classifier-free-guidance dropout. With probability p_uncond a sample loses its whole code (null label, null
    style and null context, all zeros), so the network also learns the unconditional model. With a further
    p_uncond_style it keeps its label but loses its style, so "this digit, any style" is a valid request too.
    Returns (labels, style), or (labels, style, context) when a context is given."""
    if not 0 <= p_uncond < 1 or not 0 <= p_uncond_style < 1:
        raise ValueError(f"drop probabilities must lie in [0, 1), got {p_uncond} and {p_uncond_style}")
    ref = next((c for c in (labels, style, context) if c is not None), None)
    if ref is None:
        return (labels, style) if context is None else (labels, style, context)
    u = torch.rand(len(ref), generator=generator).to(ref.device)
    drop_all = u < p_uncond
    if labels is not None:
        labels = torch.where(drop_all, torch.full_like(labels, num_classes), labels)
    if style is not None:
        drop_style = drop_all | (u > 1 - p_uncond_style)
        style = style * (~drop_style).to(style.dtype)[:, None]
    if context is None:
        return labels, style
    keep = (~drop_all).to(context.dtype).reshape(-1, *[1] * (context.ndim - 1))
    return labels, style, context * keep


def _codes(labels, style, context) -> dict:
    """The codes a coded denoiser is called with, by keyword, leaving out the ones not given."""
    given = {"labels": labels, "style": style, "context": context}
    return {k: v for k, v in given.items() if v is not None}


def guided(model, labels: torch.Tensor | None = None, style: torch.Tensor | None = None, guidance: float = 1.0,
           num_classes: int | None = None, context: torch.Tensor | None = None):
    """Wrap a coded denoiser `model(x_t, t, labels=, style=, context=)` as a plain callable (x_t, t) for the samplers.

    Classifier-free guidance: out = out_null + guidance * (out_code - out_null), where out_null sees the null
    label, style and context. guidance = 1 is the plain conditional model, 0 the unconditional one, > 1 trades
    diversity for fidelity to the code. (Ho & Salimans write the same rule with w = guidance - 1.)
    Both outputs come from one batched forward pass, so a guided step costs two network evaluations.
    The wrapper keeps the model's `prediction`, so the samplers still know what it outputs.
    """
    codes = _codes(labels, style, context)
    if guidance == 1.0 or not codes:
        def plain(x_t, t):
            return model(x_t, t, **codes)
        plain.prediction = getattr(model, "prediction", None)
        return plain
    num_classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
    if labels is not None and num_classes is None:
        raise ValueError("guided(): pass num_classes so the null label is known")

    def guided_model(x_t, t):
        B = len(x_t)
        nulls = {"labels": None if labels is None else null_labels(B, num_classes, x_t.device),
                 "style": None if style is None else torch.zeros_like(style),
                 "context": None if context is None else torch.zeros_like(context)}
        both = {k: torch.cat([v, nulls[k]]) for k, v in codes.items()}
        out_code, out_null = model(torch.cat([x_t, x_t]), torch.cat([t, t]), **both).chunk(2)
        return out_null + guidance * (out_code - out_null)

    guided_model.prediction = getattr(model, "prediction", None)
    return guided_model


def attributes_from_code(code: torch.Tensor, mean, std) -> torch.Tensor:
    """The inverse of `style_code`: (B, S+1) codes -> (B, S) raw attributes, e.g. slant and thickness in
    pixels (chapter 07). A null style (presence flag 0) asks for no attribute at all, so it raises."""
    if code.ndim != 2 or code.shape[1] < 2:
        raise ValueError(f"style codes must have shape (B, S+1), got {tuple(code.shape)}")
    if (code[:, -1] == 0).any():
        raise ValueError("a null style code (presence flag 0) has no attributes to recover")
    mean = torch.as_tensor(mean, dtype=torch.float32, device=code.device)
    std = torch.as_tensor(std, dtype=torch.float32, device=code.device)
    if mean.shape != (code.shape[1] - 1,) or std.shape != mean.shape:
        raise ValueError(f"mean/std must have {code.shape[1] - 1} entries, got {tuple(mean.shape)}, {tuple(std.shape)}")
    return code[:, :-1].float() * std + mean


def interpolate_codes(start: torch.Tensor, end: torch.Tensor, n: int) -> torch.Tensor:
    """`n` style codes on the straight line from `start` to `end` (each (S+1,) with flag 1), ends included
    (chapter 07). Standardised attributes are interpolated; the presence flag stays 1."""
    start, end = torch.as_tensor(start, dtype=torch.float32), torch.as_tensor(end, dtype=torch.float32)
    if start.ndim != 1 or start.shape != end.shape:
        raise ValueError(f"start and end must be single codes of the same shape (S+1,), got {tuple(start.shape)}, {tuple(end.shape)}")
    if start[-1] != 1 or end[-1] != 1:
        raise ValueError("interpolate between present style codes (flag 1); the null code has no position to move from")
    if n < 2:
        raise ValueError(f"need at least 2 points on the path, got {n}")
    w = torch.linspace(0, 1, n, device=start.device)[:, None]
    return torch.lerp(start[None], end[None], w)
