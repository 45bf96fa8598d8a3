"""The benchmark scripts in benchmarks/: each runs end to end at a micro budget through its main(argv),
and what it writes has the shape the appendix page and chapter 08 read. The numbers at these budgets mean
nothing; the checks are about protocol (same noise, same sampler, the anchor's recipe) and plumbing.

Also checked: the committed results in benchmarks/results/ are exactly what the scripts render from their
JSON (nothing typed by hand), and every result file the appendix page includes exists.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

import diffusers  # noqa: E402, F401  (the anchor is built on it: a test dependency, so fail loudly if missing)
import ablation  # noqa: E402
import anchor_samplers  # noqa: E402
import plot_curves  # noqa: E402
import anchor  # noqa: E402
import gan_vs_diffusion  # noqa: E402
import gpu_run  # noqa: E402
import lora_sweep  # noqa: E402
import render_gpu  # noqa: E402
import sampling  # noqa: E402
import throughput  # noqa: E402
import train_vs_anchor  # noqa: E402

from diffusion_lab.schedules import NoiseSchedule  # noqa: E402
from diffusion_lab.checkpoint import CheckpointError  # noqa: E402
from diffusion_lab.denoiser import Denoiser, load_denoiser  # noqa: E402
from diffusion_lab.training import TrainConfig, train  # noqa: E402
from diffusion_lab.unet import UNet  # noqa: E402

SMOKE = "smoke check, not a result"
SCRIPTS = {"train_vs_anchor": train_vs_anchor, "throughput": throughput, "sampling": sampling, "ablation": ablation,
           "anchor_samplers": anchor_samplers, "lora_sweep": lora_sweep}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    torch.set_num_threads(1)
    train(TrainConfig(steps=2, channels=(8, 16, 16), batch_size=8, device="cpu"), checkpoint=path, progress=False)
    return path


def check_markdown(md: Path, result: dict, module) -> str:
    text = md.read_text()
    assert SMOKE in text, "a micro-budget run must say it is a smoke check"
    assert "load average at start" in text and result["machine"]["torch"] in text
    assert text.strip() == module.render(result).strip()  # the markdown is the JSON, rendered
    return text


# --- the anchor ------------------------------------------------------------------------------------------------

def test_anchor_schedule_is_the_cosine_schedule():
    ours = NoiseSchedule.from_name("cosine", 1000)
    theirs = anchor.anchor_schedule()
    assert theirs.T == 1000
    assert torch.allclose(theirs.alpha_bars, ours.alpha_bars, atol=1e-6)


def test_anchor_net_is_the_course_architecture_and_reads_the_label():
    torch.manual_seed(0)
    net = anchor.AnchorNet().eval()
    cfg = net.unet.config
    assert cfg.in_channels == 1 + 4 and cfg.out_channels == 1 and cfg.layers_per_block == 2
    assert tuple(cfg.block_out_channels) == (32, 64, 64)
    assert tuple(cfg.down_block_types) == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert tuple(cfg.up_block_types) == ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert net.class_emb.num_embeddings == 10 and net.class_emb.embedding_dim == 4
    x = torch.randn(2, 1, 28, 28)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        a = net(x, t, torch.tensor([3, 3]))
        b = net(x, t, torch.tensor([3, 7]))
    assert a.shape == x.shape
    assert torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_train_anchor_needs_a_budget_and_counts_images():
    with pytest.raises(ValueError, match="budget"):
        anchor.train_anchor()
    images = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (16,))
    seen = []
    r = anchor.train_anchor(steps=3, batch_size=4, images=images, labels=labels, log_every=1,
                            callback=lambda step, n, model: seen.append((step, n)) or step == 2)
    assert r["step"] == 2 and r["images_seen"] == 8 and seen == [(1, 4), (2, 8)]  # the callback stopped it
    assert len(r["losses"]) == 2 and all(loss > 0 for loss in r["losses"])


def test_train_anchor_resumes_exactly_where_it_stopped(tmp_path):
    """4 steps in one go, and 2 + 2 through a checkpoint (a stopped process, then the same call): the same weights
    and losses bit for bit, because Adam's moments and the batch generator come back with the weights."""
    images = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (16,))
    kw = dict(batch_size=4, images=images, labels=labels, ckpt_every=1)
    whole = anchor.train_anchor(steps=4, **kw)
    run = tmp_path / "anchor-run.safetensors"
    anchor.train_anchor(steps=2, checkpoint=run, **kw)
    resumed = anchor.train_anchor(steps=4, checkpoint=run, **kw)
    assert resumed["step"] == 4 and resumed["images_seen"] == 16 and resumed["losses"] == whole["losses"]
    for (name, a), b in zip(whole["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="cannot resume"):
        anchor.train_anchor(steps=5, checkpoint=run, **{**kw, "batch_size": 8})


# --- the scripts at micro budgets -----------------------------------------------------------------------------

def test_train_vs_anchor_micro(tmp_path):
    out = tmp_path / "tva.json"
    train_vs_anchor.main(["--minutes", "1", "--max-steps", "2", "--n-eval", "20", "--n-reference", "100",
                          "--sample-steps", "2", "--channels", "8", "16", "16", "--batch-size", "4",
                          "--calibrate-steps", "1", "--heldout", "8", "--attention", "0", "--p-uncond", "0.05",
                          "--sampler", "ddpm", "--device", "cpu", "--save", str(tmp_path / "models"),
                          "--out", str(out)])
    result = json.loads(out.read_text())
    # the saved models load back, each through its own loader, and the anchor's loader refuses ours
    ours = load_denoiser(result["saved"]["ours"]["path"])
    assert ours.net.config["attention"] is False and tuple(ours.net.config["channels"]) == (8, 16, 16)
    assert ours.prediction == "v" and ours.num_classes == 10
    anchor_model, anchor_sched = anchor.load_anchor(result["saved"]["anchor"]["path"])
    x, t, lab = torch.zeros(2, 1, 28, 28), torch.tensor([5, 500]), torch.tensor([1, 2])
    assert anchor_model(x, t, lab).shape == ours(x, t, labels=lab).shape == (2, 1, 28, 28)
    assert anchor_sched.T == 1000
    with pytest.raises(CheckpointError, match="not an anchor checkpoint"):
        anchor.load_anchor(result["saved"]["ours"]["path"])
    assert result["smoke"] and result["n_eval"] == 20
    assert result["ours"]["config"]["p_uncond"] == 0.05 and result["ours"]["config"]["attention"] is False
    assert result["sampling"]["sampler"] == "ddpm" and "ancestral" in result["sampling"]["how"]
    assert result["anchor"]["step"] == result["ours"]["step"] == 2
    assert [r["recipe"] for r in result["rows"]] == ["anchor", "this repo", "this repo, guided",
                                                     "real training digits (floor at n=20)"]
    for r in result["rows"][:3]:
        assert r["classifier_fid"] >= 0 and 0 <= r["conditional_accuracy"] <= 1 and r["seconds_per_image"] > 0
    for side in ("anchor", "ours"):
        run = result[side]
        assert run["step"] >= 1 and run["images_seen"] == run["step"] * 4 and run["images_per_s"] > 0
        assert run["curve"][-1]["images_seen"] == run["images_seen"] and run["heldout_eps_mse"] > 0
    assert result["ours"]["config"]["prediction"] == "v" and result["anchor"]["recipe"]["lr"] == 1e-3
    assert result["ours"]["at_anchor_images_seen"]["images_seen"] == result["anchor"]["images_seen"]
    assert len(result["targets"]) == 4 and all(isinstance(t["met"], bool) for t in result["targets"])
    text = check_markdown(out.with_suffix(".md"), result, train_vs_anchor)
    assert "| anchor | none |" in text


def test_throughput_micro_counts_the_anchors_flops(tmp_path):
    out = tmp_path / "tp.json"
    throughput.main(["--batch", "2", "--reps", "1", "--warmup", "1", "--matmul-n", "64", "--peak-reps", "1",
                     "--peak-min-s", "0.01", "--variants", "eager", "channels_last", "--channels", "8", "16", "16",
                     "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [(r["model"], r["variant"]) for r in result["rows"]] == [
        ("this repo", "eager"), ("anchor", "eager"), ("this repo", "channels_last"), ("anchor", "channels_last")]
    for r in result["rows"]:
        assert r["images_per_s"] > 0 and 0 < r["fraction_of_conv_peak"] and r["achieved_gflops"] > 0
    anchor_rows = [r for r in result["rows"] if r["model"] == "anchor"]
    # the course model costs about 1.75 GFLOP per image per training step (224 GFLOP at batch 128)
    assert all(abs(r["gflop_per_step"] / 2 - 1.754) < 0.02 for r in anchor_rows)
    assert result["peaks"]["conv_spec"]["flops"] > 0 and set(result["speedups"]) == {"eager", "channels_last"}
    eager = {r["model"]: r["images_per_s"] for r in result["rows"] if r["variant"] == "eager"}
    ours_cl = next(r for r in result["rows"] if r["model"] == "this repo" and r["variant"] == "channels_last")
    target = next(t for t in result["targets"] if t["variant"] == "channels_last")
    assert target["speedup_vs_anchor_eager"] == pytest.approx(ours_cl["images_per_s"] / eager["anchor"])
    check_markdown(out.with_suffix(".md"), result, throughput)


def test_throughput_peak_tries_both_memory_formats_whatever_the_variants(tmp_path):
    # the conv peak is the machine's best layout: asking only for eager must not lower it (and flatter the fractions)
    out = tmp_path / "tp.json"
    result = throughput.main(["--batch", "2", "--reps", "1", "--warmup", "1", "--matmul-n", "64", "--peak-reps", "1",
                              "--peak-min-s", "0.01", "--variants", "eager", "--channels", "8", "16", "16",
                              "--device", "cpu", "--out", str(out)])
    conv = result["peaks"]["conv"]
    assert sorted(c["channels_last"] for c in conv) == [False, True]
    assert result["peaks"]["conv_peak_gflops"]["float32"] == max(
        max(c["forward_gflops"], c["forward_backward_gflops"]) for c in conv)


def test_throughput_breakdown_splits_the_step(tmp_path):
    out = tmp_path / "tp.json"
    result = throughput.main(["--batch", "4", "--reps", "2", "--warmup", "1", "--matmul-n", "64", "--peak-reps", "1",
                              "--peak-min-s", "0.01", "--variants", "eager", "--channels", "8", "16", "16",
                              "--breakdown", "--device", "cpu", "--out", str(out)])
    for r in result["rows"]:
        b = r["breakdown"]
        assert set(b["shares"]) == set(throughput.PARTS) and sum(b["shares"].values()) == pytest.approx(1)
        assert b["shares"]["convolution forward"] > 0 and b["shares"]["convolution backward"] > 0
        # the convolutions are only part of the step, so alone they run faster than the whole step does
        assert b["conv_alone_gflops"] > r["achieved_gflops"] and 0 < b["conv_gflop_per_step"] <= r["gflop_per_step"]
    text = check_markdown(out.with_suffix(".md"), result, throughput)
    assert "convs alone ÷ conv peak" in text


def test_throughput_parts_of_a_step():
    assert throughput.part_of("aten::mkldnn_convolution") == "convolution forward"
    assert throughput.part_of("aten::convolution_backward") == "convolution backward"
    assert throughput.part_of("aten::native_group_norm_backward") == "normalisation and activations"
    assert throughput.part_of("aten::silu") == "normalisation and activations"
    assert throughput.part_of("Optimizer.step#AdamW.step") == "everything else"


def test_throughput_levers_parse():
    assert throughput.parse_variant("eager") == frozenset()
    assert throughput.variant_name(throughput.parse_variant("bf16+channels_last")) == "channels_last+bf16"
    with pytest.raises(ValueError, match="unknown lever"):
        throughput.parse_variant("bf16+fast")


def test_sampling_micro(tmp_path, tiny_checkpoint):
    out = tmp_path / "s.json"
    sampling.main(["--checkpoint", str(tiny_checkpoint), "--nfe", "2", "5", "--n-eval", "20", "--n-reference", "100",
                   "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 5 * 2 and result["prediction"] == "v"
    fid = {(r["sampler"], r["nfe"]): r["classifier_fid"] for r in result["rows"]}
    for nfe in (2, 5):  # the same model, noise and DDIM update: the two libraries draw the same digits
        assert fid[("ddim", nfe)] == pytest.approx(fid[("diffusers-ddim", nfe)], rel=1e-3)
    check_markdown(out.with_suffix(".md"), result, sampling)


# (sampler, clip_x0, weight scale). The clipped case: ours re-derives eps_hat from the clipped x0_hat, diffusers'
# DDIM only with use_clipped_model_output; weights this large make the clip bind, so a missing flag shows.
@pytest.mark.parametrize("name, clip, scale", [("ddim", None, 0.1), ("dpm++2m", None, 0.1), ("ddim", 1.0, 0.3)])
def test_diffusers_drivers_draw_the_same_digits_as_ours(name, clip, scale):
    torch.manual_seed(0)
    net = UNet(channels=(8, 16, 16), num_classes=10)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, scale)
    denoiser = Denoiser(net.eval(), "v", NoiseSchedule.from_name("cosine", 1000), (1, 28, 28), num_classes=10)
    ours = sampling.draw(name, denoiser, 6, 10, clip_x0=clip, batch=4)
    theirs = sampling.draw(f"diffusers-{name}", denoiser, 6, 10, clip_x0=clip, batch=4)
    if clip:
        assert ((ours["images"] == 0) | (ours["images"] == 255)).float().mean() > 0.1  # the clip binds
    diff = (ours["images"].int() - theirs["images"].int()).abs()
    assert diff.max() <= 1, "a convention mismatch moves pixels by far more than one grey level"


def test_sampling_clips_diffusers_dpm_solver_never(monkeypatch):
    # diffusers' DPM-Solver has no x0_hat clipping: the benchmark runs it unclipped rather than fail or pretend
    seen = []
    monkeypatch.setattr(sampling, "sample_images", lambda *a, **k: seen.append(k["clip_x0"]))
    for name in ("ddim", "diffusers-ddim", "diffusers-dpm++2m"):
        sampling.draw(name, None, 2, 2, clip_x0=1.0)
    assert seen == [1.0, 1.0, None]


def test_anchor_samplers_micro(tmp_path):
    # train a 2-step anchor, save it as train_vs_anchor --save would, and score the saved weights four ways
    trained = anchor.train_anchor(steps=2, batch_size=4)
    path = tmp_path / "anchor-seed0.safetensors"
    anchor.save_anchor(path, trained["model"], trained["step"])
    out = tmp_path / "as.json"
    result = anchor_samplers.main(["--anchor", str(path), "--n-eval", "10", "--n-course", "2", "--course-steps", "20",
                                   "--device", "cpu", "--out", str(out)])
    assert result["smoke"] and result["anchor_source"] == "loaded from anchor-seed0.safetensors"
    assert [(r["sampler"], r["nfe"]) for r in result["rows"]] == [
        ("diffusion_lab ddpm", 10), ("diffusion_lab ddim", 20), ("diffusion_lab ddpm", 100),
        ("course loop (diffusers DDPMScheduler)", 20)]
    assert result["rows"][-1]["classifier_fid"] is None and result["rows"][-1]["n"] == 2
    assert all(0 <= r["conditional_accuracy"] <= 1 and r["seconds_per_image"] > 0 for r in result["rows"])
    check_markdown(out.with_suffix(".md"), result, anchor_samplers)


def test_plot_curves_draws_the_committed_runs(tmp_path):
    png = plot_curves.main(["--out", str(tmp_path / "curves.png")])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (RESULTS / "train_vs_anchor_curves.png").exists(), "run python benchmarks/plot_curves.py"
    with pytest.raises(SystemExit, match="not a train_vs_anchor result"):
        plot_curves.main(["--runs", str(RESULTS / "sampling.json"), "--out", str(tmp_path / "x.png")])


def test_ablation_micro(tmp_path):
    out = tmp_path / "ab.json"
    ablation.main(["--minutes", "1", "--max-steps", "1", "--n-eval", "20", "--n-reference", "100",
                   "--sample-steps", "2", "--channels", "8", "16", "16", "--batch-size", "4", "--calibrate-steps", "1",
                   "--variants", "eps", "no_ema", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["baseline", "eps", "no_ema"]
    assert rows[0]["fid_vs_baseline"] == 1.0 and rows[0]["images_per_s_vs_baseline"] == 1.0
    assert all(not isinstance(v, (list, dict)) for r in rows for v in r.values())  # chapter 08 prints flat rows
    text = check_markdown(out.with_suffix(".md"), result, ablation)
    out.with_suffix(".md").write_text("stale")
    ablation.main(["--rerender", "--out", str(out)])  # the markdown comes back from the JSON alone
    assert out.with_suffix(".md").read_text() == text


def test_ablation_step_matched(tmp_path):
    """--steps N: every run trains exactly N steps, whatever its speed (the GPU replays a CPU budget's steps)."""
    out = tmp_path / "ab.json"
    ablation.main(["--steps", "2", "--n-eval", "20", "--n-reference", "100", "--sample-steps", "2", "--sampler",
                   "ddpm", "--channels", "8", "16", "16", "--batch-size", "4", "--variants", "p_uncond_0.05",
                   "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and result["sampler"] == "ddpm"
    assert [(r["variant"], r["steps"], r["images_seen"]) for r in result["rows"]] == [
        ("baseline", 2, 8), ("p_uncond_0.05", 2, 8)]
    text = check_markdown(out.with_suffix(".md"), result, ablation)
    assert "2 steps of training each, DDPM 2 steps" in text


def test_gpu_sweep_rows_prefer_json_and_fill_cut_seeds_from_the_log(tmp_path):
    row = lambda variant, seed, acc: {"variant": variant, "lever": variant, "seed": seed, "steps": 10,  # noqa: E731
                                      "classifier_fid": 20.0 + seed, "conditional_accuracy": acc}
    (tmp_path / "sweep_seed2.json").write_text(json.dumps({"rows": [row("baseline", 2, 0.9), row("x", 2, 0.95)]}))
    printed = [row("baseline", 1, 0.8), row("x", 1, 0.82), row("baseline", 2, 0.1)]  # seed 2's JSON wins
    (tmp_path / "sweep_seed1_log.txt").write_text("start-up noise\n" + "\n".join(map(repr, printed)) + "\n")
    rows = render_gpu.sweep_rows(tmp_path)
    assert sorted((r["seed"], r["variant"], r["conditional_accuracy"]) for r in rows) == [
        (1, "baseline", 0.8), (1, "x", 0.82), (2, "baseline", 0.9), (2, "x", 0.95)]
    text = render_gpu.render_sweep(tmp_path)
    assert "| x | x | 1 | 10 | 21 | 0.82 | 1 | 2 |" in text and "| x | x | 2 | 10 | 22 | 0.95 | 1 | 5 |" in text


def test_ema_reach_is_where_the_warm_up_meets_the_decay():
    from diffusion_lab.training import ema_update
    for decay in (0.995, 0.999):
        n = render_gpu.ema_reach(decay)
        for step, expect_capped in ((n - 1, False), (n, True)):
            ema, model = (torch.nn.Linear(1, 1, bias=False).double() for _ in range(2))
            with torch.no_grad():
                ema.weight.fill_(0.0), model.weight.fill_(1.0)
            ema_update(ema, model, step, decay)
            d = 1 - ema.weight.item()  # ema <- d * 0 + (1 - d) * 1
            assert (abs(d - decay) < 1e-12) == expect_capped, (decay, step, d)


def test_placeholder_never_hides_results(tmp_path):
    out = tmp_path / "x.json"
    result = sampling.main(["--placeholder", "--out", str(out)])
    md = Path(result["placeholder"])
    assert "Not yet measured on this machine" in md.read_text() and sampling.HEADLINE_COMMAND in md.read_text()
    assert not out.exists()
    out.write_text("{}")
    with pytest.raises(SystemExit, match="already holds results"):
        sampling.main(["--placeholder", "--out", str(out)])


def test_gan_vs_diffusion_micro_and_merge(tmp_path):
    parts = []
    for seed in (0, 1):
        out = tmp_path / f"gvd{seed}.json"
        gan_vs_diffusion.main(["--preset", "smoke", "--seeds", str(seed), "--budget-s", "0.3", "--device", "cpu",
                               "--out", str(out)])
        parts.append(out)
        result = json.loads(out.read_text())
        assert set(result["machine"]) == {"device", "name", "cpu_count", "torch_threads", "torch", "python",
                                          "load_average_before", "load_average_after"}  # chapter 01 prints these
        assert result["machine"]["name"] and result["machine"]["device"] == "cpu"
        for name in ("gan", "diffusion"):
            run = result["runs"][name][0]
            assert run["seed"] == seed and run["curve"] and all(p["fid"] > 0 for p in run["curve"])
            assert sum(run["class_histogram"]) == result["config"]["n_hist"]
            assert len(run["curve"]) == result["config"]["evals"]  # equal evaluations, none past the budget
        assert result["runs"]["diffusion"][0]["objective"] == "v"
        cost = result["sampling_cost"]
        assert cost["diffusion_forward_passes"] == result["config"]["sampler_steps"] and cost["diffusion_s"] > 0
    merged = tmp_path / "gvd.json"
    gan_vs_diffusion.main(["--merge", *map(str, parts), "--out", str(merged)])
    assert [r["seed"] for r in json.loads(merged.read_text())["runs"]["diffusion"]] == [0, 1]


def test_gan_vs_diffusion_samples_through_generate_with_the_models_contract():
    config = gan_vs_diffusion.diffusion_config(0, 8, [8, 16, 16], "cpu")
    assert config.prediction == "v" and not config.conditional and not config.attention
    from diffusion_lab.training import build_denoiser
    denoiser = build_denoiser(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in denoiser.net.parameters():
            p.normal_(0, 0.1)
    a = gan_vs_diffusion.sample_diffusion(denoiser, 5, 3, seed=1, batch_size=2)
    b = gan_vs_diffusion.sample_diffusion(denoiser, 5, 3, seed=1, batch_size=2)
    assert a.shape == (5, 1, 28, 28) and a.abs().max() <= 1 and torch.equal(a, b)  # seeded: every evaluation alike
    assert not torch.equal(a, gan_vs_diffusion.sample_diffusion(denoiser, 5, 3, seed=2))


def test_gpu_run_smoke_on_cpu(tmp_path):
    """Every phase of the GPU session at seconds-long sizes: a phase that raises writes <phase>_error.json."""
    gpu_run.main(["--smoke", "--device", "cpu", "--phases", "ship,speed,throughput", "--out", str(tmp_path)])
    errors = sorted(p.name for p in tmp_path.glob("*_error.json"))
    assert not errors, [json.loads((tmp_path / e).read_text()) for e in errors]
    ship = json.loads((tmp_path / "ship.json").read_text())
    assert ship["returncode"] == 0 and [e["guidance"] for e in ship["evals"]] == [1.0, 2.0, 3.0]
    assert all(0 <= e["conditional_accuracy"] <= 1 and e["classifier_fid"] > 0 for e in ship["evals"])
    speed = json.loads((tmp_path / "speed_none_compile0.json").read_text())
    assert speed["config"]["steps"] == 4 and speed["trace"] and set(gpu_run.machine()) <= set(speed)
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert rows and rows[0]["images_per_s"] > 0


def test_lora_sweep_micro(tmp_path, monkeypatch):
    """Chapter 09's sweep at a micro budget: every run is scored at its steps, sizes are stratified, and a re-run
    with the same settings keeps the finished runs instead of training them again."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep.json"
    argv = ["--out", str(out), "--steps", "2", "--eval-at", "1", "--n-eval", "10", "--sample-steps", "2",
            "--style-steps", "5", "--methods", "r1", "full", "--sizes", "10", "--threads", "1"]
    result = lora_sweep.main(argv)
    names = [run["name"] for run in result["runs"]]
    assert names == ["r1-n1500", "full-n1500", "r4-n10"]
    assert [p["step"] for p in result["runs"][0]["curve"]] == [1, 2] and result["runs"][2]["images"] == 10
    assert result["runs"][0]["trainable_parameters"] < result["runs"][1]["trainable_parameters"]
    assert out.with_suffix(".md").read_text().strip() == lora_sweep.render(json.loads(out.read_text())).strip()
    assert lora_sweep.main(argv)["runs"] == result["runs"]   # nothing trained again


# --- the committed results and the appendix page -----------------------------------------------------------

def test_committed_results_are_what_the_scripts_render(tmp_path):
    for name, module in SCRIPTS.items():
        js, md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
        assert md.exists(), f"{md} is missing: run the script (or its --placeholder) so the appendix builds"
        if js.exists():
            assert md.read_text().strip() == module.render(json.loads(js.read_text())).strip(), \
                f"{md.name} differs from what {name}.py renders from {js.name}: results must come from the script"
        else:
            assert "Not yet measured on this machine" in md.read_text()
    for name, module in SCRIPTS.items():  # other seeds or settings, and earlier runs kept for comparison
        for js in RESULTS.glob(f"{name}_*.json"):
            assert js.with_suffix(".md").read_text().strip() == module.render(json.loads(js.read_text())).strip(), js
    gpu_md = render_gpu.main(["--json", str(RESULTS / "gpu_h200_throughput.json"), "--out", str(tmp_path / "g.md")])
    assert gpu_md.read_text() == (RESULTS / "gpu_h200_throughput.md").read_text()
    speed = sorted(render_gpu.SPEED.rglob("*speed_*.json"))
    for f in speed:  # every launch-to-99% run is a row, with the seconds its JSON holds
        assert f"| {json.loads(f.read_text())['seconds_to_99']} |" in gpu_md.read_text(), f
    assert speed or render_gpu.NOT_MEASURED in gpu_md.read_text()


def test_appendix_page_includes_every_result():
    page = (REPO / "book" / "benchmarks.md").read_text()
    included = re.findall(r"```\{include\}\s+(\S+)", page)
    assert included, "the appendix page shows the results through {include}"
    for rel in included:
        assert (REPO / "book" / rel).resolve().is_file(), f"book/benchmarks.md includes a missing file {rel}"
    shown = {(REPO / "book" / rel).resolve().name for rel in included}
    assert {p.name for p in RESULTS.glob("*.md")} <= shown, "every result in benchmarks/results is on the page"
