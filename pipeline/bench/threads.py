"""Thread policies timed on a quiet machine and beside one competing CPU-bound process.

The bench builds the CIFAR-2-shaped workload once (``speed.cifar2_workload``, cut to the asked size)
and saves its tensors. Each measurement is a fresh interpreter (``OMP_WAIT_POLICY`` is read when
torch loads OpenMP): it applies the policy with ``pipeline.threads.apply_threads``, loads the
tensors, trains the report's MLP for one warm-up epoch and ``epochs`` timed ones with
``pipeline.train.train`` and reports seconds per timed epoch. The load is
one Python busy loop started by the bench for each loaded measurement; it ends itself at a deadline
(should the bench die) and is terminated in a ``finally``. Rounds interleave options and conditions,
so a change in other users' load hits all alike; the load average is recorded around every cell.

``python -m pipeline.bench.threads [--quick] [--repeats N]`` prints the Markdown section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.config import TrainingConfig
from pipeline.data import Split
from pipeline.model import build_mlp
from pipeline.threads import AUTO, ENV_VAR, apply_threads, cpu_cores, omp_environment, resolve_threads
from pipeline.train import Hyper, train

CONDITIONS = ("quiet", "loaded")
WITHIN = 1.10  # "within 10 % of the best": median at most this times the best median
CELL_TIMEOUT = 300  # seconds one measurement may take before the bench gives up on it
LOAD_GRACE = 10  # seconds the load outlives a cell's timeout, at most, if nobody terminates it
LOAD_SETTLE = 0.2  # seconds between starting the load and starting the measured process
WORKERS = 2  # the per-worker option: cores divided among this many worker processes
# the OpenMP / BLAS variables a measurement sets itself: inherited values are removed
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", ENV_VAR)

# one core's worth of CPU-bound work that stops by itself at its deadline
LOAD = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end: pass\n"
CHILD = "import sys\nfrom pipeline.bench.threads import measure\nmeasure(sys.argv[1])\n"


@dataclasses.dataclass(frozen=True)
class Option:
    name: str  # the table's label
    setting: int | str  # a [training] threads value, applied in the measured process
    env: dict[str, str]  # OpenMP variables set before the measured process starts


def options() -> list[Option]:
    """threads=1, every core as torch does by default, "cores" (every core, PASSIVE waiting), "free",
    and one thread share per worker (cores / ``WORKERS``) when that is neither 1 nor cores; each
    with the OpenMP variables ``omp_environment`` gives that setting."""
    cores = cpu_cores()

    def option(name: str, setting: int | str) -> Option:  # OpenMP's variables as the product sets them
        return Option(name, setting, omp_environment(setting, environ={}))

    found = [
        option("threads=1", 1),
        option(f"threads={cores} (every core, OpenMP's default waiting: torch's default)", cores),
        option(f"threads=cores ({cores}, OMP_WAIT_POLICY=PASSIVE)", "cores"),
        option(
            "threads=free (the cores idle at start" + ("; auto, the default)" if AUTO == "free" else ")"),
            "free",
        ),
    ]
    per_worker = resolve_threads("cores", workers=WORKERS, environ={})
    if per_worker not in (1, cores):
        found.append(option(f"threads={per_worker} (cores / {WORKERS} workers)", per_worker))
    return found


def measure(spec_json: str) -> None:
    """In the measured process (its OpenMP environment set at its start by the bench): train as
    ``spec`` says on the tensors saved at ``spec["data"]`` and print one JSON line of timings."""
    spec = json.loads(spec_json)
    threads = apply_threads(spec["setting"])
    t = torch.load(spec["data"], weights_only=True)
    split = Split(
        t["x_train"], t["y_train"], t["x_val"], t["y_val"], t["x_val"], t["y_val"],
        classes=("airplane", "bird"), source="cifar2", split_hash="bench",
    )  # fmt: skip
    model = build_mlp(split.input_dim, tuple(spec["hidden"]), "relu", 0)
    config = TrainingConfig(epochs=1 + spec["epochs"], batch_size=spec["batch"], seed=0)
    stamps = [time.perf_counter()]
    train(model, split, Hyper(**spec["hyper"]), config, on_epoch=lambda _: stamps.append(time.perf_counter()))
    timed = [b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=True)]  # the first is warm-up
    print(json.dumps({"threads": threads, "seconds_per_epoch": sum(timed) / len(timed)}))


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return {**env, **extra}


def _run_cell(option: Option, spec: dict[str, Any], loaded: bool, load_pids: list[int]) -> dict:
    """One measurement in a fresh process, beside a fresh load process when ``loaded``."""
    load = None
    try:
        if loaded:
            load = subprocess.Popen(
                [sys.executable, "-c", LOAD, str(CELL_TIMEOUT + LOAD_GRACE)], env=_child_env({})
            )
            load_pids.append(load.pid)
            time.sleep(LOAD_SETTLE)
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps({**spec, "setting": option.setting})],
            env=_child_env(option.env),
            capture_output=True,
            text=True,
            timeout=CELL_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0 or (loaded and load.poll() is not None):
            why = proc.stderr.strip()[-2000:] if proc.returncode else "the load process ended early"
            raise RuntimeError(f"thread bench: {option.name} ({'loaded' if loaded else 'quiet'}): {why}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if load is not None:
            load.terminate()
            try:
                load.wait(timeout=5)
            except subprocess.TimeoutExpired:
                load.kill()
                load.wait()


def thread_policy_table(
    *,
    quick: bool,
    repeats: int,
    log: Callable[[str], None] = print,
    n_train: int | None = None,
    epochs: int | None = None,
    batch: int = 256,
    root: Path = Path("data"),
) -> dict[str, Any]:
    """Seconds per epoch of each option in ``options()``, quiet and loaded, ``repeats`` rounds.

    Quick: 1000 training examples, 1 timed epoch; full: CIFAR-2's 8000, 2 timed epochs (each after
    one warm-up epoch). ``n_train`` / ``epochs`` override those sizes; validation is a quarter of
    the training size. Returns every timing, min / median / max per cell and each cell's ratio to
    the condition's best median.
    """
    from pipeline.bench.speed import HIDDEN, HYPER, cifar2_workload  # lazy: measured processes skip it

    n = n_train or (1000 if quick else 8000)
    n_val = max(1, n // 4)
    work = cifar2_workload(root)
    s = work.split
    # clones: a saved view would carry its whole storage (all 10000 images) along
    tensors = {
        "x_train": s.x_train[:n].clone(),
        "y_train": s.y_train[:n].clone(),
        "x_val": s.x_val[:n_val].clone(),
        "y_val": s.y_val[:n_val].clone(),
    }
    spec = {
        "epochs": epochs or (1 if quick else 2),
        "batch": batch,
        "hidden": list(HIDDEN),
        "hyper": dataclasses.asdict(HYPER),
    }
    with tempfile.TemporaryDirectory() as tmp:
        spec["data"] = str(Path(tmp) / "split.pt")
        torch.save(tensors, spec["data"])
        return _table(spec, repeats, log) | {
            "workload": {"name": work.name, "n_train": len(tensors["y_train"]), "n_val": n_val}
            | {k: v for k, v in spec.items() if k != "data"}
        }


def _table(spec: dict[str, Any], repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    opts = options()
    seconds = {o.name: {c: [] for c in CONDITIONS} for o in opts}
    threads = {o.name: {c: [] for c in CONDITIONS} for o in opts}
    load_avg, load_pids = [os.getloadavg()[0]], []
    started = time.monotonic()
    for r in range(repeats):
        for condition in CONDITIONS:
            for option in opts:
                out = _run_cell(option, spec, condition == "loaded", load_pids)
                load_avg.append(os.getloadavg()[0])
                seconds[option.name][condition].append(out["seconds_per_epoch"])
                threads[option.name][condition].append(out["threads"])
                log(
                    f"threads bench round {r + 1}/{repeats}, {condition}, {option.name}: "
                    f"{out['seconds_per_epoch']:.3f} s/epoch on {out['threads']} thread(s)"
                )
    cells = {o.name: {} for o in opts}
    best = {}
    for condition in CONDITIONS:
        medians = {o.name: statistics.median(seconds[o.name][condition]) for o in opts}
        best[condition] = min(medians, key=medians.get)
        for o in opts:
            s = seconds[o.name][condition]
            cells[o.name][condition] = {
                "seconds": s,
                "min": min(s),
                "median": medians[o.name],
                "max": max(s),
                "ratio": medians[o.name] / medians[best[condition]],
                "threads": threads[o.name][condition],
            }
    return {
        "options": [dataclasses.asdict(o) for o in opts],
        "conditions": list(CONDITIONS),
        "cells": cells,
        "best": best,
        "within_10pct_both": within_both(cells),
        "cores": cpu_cores(),
        "repeats": repeats,
        "load": "one Python busy loop (1 core) started by the bench beside each loaded measurement",
        "load_average_1min": {"start": load_avg[0], "min": min(load_avg), "max": max(load_avg)},
        "load_pids": load_pids,
        "seconds": time.monotonic() - started,
    }


def within_both(cells: dict[str, dict[str, dict]]) -> list[str]:
    """Options whose median is within 10 % of the best in every condition, best worst-case first."""
    worst = {name: max(c["ratio"] for c in by.values()) for name, by in cells.items()}
    return sorted((n for n, w in worst.items() if w <= WITHIN), key=worst.get)


def minimax(cells: dict[str, dict[str, dict]]) -> str:
    """The option whose worse ratio to the best (over conditions) is smallest."""
    return min(cells, key=lambda name: max(c["ratio"] for c in cells[name].values()))


def format_threads(result: dict[str, Any]) -> list[str]:
    """The section as Markdown lines: heading, conditions, the table and the verdict sentence."""
    work, la = result["workload"], result["load_average_1min"]
    lines = [
        "## Thread policy",
        "",
        f"Seconds per training epoch of the 3072-512-128-32-2 MLP on {work['name']} "
        f"({work['n_train']} train / {work['n_val']} validation, batch {work['batch']}, "
        f"{work['epochs']} timed epoch(s) after a warm-up), each cell a fresh process; "
        f"median [min–max] over {result['repeats']} round(s), and × the best median in that "
        f"condition. {result['cores']} cores; loaded = {result['load']}. 1-minute load average "
        f"during the run: {la['min']:.2f}–{la['max']:.2f} (other users' processes included).",
        "",
        "| option | threads (quiet / loaded) | quiet | loaded |",
        "|---|---|---|---|",
    ]
    for name, by in result["cells"].items():
        used = " / ".join(",".join(str(t) for t in sorted(set(by[c]["threads"]))) for c in CONDITIONS)
        shown = [
            f"{by[c]['median']:.3f} [{by[c]['min']:.3f}–{by[c]['max']:.3f}] ×{by[c]['ratio']:.2f}"
            for c in CONDITIONS
        ]
        lines.append(f"| {name} | {used} | {' | '.join(shown)} |")
    lines.append("")
    lines.append(verdict(result))
    return lines


def verdict(result: dict[str, Any]) -> str:
    """One sentence, from the numbers: the options within 10 % of the best in both conditions."""
    cells, good = result["cells"], result["within_10pct_both"]

    def ratios(name: str) -> str:
        return ", ".join(f"{c} ×{cells[name][c]['ratio']:.2f}" for c in CONDITIONS)

    if good:
        named = "; ".join(f"{name} ({ratios(name)})" for name in good)
        return f"Within 10 % of the best both quiet and loaded: {named}."
    name = minimax(cells)
    return (
        f"No option is within 10 % of the best in both conditions; "
        f"the smallest worst case is {name} ({ratios(name)})."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.threads", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1000 examples, 1 timed epoch")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over every option and condition")
    args = parser.parse_args(argv)
    result = thread_policy_table(
        quick=args.quick, repeats=args.repeats, log=lambda line: print(line, file=sys.stderr)
    )
    print("\n".join(format_threads(result)))


if __name__ == "__main__":
    main()
