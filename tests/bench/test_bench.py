"""The benchmark's bookkeeping (no timings asserted): FLOP counts, the seed-style loop's inputs, tables.

Oracles: FLOPs counted by hand and by torch's FlopCounterMode; torchvision's own transforms; the
files read back with the csv module.
"""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.utils.flop_counter import FlopCounterMode

from pipeline.bench.drift import format_drift, rate, simulate_reruns
from pipeline.bench.run import BenchResult, format_table, write_reports
from pipeline.bench.speed import EpochPermutation, SeedStyleDataset, _to_images, epoch_flops, mlp_macs
from pipeline.model import build_mlp
from pipeline.train import batch_order_seed


def test_macs_of_the_report_mlp():
    macs, first = mlp_macs((3072, 512, 128, 32, 2))
    assert first == 3072 * 512
    assert macs == 3072 * 512 + 512 * 128 + 128 * 32 + 32 * 2 == 1_642_560


def test_epoch_flops_match_torchs_flop_counter():
    """One training step (forward + backward) and one validation forward, counted by torch."""
    widths = (48, 32, 16, 2)
    model = build_mlp(widths[0], widths[1:-1], "relu", seed=0)
    x, y = torch.randn(10, widths[0]), torch.randint(0, 2, (10,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            model(x[:4])
    # torch counts matmul FLOPs only (2 per multiply-accumulate), as epoch_flops does
    assert counter.get_total_flops() == epoch_flops(widths, n_train=10, n_val=4)


def test_images_round_trip_through_torchvisions_transform():
    """uint8 images recovered from the split's floats give the same floats back via ToTensor + Normalize."""
    gen = torch.Generator().manual_seed(0)
    for shape in ((3, 8, 8), (1, 6, 6)):
        u = torch.randint(0, 256, (5, *shape), generator=gen, dtype=torch.uint8)
        x = u.reshape(5, -1).float().div_(255).sub_(0.5).div_(0.5)
        images = _to_images(x, shape)
        assert images.dtype == np.uint8 and images.shape[0] == 5
        dataset = SeedStyleDataset(images, torch.zeros(5, dtype=torch.long))
        for i in range(5):
            item, label = dataset[i]
            assert torch.equal(item.reshape(-1), x[i]) and label == 0


def test_seed_style_sampler_draws_the_order_train_draws():
    sampler = EpochPermutation(20, seed=3)
    order = torch.Generator().manual_seed(batch_order_seed(3))  # what train() draws from seed 3
    for _ in range(3):
        assert list(sampler) == torch.randperm(20, generator=order).tolist()


def _result():
    row = {
        "workload": "w",
        "loop": "(b) pipeline train()",
        "threads": 2,
        "epochs_x_repeats": "2x3",
        "s_per_epoch": 0.5,
        "s_per_epoch_min": 0.4,
        "s_per_epoch_max": 0.6,
        "s_per_30_epoch_trial": 15.0,
        "speedup_vs_seed": 2.5,
        "gflop_per_epoch": 60.0,
        "gflop_s": 120.0,
        "of_fp32_matmul": 0.75,
    }
    extras = {
        "machine": {"cpu": "x", "cores": 2, "threads": 2, "load_average_at_start": 0.1},
        "matmul": {"fp32_gflop_s": 160.0, "bf16_gflop_s": 300.0, "n": 2048},
    }
    return BenchResult(rows=[row], extras=extras, notes=["a note"])


def test_table_and_files(tmp_path):
    result = _result()
    table = format_table(result.rows)
    assert "| w | (b) pipeline train() | 2 | 0.500 | 0.400 | 0.600 | 15.0 | 2.50 | 120 | 75% |" in table
    paths = write_reports(result, tmp_path / "bench", {"git_commit": "abc"})
    assert sorted(p.name for p in paths) == ["bench.csv", "bench.json", "bench.md"]
    with (tmp_path / "bench" / "bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["of_fp32_matmul"]) == pytest.approx(0.75)
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["provenance"]["git_commit"] == "abc"
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert table in md and "160 GFLOP/s" in md and "- a note" in md
    assert not [p for p in (tmp_path / "bench").iterdir() if p.name.startswith(".")]  # no temp leftovers


# ----------------------------------------------------------------------------------------------
# The drift test's simulation (pipeline.bench.drift): bookkeeping on constructed pools


def test_simulated_reruns_count_false_alarms_and_power_on_a_constant_pool():
    """Every replicate alike: the test never flags unshifted draws and always flags a shift of
    +0.05 (the most extreme of 252 splits, p = 2/252 <= 0.01, but not <= 0.01/365); the old rule
    flags a shifted mean outside the range across seeds."""
    sim = simulate_reruns(
        np.full(30, 60), 300, seeds=5, alpha=0.01, draws=40, rng=np.random.default_rng(0), shifts=(0.05,)
    )
    null, shifted = sim["rows"]
    assert (null["shift"], shifted["shift"]) == (0.0, 0.05)
    assert null["test"]["k"] == 0 and shifted["test"]["k"] == 40 and shifted["bonferroni"]["k"] == 0
    assert null["old_any"]["k"] == 0 and shifted["old_range"]["k"] == 40
    assert sim["false_alarm_within_alpha"]
    ci = stats.binomtest(3, 40).proportion_ci(0.95, method="exact")
    assert rate([True] * 3 + [False] * 37) == pytest.approx(
        {"k": 3, "n": 40, "rate": 3 / 40, "low": ci.low, "high": ci.high}
    )
    with pytest.raises(ValueError, match="two disjoint groups of 5"):
        simulate_reruns(np.arange(9), 300, seeds=5, alpha=0.01, draws=1, rng=np.random.default_rng(0))
    extra = {
        "study": "s",
        "params": {"lr": 0.1},
        "m": 300,
        "pool_seeds": 30,
        "pool_diverged": 0,
        "pool_test_error": {"mean": 0.2, "sd": 0.0, "min": 0.2, "max": 0.2},
        "test": "the test",
        "pool_seconds": 1.0,
    }
    md = "\n".join(format_drift({**sim, **extra}))
    assert "## Drift test: false alarms and power" in md
    assert "| +0.00 | 0.00% [0.00%, 8.81%] |" in md and "| +0.05 | 100.00% [91.19%, 100.00%] |" in md


def test_simulated_false_alarm_rate_holds_alpha_on_a_skewed_pool():
    """Disjoint groups from one pool are exchangeable, so the exact test holds its level."""
    pool = np.random.default_rng(1).gamma(2.0, 8.0, 120).round().astype(int) + 200  # skewed, with ties
    sim = simulate_reruns(
        pool, 2000, seeds=5, alpha=0.05, draws=1500, rng=np.random.default_rng(2), shifts=()
    )
    assert sim["rows"][0]["test"]["low"] <= 0.05 and sim["false_alarm_within_alpha"]
