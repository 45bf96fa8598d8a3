"""benchmarks/trust.py and benchmarks/provenance.py (chapter 14): their pieces, a micro run of each, resuming, and the
committed results being exactly what the scripts render."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))

import provenance  # noqa: E402
import trust  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_nearest_two_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (57, 28, 28), generator=g, dtype=torch.uint8)
    samples = torch.cat([train[:3], torch.randint(0, 256, (4, 28, 28), generator=g, dtype=torch.uint8)])
    d1, d2, idx = trust.nearest_two(samples, train, chunk=10)      # chunks smaller than the set: the merge is tested
    full = torch.cdist(samples.flatten(1).double() / 255, train.flatten(1).double() / 255,
                       compute_mode="donot_use_mm_for_euclid_dist")   # exact: the mm shortcut is off by ~1e-7
    best = full.sort(1)
    assert torch.allclose(d1, best.values[:, 0], atol=1e-9) and torch.allclose(d2, best.values[:, 1], atol=1e-9)
    assert torch.equal(idx, best.indices[:, 0])
    stats = trust.copy_stats(samples, train)
    assert stats["copy_fraction"] == pytest.approx(3 / 7)           # the three exact copies, and nothing else


def test_spikes_counts_jumps_not_noise():
    rng = np.random.default_rng(0)
    losses = list(0.1 + 0.01 * rng.standard_normal(300))
    assert trust.spikes(losses) == 0
    losses[200] = 1.0
    losses[250] = float("nan")
    assert trust.spikes(losses) == 2


def test_roc_of_separated_and_identical_sets():
    marked, clean = np.full(50, 1e-6), np.linspace(0.02, 1, 200)
    r = provenance.roc(marked, clean)
    assert r["auc"] == 1.0 and r["tpr_at_alpha"] == 1.0 and r["fpr_at_alpha"] == 0.0 and r["tpr_at_fpr_1pct"] == 1.0
    same = provenance.roc(clean, clean)
    assert same["auc"] == pytest.approx(0.5)


def test_trust_micro_run_writes_its_rendering_and_resumes(tmp_path, capsys):
    out = tmp_path / "trust.json"
    result = trust.main(["--preset", "smoke", "--out", str(out), "--threads", "1"])
    assert len(result["memorisation"]) + len(result["stability"]) == result["planned_runs"]
    saved = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().strip() == trust.render(saved).strip()
    assert "smoke check, not a result" in out.with_suffix(".md").read_text()
    grids = np.load(tmp_path / "trust_grids.npz")
    assert grids[f"mem-{trust.PRESETS['smoke']['mem_sizes'][0]}-samples"].dtype == np.uint8
    capsys.readouterr()
    again = trust.main(["--preset", "smoke", "--out", str(out), "--threads", "1"])
    assert f"resuming: {result['planned_runs']} runs already done" in capsys.readouterr().out
    assert again["stability"] == saved["stability"]                  # nothing was trained again


def test_provenance_micro_run_writes_its_rendering(tmp_path):
    out = tmp_path / "provenance.json"
    provenance.main(["--preset", "smoke", "--out", str(out), "--threads", "1"])
    saved = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().strip() == provenance.render(saved).strip()
    assert set(saved["attacks"]) == set(provenance.ATTACKS)
    assert len(saved["p_values"]["none"]["marked"]) == provenance.PRESETS["smoke"]["n"]


@pytest.mark.parametrize("module", [trust, provenance], ids=lambda m: m.__name__)
def test_committed_results_are_the_scripts_rendering(module):
    js = RESULTS / f"{module.__name__}.json"
    if not js.exists():
        pytest.skip(f"{js.name} not measured yet")
    assert js.with_suffix(".md").read_text().strip() == module.render(json.loads(js.read_text())).strip()
