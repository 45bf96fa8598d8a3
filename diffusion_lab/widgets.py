"""Interactive explorers for the chapters, built with ipywidgets. A leaf module: nothing imports it.

ipywidgets is imported only when an explorer is built, so the package works without it. A static page
(the built book) cannot run a widget, so every chapter shows a static figure beside each explorer.
The drawing is done by plain functions (`forward_process_frame`, `schedule_frame`, `sequence_frame`) that
return a matplotlib Figure; the explorers only wire a slider to them, and tests can call them directly.

- `forward_process_explorer(schedule, x0)`: a slider over t showing x_t ~ q(x_t | x0) (chapter 02);
- `schedule_explorer(schedules, x0)`: a slider over t/T comparing schedules side by side (chapter 03);
- `image_sequence_explorer(frames)`: a slider over any list of image batches, e.g. a sampler's
  callback frames (chapter 06 on).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from .plotting import image_grid, plot_schedules
from .schedules import NoiseSchedule, q_sample


def _ipywidgets():
    try:
        import ipywidgets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the interactive explorers need ipywidgets: pip install ipywidgets "
                          "(the static figure next to each explorer shows the same content)") from err
    return ipywidgets


def _as_batch(x0: torch.Tensor) -> torch.Tensor:
    x0 = torch.as_tensor(x0)
    if x0.ndim == 3:
        x0 = x0[:, None] if x0.shape[0] != 1 else x0[None]
    if x0.ndim != 4 or x0.shape[1] != 1:
        raise ValueError(f"x0 must be images (N, 1, H, W) in [-1, 1], got shape {tuple(x0.shape)}")
    if not x0.is_floating_point():
        raise ValueError("x0 must be float images in [-1, 1]; convert uint8 with diffusion_lab.data.to_unit_range")
    return x0.float()


def _check_schedule(schedule) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"expected a NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def _show(output, fig) -> None:
    """Replace what an Output widget shows by `fig`, then close it (pyplot must not keep every frame)."""
    from IPython.display import display

    with output:
        output.clear_output(wait=True)
        display(fig)
    plt.close(fig)


def _strip(images, title: str, height: float = 2.0):
    """One row of digits with a title: the picture every explorer redraws."""
    fig, ax = plt.subplots(figsize=(1.1 * len(images) + 1.5, height))
    ax.imshow(image_grid(images, len(images)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _redrawn_below(slider, frame):
    """A slider above an Output that shows frame(slider.value), redrawn whenever the slider moves."""
    widgets = _ipywidgets()
    output = widgets.Output()

    def redraw(change=None):
        _show(output, frame(slider.value))

    slider.observe(redraw, names="value")
    redraw()
    return widgets.VBox([slider, output])


# ------------------------------------------------------------------------------------------ drawing
def forward_process_frame(schedule: NoiseSchedule, x0: torch.Tensor, t: int, eps: torch.Tensor | None = None,
                          nrow: int | None = None):
    """x_t for a batch x0 at one step t (left) and where t sits on the alpha_bar curve (right)."""
    schedule, x0 = _check_schedule(schedule), _as_batch(x0)
    if not 0 <= int(t) < schedule.T:
        raise ValueError(f"t must lie in 0..{schedule.T - 1}, got {t}")
    t = int(t)
    eps = torch.randn_like(x0) if eps is None else eps
    x_t = q_sample(schedule, x0, torch.full((len(x0),), t), eps)
    fig, (ax_img, ax_curve) = plt.subplots(1, 2, figsize=(8, 3.4), gridspec_kw={"width_ratios": [1.3, 1]})
    ax_img.imshow(image_grid(x_t, nrow), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax_img.set_axis_off()
    alpha_bar_t, snr_t = schedule.alpha_bars[t].item(), schedule.snr[t].item()
    ax_img.set_title(f"t = {t}:  alpha_bar_t = {alpha_bar_t:.3g},  SNR = {snr_t:.2g}", fontsize=9)
    ax_curve.plot(np.arange(schedule.T), schedule.alpha_bars.numpy(), label="alpha_bar_t (signal kept)")
    ax_curve.plot(np.arange(schedule.T), 1 - schedule.alpha_bars.numpy(), label="1 - alpha_bar_t (noise)")
    ax_curve.axvline(t, color="k", lw=0.8)
    ax_curve.set(xlabel="t", ylabel="variance", title=f"{schedule.name} schedule")
    ax_curve.legend(fontsize=8)
    fig.tight_layout()
    return fig


def schedule_frame(schedules, fraction: float, x0: torch.Tensor | None = None, eps: torch.Tensor | None = None):
    """The log-SNR curves with a marker at t/(T-1) = `fraction`, and, if x0 is given, x_t of that image
    under each schedule at that point (same noise draw for all)."""
    schedules = [_check_schedule(s) for s in schedules]
    if not schedules:
        raise ValueError("schedule_frame needs at least one schedule")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    # curves on top (each spanning half the width), the noised images in a row underneath
    n_img = 0 if x0 is None else len(schedules)
    cols = 2 * max(1, n_img)
    fig = plt.figure(figsize=(9, 3.3 if x0 is None else 3.3 + 9 / max(n_img, 4)))
    grid = fig.add_gridspec(1 if x0 is None else 2, cols, height_ratios=None if x0 is None else [1.6, 1])
    axes = [fig.add_subplot(grid[0, : cols // 2]), fig.add_subplot(grid[0, cols // 2:])]
    plot_schedules(schedules, axes=axes)
    for ax in axes:
        ax.axvline(fraction, color="k", lw=0.8)
    if x0 is not None:
        x0 = _as_batch(x0)[:1]
        eps = torch.randn_like(x0) if eps is None else eps[:1]
        for i, s in enumerate(schedules):
            t = round(fraction * (s.T - 1))
            x_t = q_sample(s, x0, torch.tensor([t]), eps)
            ax = fig.add_subplot(grid[1, 2 * i: 2 * i + 2])
            ax.imshow(image_grid(x_t, 1, pad=0), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(f"{s.name}: t={t}, SNR={s.snr[t].item():.2g}", fontsize=8)
    fig.tight_layout()
    return fig


def sequence_frame(frames, index: int, captions=None, nrow: int | None = None):
    """Frame `index` of a list of image batches, as one grid with its caption."""
    if not len(frames):
        raise ValueError("no frames to show")
    if not 0 <= index < len(frames):
        raise ValueError(f"index must lie in 0..{len(frames) - 1}, got {index}")
    if captions is not None and len(captions) != len(frames):
        raise ValueError(f"{len(captions)} captions for {len(frames)} frames")
    grid = image_grid(frames[index], nrow)
    fig, ax = plt.subplots(figsize=(float(np.clip(grid.shape[1] / 25, 2, 8)), float(np.clip(grid.shape[0] / 25, 2, 8))))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(captions[index] if captions is not None else f"frame {index}", fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- explorers
def forward_process_explorer(schedule: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor | None = None,
                             generator: torch.Generator | None = None, nrow: int | None = None):
    """A slider over t that shows x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps for the images x0
    (N, 1, H, W) in [-1, 1] (chapter 02). One noise draw eps is kept fixed, so moving the slider changes
    only the noise level. Returns the widget; display it, or let it be a cell's last expression."""
    widgets = _ipywidgets()
    schedule, x0 = _check_schedule(schedule), _as_batch(x0)
    eps = torch.randn(x0.shape, generator=generator) if eps is None else eps
    if eps.shape != x0.shape:
        raise ValueError(f"eps has shape {tuple(eps.shape)} but x0 has {tuple(x0.shape)}")
    slider = widgets.IntSlider(value=schedule.T // 4, min=0, max=schedule.T - 1, step=1, description="t",
                               continuous_update=False, layout=widgets.Layout(width="500px"))
    return _redrawn_below(slider, lambda value: forward_process_frame(schedule, x0, value, eps, nrow))


