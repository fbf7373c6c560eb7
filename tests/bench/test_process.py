"""Whole-process measurements (no timings asserted): the seed-style script, the children's peak RSS,
stage times read back from a real study, and the Markdown's sentences.

Oracles: the idx files read back with numpy (the seed script's test error), the pipeline's own
``load_split`` (its split sizes), a child allocating a known number of bytes (peak RSS), and the
numbers put into a result (the sentences' verdicts).
"""

import ast
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.bench import seed_script
from pipeline.bench.process import (
    PROBED,
    RSS_TARGETS,
    SEED_RESULT,
    TRIAL_KEY,
    format_process,
    format_stage_times,
    probed_breakdown,
    repo_env,
    run_child,
    seed_error,
    spread,
    study_argv,
    study_stage_times,
)
from pipeline.bench.run import BenchResult, format_report, write_reports
from pipeline.bench.threads import format_threads
from pipeline.config import DatasetConfig, load_study
from pipeline.data import load_split
from tests.bench.test_threads_bench import result_of, with_ratios
from tests.study.test_workers import FASHION, write_fashion, write_study


def read_idx(path: Path, images: bool) -> np.ndarray:
    offset = 16 if images else 8  # magic and sizes, 4 bytes each
    data = np.frombuffer(path.read_bytes()[offset:], dtype=np.uint8)
    return data.reshape(-1, 28 * 28) if images else data


def test_seed_script_prints_the_test_error_its_model_makes(tmp_path):
    write_fashion(tmp_path, per_class=(64, 32))
    root, classes = tmp_path / "data", (2, 8)  # Pullover, Bag: what write_fashion writes
    printed = []
    model, wrong, m = seed_script.train_and_test(str(root), epochs=2, classes=classes, log=printed.append)
    raw = root / "FashionMNIST" / "raw"
    labels = read_idx(raw / "t10k-labels-idx1-ubyte", images=False)
    keep = np.isin(labels, classes)
    x = (read_idx(raw / "t10k-images-idx3-ubyte", images=True)[keep].astype(np.float32) / 255 - 0.5) / 0.5
    with torch.no_grad():
        predicted = model(torch.from_numpy(x).view(-1, 1, 28, 28)).argmax(1).numpy()
    count = int((predicted != (labels[keep] == classes[1])).sum())
    assert (wrong, m) == (count, int(keep.sum()))
    assert len(printed) == 3 and printed[-1].startswith("test_error")  # two epochs, then the test
    assert seed_error("\n".join(printed)) == count / m


def test_seed_script_splits_to_the_pipelines_sizes(tmp_path):
    write_fashion(tmp_path, per_class=(64, 32))
    train, val, test = seed_script.load_data(str(tmp_path / "data"), classes=(2, 8))
    ds = DatasetConfig(
        source="fashion2", classes=("Pullover", "Bag"), root=str(tmp_path / "data"), download=False
    )
    assert {"train": len(train), "val": len(val), "test": len(test)} == load_split(ds).sizes
    assert not set(train.indices) & set(val.indices)


def test_seed_script_runs_as_a_module_and_uses_plain_torch_only(tmp_path):
    write_fashion(tmp_path)
    argv = [sys.executable, "-m", "pipeline.bench.seed_script", "--root", "data", "--epochs", "1"]
    child = run_child([*argv, "--classes", "2", "8"], tmp_path, repo_env()).check()
    assert SEED_RESULT.search(child.stdout)
    tree = ast.parse(Path(seed_script.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] == "pipeline"]


