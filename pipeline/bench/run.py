"""``pipeline bench``: every measurement in one process, the table, and ``reports/bench/``."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import platform
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import files
from pipeline.bench.drift import drift_false_alarms, format_drift
from pipeline.bench.process import (
    DEMO_STUDY,
    FASHION_STUDY,
    format_process,
    format_stage_times,
    study_stage_times,
    whole_process,
)
from pipeline.bench.speed import (
    HIDDEN,
    TRIAL_EPOCHS,
    bf16_accuracy,
    cifar2_workload,
    fashion2_workload,
    matmul_rate,
    speed_rows,
    with_threads,
)
from pipeline.bench.studies import (
    capacity_config,
    capacity_members,
    lr_search_members,
    overhead_study,
    population_speed,
    pruning_saving,
    replicate_cost,
    startup_seconds,
)
from pipeline.bench.threads import format_threads, thread_policy_table


@dataclass
class BenchResult:
    rows: list[dict[str, Any]] = field(default_factory=list)  # the speed table
    extras: dict[str, Any] = field(default_factory=dict)  # matmul, study overhead, bf16, population
    notes: list[str] = field(default_factory=list)


def run_bench(
    *,
    quick: bool = False,
    threads: int | None = None,
    repeats: int | None = None,
    epochs: int | None = None,
    data_root: Path = Path("data"),
    pruning: bool = False,
    log: Callable[[str], None] = print,
) -> BenchResult:
    """Every measurement, in this process, with ``threads`` intra-op threads (default: torch's)."""
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    repeats = repeats or (1 if quick else 3)
    epochs = epochs or (1 if quick else 2)
    result = BenchResult()
    result.extras["machine"] = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "load_average_at_start": os.getloadavg()[0],
    }
    log(f"fp32 and bf16 matmul rates ({threads} threads{', and 1' if threads > 1 else ''}) ...")
    budget = 0.5 if quick else 2.0  # seconds per rate
    rates = {threads: matmul_rate(torch.float32, seconds=budget)}
    if threads > 1 and not quick:
        rates[1] = with_threads(1, lambda: matmul_rate(torch.float32, seconds=budget))()
    bf16_rate = matmul_rate(torch.bfloat16, seconds=budget)
    result.extras["matmul"] = {
        "fp32_gflop_s": rates[threads],
        "fp32_gflop_s_1_thread": rates.get(1),
        "bf16_gflop_s": bf16_rate,
        "n": 2048,
    }
    workloads = [cifar2_workload(data_root)]
    fashion = fashion2_workload(data_root)
    if fashion is None:
        result.notes.append("Fashion-2 skipped: not readable offline (apt-get install dataset-fashion-mnist)")
    else:
        workloads.append(fashion)
    for work in workloads:
        log(f"{work.name}: seed-style loop, train(), bf16 ({repeats} x {epochs} epochs each) ...")
        rows, notes = speed_rows(work, rates, epochs, repeats, threads)
        result.rows += rows
        result.notes += notes
    if fashion is not None:
        log("bf16 accuracy cost on Fashion-2 ...")
        result.extras["bf16_accuracy"] = bf16_accuracy(
            fashion, epochs=2 if quick else TRIAL_EPOCHS, seeds=(0,) if quick else (0, 1, 2)
        )
        log("5 seed replicates vs one training run on Fashion-2 ...")
        result.extras["replicates"] = replicate_cost(
            fashion.split, HIDDEN, k=5, epochs=1 if quick else epochs, repeats=1 if quick else repeats
        )
    log("population training on the 2-D capacity study ...")
    capacity = capacity_config()
    for key, members in (("population", capacity_members(capacity)), ("population_lr", lr_search_members())):
        result.extras[key] = population_speed(
            capacity, members, epochs=100 if quick else None, repeats=1 if quick else 3
        )
    log("start-up of each command (fresh interpreters) ...")
    result.extras["startup"] = startup_seconds(repeats=1 if quick else 3)
    log("study overhead (Optuna + MLflow + reports vs bare training) ...")
    result.extras["study_overhead"] = overhead_study(fashion is not None, quick)
    if pruning:
        trials, epochs_ = (6, 3) if quick else (40, TRIAL_EPOCHS)
        log(f"pruning's saving: {trials} trials x {epochs_} epochs without and with the median pruner ...")
        with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
            result.extras["pruning"] = pruning_saving(trials, epochs_, fashion is not None, Path(tmp))
    log("thread policy: each option quiet and beside one competing CPU-bound process ...")
    result.extras["thread_policy"] = thread_policy_table(
        quick=quick, repeats=repeats, log=log, root=data_root
    )
    log("whole process: pipeline study against the seed-style script ...")
    result.extras["process"] = whole_process(repeats, log=log, quick=quick, data_root=data_root)
    sizes = [(DEMO_STUDY, None, None), (FASHION_STUDY, 3, 5), (FASHION_STUDY, 3, TRIAL_EPOCHS)]
    result.extras["stage_times"] = [
        study_stage_times(path, trials, epochs_, log, quick=quick, data_root=data_root)
        for path, trials, epochs_ in (sizes[:2] if quick else sizes)
    ]
    pool, draws = (24, 200) if quick else (200, 5000)
    log(f"drift test on the demo's selection: {pool} replicates, {draws} simulated reruns ...")
    result.extras["drift"] = drift_false_alarms(pool_seeds=pool, draws=draws, log=log)
    result.extras["machine"]["load_average_at_end"] = os.getloadavg()[0]
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