def schedule_explorer(schedules, x0: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                      generator: torch.Generator | None = None):
    """A slider over t/(T-1) that marks the same point on every schedule's log-SNR curve and, if one image
    x0 is given, shows it noised to that point under each schedule with one shared noise draw (chapter 03)."""
    widgets = _ipywidgets()
    schedules = [_check_schedule(s) for s in schedules]
    if x0 is not None:
        x0 = _as_batch(x0)[:1]
        eps = torch.randn(x0.shape, generator=generator) if eps is None else eps
    slider = widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.01, description="t/T",
                                 continuous_update=False, layout=widgets.Layout(width="500px"))
    return _redrawn_below(slider, lambda value: schedule_frame(schedules, value, x0, eps))


def image_sequence_explorer(frames, captions=None, nrow: int | None = None):
    """A slider over a list of image batches (each (N, 1, H, W) in [-1, 1] or uint8), e.g. the x_t or
    x0_hat a sampler's callback collected. Returns the widget."""
    widgets = _ipywidgets()
    if not len(frames):
        raise ValueError("no frames to show")
    slider = widgets.IntSlider(value=0, min=0, max=len(frames) - 1, step=1, description="frame",
                               continuous_update=False, layout=widgets.Layout(width="500px"))
    return _redrawn_below(slider, lambda value: sequence_frame(frames, value, captions, nrow))