def test_peak_rss_is_the_childs_own(tmp_path):
    """A child allocating 200 MB reports at least that; an empty one stays small even though this
    process holds 300 MB more when it starts them (a plain fork would report this process's peak)."""
    ballast = np.ones(300_000_000 // 8)  # touched: resident in this process
    big = run_child([sys.executable, "-c", "import numpy as np; a = np.ones(200_000_000 // 8)"], tmp_path)
    small = run_child([sys.executable, "-c", "pass"], tmp_path)
    assert ballast.sum() > 0
    assert big.check().peak_rss_bytes >= 200_000_000
    assert small.check().peak_rss_bytes < 100_000_000
    failed = run_child([sys.executable, "-c", "raise SystemExit(3)"], tmp_path)
    assert failed.returncode == 3
    with pytest.raises(RuntimeError, match="exited with 3"):
        failed.check()


def test_every_probed_step_is_still_where_the_probe_looks():
    assert [f"{owner.__name__}.{name}" for owner, name, _ in PROBED if not hasattr(owner, name)] == []


@pytest.fixture(scope="module")
def tiny_fashion_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stage-times")
    write_fashion(folder)
    return write_study(folder, dataset=dict(FASHION)), folder / "data"


def test_stage_times_come_from_every_trial_of_a_real_study(tiny_fashion_study):
    path, data = tiny_fashion_study
    r = study_stage_times(path, trials=2, epochs=2, log=lambda _: None, data_root=data)
    assert (r["study"], r["complete"], r["trials"], r["epochs"]) == ("tiny", 2, 2, 2)
    assert r["stages"][TRIAL_KEY]["n"] == 2 and r["peak_rss_bytes"] > 50_000_000
    for key in ("time_train_s", "time_evaluate_s", "time_bounds_s", "time_report_s", "time_tracking_s"):
        assert 0 < r["stages"][key]["median"] < r["stages"][TRIAL_KEY]["max"]
    assert 0 < r["non_training_share"]["median"] < 1
    assert 0 < r["outside_trials_s"] < r["wall_s"]
    text = "\n".join(format_stage_times([r]))
    assert "### tiny: 2 trials x 2 epochs" in text and "No target is set" in text


def test_the_probe_clocks_every_step_of_a_study_run(tiny_fashion_study):
    path, data = tiny_fashion_study
    cfg = load_study(path)
    found = probed_breakdown(cfg, study_argv(sys.executable, path, 1, 1), data)
    assert found["not_probed"] == []
    steps = found["steps"]
    for step in ("imports", "data", "optuna store", "mlflow store", "study page", "trials (time_trial_s)"):
        assert steps[step] > 0, step
    assert sum(steps.values()) == pytest.approx(found["wall_s"])


def _process_result(ours: list[float], seed: list[float], rss: float = 1.0e9) -> dict:
    stages = {k: spread([0.1, 0.2, 0.3]) for k in ("time_train_s", TRIAL_KEY, "outside_trial_s")}
    side = {"argv": ["python", "x"], "peak_rss_bytes": spread([rss] * len(ours)), "test_error": [0.2]}
    return {
        "study": "fashion2",
        "trials": 1,
        "epochs": 5,
        "repeats": len(ours),
        "ours": side | {"wall_s": spread(ours)},
        "seed": side | {"wall_s": spread(seed), "peak_rss_bytes": spread([rss] * len(seed))},
        "speedup_paired": spread([s / o for s, o in zip(seed, ours, strict=True)]),
        "stages": stages,
        "load_average": {"start": (1.5, 1.0, 1.0), "end": (2.5, 1.0, 1.0)},
    }


def test_whole_process_verdict_follows_the_medians():
    fast = "\n".join(format_process(_process_result([10, 11, 14], [30, 33, 31])))
    assert f"{statistics.median([30, 33, 31]) / 11:.2f}x at the medians" in fast
    assert "faster than the seed-style script: met (2.82x)" in fast
    assert "1.50 at the start, 2.50 at the end" in fast
    slow = "\n".join(format_process(_process_result([10, 11, 14], [20, 21, 22])))
    assert "faster than the seed-style script: not met (1.91x)" in slow
    assert format_process({"skipped": "no data"})[-2] == "Skipped: no data"


def _stage_result(study: str, epochs: int, share: float, per_train: float, wall: float, rss: float) -> dict:
    stages = {k: spread([1.0, 2.0, 3.0]) for k in ("time_train_s", TRIAL_KEY)}
    return {
        "study": study,
        "study_file": f"studies/{study}.toml",
        "trials": 3,
        "epochs": epochs,
        "seeds": 1,
        "as_in_file": True,
        "complete": 3,
        "wall_s": wall,
        "outside_trials_s": 1.0,
        "peak_rss_bytes": rss,
        "stages": stages,
        "non_training_s": spread([0.5]),
        "non_training_share": spread([share]),
        "non_training_per_training": spread([per_train]),
    }


@pytest.mark.parametrize(
    ("study", "epochs", "share", "per_train", "wall", "needle"),
    [
        ("fashion2", 30, 0.08, 0.1, 100, "of the trial: met (8.0 % at the median)"),
        ("fashion2", 30, 0.12, 0.1, 100, "of the trial: not met (12.0 % at the median)"),
        ("fashion2", 5, 0.3, 0.45, 30, "at most 0.5x training: met (0.45x at the median)"),
        ("fashion2", 5, 0.4, 0.55, 30, "at most 0.5x training: not met (0.55x at the median)"),
        ("demo", 40, 0.9, 9.0, 59.0, "the demo within 60 s: met (59.0 s)"),
        ("demo", 40, 0.9, 9.0, 61.0, "the demo within 60 s: not met (61.0 s)"),
        ("fashion2", 12, 0.1, 0.1, 30, "No target is set for a run of this size."),
    ],
)
def test_stage_verdicts_follow_the_numbers(study, epochs, share, per_train, wall, needle):
    assert needle in "\n".join(
        format_stage_times([_stage_result(study, epochs, share, per_train, wall, 1e8)])
    )


@pytest.mark.parametrize("study", ["demo", "fashion2"])
def test_memory_verdict_flips_at_the_target(study):
    target = RSS_TARGETS[study]
    under = "\n".join(format_stage_times([_stage_result(study, 5, 0.1, 0.1, 10, target - 1e6)]))
    over = "\n".join(format_stage_times([_stage_result(study, 5, 0.1, 0.1, 10, target + 1e6)]))
    assert f"at most {target / 1e6:g} MB: met ({(target - 1e6) / 1e6:.0f} MB)" in under
    assert f"at most {target / 1e6:g} MB: not met ({(target + 1e6) / 1e6:.0f} MB)" in over


def test_whole_process_memory_is_held_to_the_fashion2_target():
    target = RSS_TARGETS["fashion2"]
    lines = format_stage_times([], _process_result([10], [30], rss=target + 1e6))
    assert "## Peak memory" in lines
    assert f"Target, whole process, 1 trial x 5 epochs at most {target / 1e6:g} MB: not met" in "\n".join(
        lines
    )
    assert not [line for line in lines if line.startswith("Target, seed-style")]  # no target for it


def test_bench_md_carries_the_thread_process_stage_and_memory_sections(tmp_path):
    """``format_report`` (what ``make bench`` prints and writes) holds every section it was given,
    in order, each as its own formatter renders it."""
    threads = result_of(with_ratios({"threads=1": (0.5, 0.5), "threads=free": (0.52, 0.51)}))
    process = _process_result([10, 11, 14], [20, 21, 22])
    stages = [_stage_result("fashion2", 30, 0.08, 0.1, 100.0, 9e8)]
    extras = {
        "machine": {"cpu": "x", "cores": 2, "threads": 2, "load_average_at_start": 0.1},
        "matmul": {"fp32_gflop_s": 160.0, "bf16_gflop_s": 300.0, "n": 2048},
        "thread_policy": threads,
        "process": process,
        "stage_times": stages,
    }
    md = format_report(BenchResult(rows=[], extras=extras))
    parts = ["\n".join(format_threads(threads)), "\n".join(format_process(process))]
    parts.append("\n".join(format_stage_times(stages, process)))
    positions = [md.find(part) for part in parts]
    assert -1 not in positions and positions == sorted(positions)
    assert "## Peak memory" in md and "Target, Fashion-2 at 30 epochs" in md
    (written,) = [p for p in write_reports(BenchResult(extras=extras), tmp_path) if p.name == "bench.md"]
    assert written.read_text() == md