COLUMNS = (
    ("workload", "workload", "{}"),
    ("loop", "loop", "{}"),
    ("threads", "threads", "{}"),
    ("s_per_epoch", "s / epoch (median)", "{:.3f}"),
    ("s_per_epoch_min", "min", "{:.3f}"),
    ("s_per_epoch_max", "max", "{:.3f}"),
    ("s_per_30_epoch_trial", "s / 30-epoch trial", "{:.1f}"),
    ("speedup_vs_seed", "(a) / this", "{:.2f}"),
    ("gflop_s", "GFLOP/s", "{:.0f}"),
    ("of_fp32_matmul", "of fp32 matmul", "{:.0%}"),
)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The speed table as GitHub Markdown."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def format_report(result: BenchResult) -> str:
    """bench.md: the speed table, then matmul rates, population, study overhead, bf16 accuracy."""
    x = result.extras
    m = x["machine"]
    out = [
        "# Training speed",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['threads']} torch threads; load average "
        f"{m['load_average_at_start']:.2f} at start, {m.get('load_average_at_end', math.nan):.2f} at end.",
        f"Matmul ({x['matmul']['n']}^3), the ceiling: fp32 {x['matmul']['fp32_gflop_s']:.0f} GFLOP/s"
        + (
            f" ({x['matmul']['fp32_gflop_s_1_thread']:.0f} on 1 thread)"
            if x["matmul"].get("fp32_gflop_s_1_thread")
            else ""
        )
        + f", bf16 {x['matmul']['bf16_gflop_s']:.0f} GFLOP/s.",
        "",
        format_table(result.rows),
        "",
        "FLOPs per epoch: per training example 2*MACs (forward) + 2*MACs (weight gradients) + "
        "2*(MACs - first layer's MACs) (input gradients); per validation example 2*MACs.",
        "",
    ]
    out += [f"- {note}" for note in result.notes]
    titles = {
        "population": "the capacity study's 8 trials (widths 5-500, tanh and ReLU)",
        "population_lr": "an lr search at one small width (8 rates, 10 tanh units)",
    }
    if any(key in x for key in titles):
        out += ["", "## Population training (2-D data, 200 points, full batch)", ""]
    for key, title in titles.items():
        if key not in x:
            continue
        p = x[key]
        out.append(
            f"- {title}, {p['epochs']} epochs, training only (median of {p['repeats']}): one by one "
            f"{p['one_by_one_s']:.2f} s, as one population {p['population_s']:.2f} s: "
            f"**{p['factor']:.2f}x**. Groups: {'; '.join(', '.join(g) for g in p['groups'])}. "
            f"Largest difference in final val_acc from the one-by-one runs: "
            f"{p['max_val_acc_difference']:.3g}."
        )
    if "replicates" in x:
        r = x["replicates"]

        def spread(t):
            return f"{t['min']:.2f} / {t['median']:.2f} / {t['max']:.2f} s"

        out += [
            "",
            f"## Seed replicates: {r['k']} seeds against one training run (Fashion-2)",
            "",
            f"MLP {r['hidden']}, {r['epochs']} epochs, training only, min / median / max of "
            f"{r['repeats']}: one seed {spread(r['one_s'])}; {r['k']} seeds as one lockstep set (how "
            f"`seeds = {r['k']}` trains) {spread(r['stacked_s'])}: **{r['stacked_vs_one']:.2f}x** one run; "
            f"{r['k']} seeds one after another {spread(r['sequential_s'])}: {r['sequential_vs_one']:.2f}x.",
        ]
    if "study_overhead" in x:
        s = x["study_overhead"]
        out += [
            "",
            "## Study overhead",
            "",
            f"Study {s['study']!r} resumed for {s['trials']} trials x {s['epochs']} epochs: "
            f"{s['wall_s']:.1f} s wall (Optuna journal, MLflow on SQLite, trial reports, study page), "
            f"of which train() {s['train_in_study_s']:.1f} s: **{s['overhead_pct']:.0f} %** overhead, "
            f"{s['overhead_s_per_trial']:.2f} s per trial. The same trials trained again bare (best of "
            f"2): {s['bare_training_s']:.1f} s ({s['overhead_vs_bare_pct']:.0f} % overhead against that). "
            f"The study's first call (1 trial; MLflow creates its store) took {s['first_call_s']:.1f} s.",
        ]
    if "startup" in x:
        out += ["", "## Start-up (s, fresh interpreter; min / median / max)", ""]
        out += [
            f"- {name}: {t['min']:.2f} / {t['median']:.2f} / {t['max']:.2f}"
            for name, t in x["startup"].items()
        ]
    if "pruning" in x:
        p = x["pruning"]
        out += ["", "## Pruning's saving", ""]
        for kind in ("none", "median"):
            r = p[kind]
            out.append(
                f"- pruner {kind}: {p['trials']} trials x {p['epochs']} epochs, "
                f"{r['fraction_of_full_training']:.0%} of full training's epochs ({r['pruned']} pruned), "
                f"best val_acc {r['best_val_acc']:.4f}, {r['wall_s']:.0f} s"
            )
    if "bf16_accuracy" in x:
        b = x["bf16_accuracy"]
        full, bf16 = b["full"]["test_acc"], b["bf16"]["test_acc"]
        out += [
            "",
            "## bf16 autocast: accuracy cost on Fashion-2",
            "",
            f"{b['epochs']} epochs, seeds {b['seeds']}: test accuracy full {_mean_sd(full)}, "
            f"bf16 {_mean_sd(bf16)}; bf16 - full per seed: "
            f"{', '.join(f'{d:+.4f}' for d in b['test_acc_bf16_minus_full'])}.",
        ]
    if "thread_policy" in x:
        out += ["", *format_threads(x["thread_policy"])]
    if "process" in x:
        out += ["", *format_process(x["process"])]
    if "stage_times" in x:
        out += ["", *format_stage_times(x["stage_times"], x.get("process"))]
    if "drift" in x:
        out += format_drift(x["drift"])
    return "\n".join(out) + "\n"


def _mean_sd(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} (n = {len(values)})"


def write_reports(result: BenchResult, folder: Path, provenance: dict[str, str] | None = None) -> list[Path]:
    """bench.csv (the speed table), bench.md and bench.json, each written to a temp name and renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(result.rows[0]) if result.rows else ["workload"])
    writer.writeheader()
    writer.writerows(result.rows)
    blobs = {
        "bench.csv": buffer.getvalue(),
        "bench.md": format_report(result),
        "bench.json": json.dumps(
            {**dataclasses.asdict(result), "provenance": provenance or {}}, indent=2, default=str
        ),
    }
    paths = []
    for name, text in blobs.items():
        paths.append(files.write_text(folder / name, text))
    return paths