# ------------------------------------------------------------------------------ chapter 07: style codes
def _check_style_model(denoiser) -> None:
    if denoiser.style_dim != 3:
        raise ValueError("this explorer needs a model trained with style codes (TrainConfig.style=True), "
                         "e.g. the shipped 'mnist-cond'")


def sample_style(denoiser, digit: int, slant: float, thickness: float, x_T: torch.Tensor, steps: int = 10,
                 guidance: float = 2.0) -> torch.Tensor:
    """One `digit` per noise in x_T (N, 1, 28, 28), drawn at the requested slant and stroke thickness, in the
    units `data.slant` and `data.thickness` measure (shear per pixel, pixels) (chapter 07).

    The request becomes a style code with the model's own standardisation (denoiser.style_mean/std), and
    classifier-free guidance with weight `guidance` pushes towards label and style together. DPM-Solver++(2M).
    Returns float images (N, 1, 28, 28) in [-1, 1] on the CPU.
    """
    from .conditioning import style_code
    from .sample import generate

    _check_style_model(denoiser)
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be 0..9, got {digit}")
    if thickness <= 0:
        raise ValueError(f"stroke thickness is a width in pixels and must be positive, got {thickness}")
    n = len(x_T)
    labels = torch.full((n,), int(digit), dtype=torch.long)
    style = style_code(torch.tensor([[float(slant), float(thickness)]]).expand(n, 2),
                       denoiser.style_mean, denoiser.style_std)
    return generate(denoiser, labels, style, x_T=x_T, sampler="dpm++2m", steps=steps, guidance=guidance)


def style_frame(denoiser, digit: int, slant: float, thickness: float, seed: int = 0, n: int = 4, steps: int = 10,
                guidance: float = 2.0):
    """`n` samples of `digit` at the requested slant and thickness (one noise draw per sample, fixed by `seed`),
    titled with what was asked and what `data.slant` / `data.thickness` measure in the result (chapter 07)."""
    from .data import slant as measure_slant
    from .data import thickness as measure_thickness

    x_T = torch.randn(n, *denoiser.shape, generator=torch.Generator().manual_seed(int(seed)))
    x0 = sample_style(denoiser, digit, slant, thickness, x_T, steps, guidance)
    got_slant, got_thickness = measure_slant(x0).mean().item(), measure_thickness(x0).mean().item()
    return _strip(x0, f"digit {int(digit)}: asked slant {slant:+.2f}, thickness {thickness:.2f} px\n"
                      f"measured (mean of {n}): slant {got_slant:+.2f}, thickness {got_thickness:.2f} px", 2.2)


def style_explorer(denoiser, n: int = 4, steps: int = 10, guidance: float = 2.0):
    """Sliders for the digit, its slant and its stroke thickness (and the noise seed): draw any digit in any
    style the model learned (chapter 07). The slider ranges span the training data, mean +- 2.5 standard
    deviations, from denoiser.style_mean/std. Returns the widget; the chapter shows a static grid beside it."""
    widgets = _ipywidgets()
    _check_style_model(denoiser)
    (slant_mean, thick_mean), (slant_std, thick_std) = denoiser.style_mean, denoiser.style_std
    wide = widgets.Layout(width="420px")
    digit = widgets.IntSlider(value=3, min=0, max=9, description="digit", continuous_update=False, layout=wide)
    seed = widgets.IntSlider(value=0, min=0, max=99, description="noise seed", continuous_update=False, layout=wide)
    slant = widgets.FloatSlider(value=round(slant_mean, 2), min=round(slant_mean - 2.5 * slant_std, 2),
                                max=round(slant_mean + 2.5 * slant_std, 2), step=0.01, readout_format="+.2f",
                                description="slant", continuous_update=False, layout=wide)
    thickness = widgets.FloatSlider(value=round(thick_mean, 2), min=round(max(0.3, thick_mean - 2.5 * thick_std), 2),
                                    max=round(thick_mean + 2.5 * thick_std, 2), step=0.01, readout_format=".2f",
                                    description="thickness", continuous_update=False, layout=wide)
    output = widgets.Output()

    def redraw(change=None):
        _show(output, style_frame(denoiser, digit.value, slant.value, thickness.value, seed.value, n, steps, guidance))

    for control in (digit, seed, slant, thickness):
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([digit, seed]), widgets.HBox([slant, thickness]), output])


# --- chapter 10: a prompt box for the tiny Stable Diffusion ---------------------------------------------------

def prompt_frame(pipe, prompt: str, negative: str = "", seed: int = 0, n: int = 8, steps: int = 20,
                 guidance: float = 2.0):
    """`n` digits drawn for `prompt` (and `negative`, if any) by a `tiny_sd.TinySD` pipeline, titled with the prompt
    and what the classifier reads (chapter 10). Raises text.VocabularyError for a word outside the vocabulary."""
    from .metrics import predict
    from .tiny_sd import draw

    images = draw(pipe, [prompt] * n, negative or None, guidance=guidance, steps=steps, seed=int(seed))
    read = " ".join(str(d) for d in predict(images).tolist())
    return _strip(images, f"“{prompt}”" + (f" (negative: “{negative}”)" if negative else "")
                  + f"\nclassifier reads: {read}")


def prompt_explorer(pipe, n: int = 8, steps: int = 20, guidance: float = 2.0):
    """A prompt box, a negative-prompt box and a seed: type a prompt, press Enter, get digits (chapter 10). A word
    outside the vocabulary shows the error (with close words) instead of a picture. The chapter shows a static grid
    beside it."""
    widgets = _ipywidgets()
    wide = widgets.Layout(width="420px")
    prompt = widgets.Text(value="a thick slanted seven", description="prompt", continuous_update=False, layout=wide)
    negative = widgets.Text(value="", description="negative", continuous_update=False, layout=wide)
    seed = widgets.IntSlider(value=0, min=0, max=99, description="noise seed", continuous_update=False, layout=wide)
    output = widgets.Output()

    def redraw(change=None):
        try:
            fig = prompt_frame(pipe, prompt.value, negative.value, seed.value, n, steps, guidance)
        except ValueError as err:  # an unknown word, a prompt too long
            output.clear_output(wait=True)
            with output:
                print(f"error: {err}")
            return
        _show(output, fig)

    for control in (prompt, negative, seed):
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([prompt, negative, seed, output])


# --- chapter 13: drawing as fast as a slider moves ------------------------------------------------------------

def realtime_frame(student, digit: int, seed: int, n: int = 8):
    """`n` digits `digit` from a distilled student (its own step count, guidance built in), one per noise seed
    seed..seed+n-1, drawn one at a time at batch 1 as a live app would; titled with the achieved images per second
    (chapter 13). Returns (figure, images per second)."""
    import time

    from .sample import generate

    label = torch.tensor([int(digit)])
    start = time.perf_counter()
    images = torch.cat([generate(student, label, seed=int(seed) + i, batch_size=1) for i in range(n)])
    rate = n / (time.perf_counter() - start)
    return _strip(images, f"digit {digit}, {student.steps}-step student, noise seeds {seed}..{seed + n - 1}: "
                          f"{rate:.0f} images/s at batch 1", 1.9), rate


def realtime_explorer(student, n: int = 8):
    """A noise-seed slider that redraws while it moves (continuous_update), and a digit slider: each frame
    reports the frame rate it achieved (chapter 13). The chapter shows a static strip beside it."""
    widgets = _ipywidgets()
    wide = widgets.Layout(width="420px")
    digit = widgets.IntSlider(value=7, min=0, max=9, description="digit", layout=wide)
    seed = widgets.IntSlider(value=0, min=0, max=500, description="noise seed", layout=wide)
    output = widgets.Output()

    def redraw(change=None):
        _show(output, realtime_frame(student, digit.value, seed.value, n)[0])

    for control in (digit, seed):
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([digit, seed]), output])
