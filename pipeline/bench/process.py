"""Whole processes, timed from start to exit: ``pipeline study`` against the seed-style script, and
where a study's time goes, stage by stage, as its trials recorded it.

Every process runs in a fresh temporary workspace (its own ``storage/`` journal, ``mlruns/`` SQLite
tracking store and ``reports/``) with ``data/`` linked to one prepared dataset root, so the one-off
decompression of the idx files is paid before any clock starts (and measured on its own). Wall time
and peak RSS come from ``os.wait4``: the child's own resource usage, not this process's.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import re
import runpy
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline import tracking
from pipeline.config import StudyConfig, load_study
from pipeline.data import DataError, load_split
from pipeline.storage import open_storage
from pipeline.study import run as study_run
from pipeline.study import workers

REPO = Path(__file__).resolve().parents[2]  # the checkout whose pipeline the children run
FASHION_STUDY = REPO / "studies" / "fashion2.toml"
DEMO_STUDY = REPO / "studies" / "demo.toml"
STAGE_KEYS = ("time_train_s", "time_evaluate_s", "time_bounds_s", "time_report_s", "time_tracking_s")
TRIAL_KEY = "time_trial_s"

# The targets (the sentences below say which are met; nothing here is a result).
SPEEDUP_TARGET = 2.0  # whole process: the seed-style script's wall time / pipeline study's, at least
NON_TRAINING_SHARE_TARGET = 0.10  # Fashion-2, 30 epochs: (trial - train) / trial wall time, at most
NON_TRAINING_RATIO_TARGET = 0.5  # Fashion-2, 5 epochs: (trial - train) / train, at most
DEMO_WALL_TARGET = 60.0  # seconds for the demo study as its file sets it (make demo), at most
RSS_TARGETS = {"demo": 600e6, "fashion2": 1.2e9}  # peak RSS of a study's process in bytes, at most
MB = 1e6  # bytes: the targets are in decimal megabytes

# The steps of run_study the probe clocks: (module, attribute, step). Only calls made through these
# names are clocked.
PROBED = (
    (study_run, "preflight", "checks"),
    (tracking, "check_reachable", "checks"),
    (study_run, "load_split", "data"),
    (study_run, "open_study", "optuna store"),
    (study_run, "run_gradcheck", "gradcheck"),
    (tracking, "client", "mlflow store"),
    (tracking, "experiment_id", "mlflow store"),
    (tracking, "study_run", "mlflow store"),
    (tracking, "log_dataset", "mlflow store"),
    (tracking, "provenance", "provenance"),
    (workers, "optimize", "trials"),
    (study_run, "write_after_study", "study page"),
)
# Run by a bare interpreter (-I -S): spawn argv[2:], wait for it, write "spawned wall KiB exit" to argv[1].
LAUNCHER = (
    "import os, sys, time\n"
    "spawned, start = time.time(), time.perf_counter()\n"
    "pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "wall = time.perf_counter() - start\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    f.write(f'{spawned} {wall} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}')\n"
)
PROBE = "import time; began = time.time(); from pipeline.bench.process import probe_main; probe_main(began)"
IMPORTS = {  # what each kind of process imports before it can do anything
    "python": "pass",
    "pipeline.cli": "import pipeline.cli",
    "pipeline.study.run": "import pipeline.study.run",
    "torch, torchvision": "import torch, torchvision",
}
PROFILED = ("torch", "torchvision", "optuna", "mlflow", "sqlalchemy", "pandas", "scipy", "matplotlib")
SEED_RESULT = re.compile(r"test_error \S+ \((\d+) of (\d+) test images wrong\)")


@dataclass(frozen=True)
class Child:
    """One finished child process: its wall time, its own peak RSS and its output."""

    argv: tuple[str, ...]
    wall_s: float
    peak_rss_bytes: int
    returncode: int
    stdout: str
    stderr: str
    spawned: float  # time.time() just before it was spawned

    def check(self) -> Child:
        if self.returncode != 0:
            tail = "\n".join(self.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"{' '.join(self.argv)} exited with {self.returncode}:\n{tail}")
        return self


def run_child(argv: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> Child:
    """Run ``argv`` to its end through ``LAUNCHER``, whose ``os.wait4`` gives the child's own peak RSS.

    Forked straight from this process, the child would report this process's peak instead: Linux
    counts the pages resident at the fork and keeps the peak across ``exec``. The launcher is a bare
    interpreter (about 10 MB), below any Python child's own footprint.
    """
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        record, out, err = (Path(tmp) / name for name in ("record", "stdout", "stderr"))
        launch = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(record), *argv]
        with out.open("wb") as fout, err.open("wb") as ferr:
            proc = subprocess.Popen(
                launch, cwd=cwd, env=env, stdout=fout, stderr=ferr, start_new_session=True
            )
            try:
                proc.wait()
            except BaseException:  # the launcher and the child are this session's only processes
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        stdout, stderr = (f.read_text(errors="replace") for f in (out, err))
        if proc.returncode != 0 or not record.is_file():
            raise RuntimeError(f"could not launch {argv[0]} (exit {proc.returncode}):\n{stderr[-2000:]}")
        spawned, wall, kib, code = record.read_text().split()
    return Child(tuple(argv), float(wall), int(kib) * 1024, int(code), stdout, stderr, float(spawned))


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def load_average() -> tuple[float, ...]:
    return tuple(round(x, 2) for x in os.getloadavg())


def repo_env(**changes: str) -> dict[str, str]:
    """This environment with this checkout first on the path, and ``changes``."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **changes}


@contextlib.contextmanager
def workspace(data_root: Path) -> Iterator[Path]:
    """A fresh folder with its own stores and reports, ``data/`` linked to the prepared root."""
    with tempfile.TemporaryDirectory(prefix="bench-process-") as tmp:
        folder = Path(tmp)
        (folder / "data").symlink_to(data_root.resolve(), target_is_directory=True)
        for name in ("storage", "mlruns"):
            (folder / name).mkdir()
        yield folder


def study_env(folder: Path, cfg: StudyConfig) -> dict[str, str]:
    """The workspace's stores, where ``pipeline study`` run in it would put them by default."""
    return repo_env(
        OPTUNA_STORAGE=str(folder / "storage" / f"{cfg.name}.journal"),
        MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}",
    )


def prepare_data(cfg: StudyConfig, data_root: Path) -> None:
    """Make ``data_root`` hold the study's files in torchvision's layout (Fashion-MNIST: decompressed
    from Debian's copy when missing), outside every timed region."""
    if cfg.dataset.source != "gmm":
        load_split(dataclasses.replace(cfg.dataset, root=str(data_root), download=False))


def unpack_seconds(cfg: StudyConfig) -> dict[str, float]:
    """What a fresh checkout's first run pays once: ``load_split`` into an empty root (decompress +
    read) minus the same call on the root it just prepared (read only)."""
    with tempfile.TemporaryDirectory(prefix="bench-unpack-") as tmp:
        ds = dataclasses.replace(cfg.dataset, root=tmp, download=False)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            load_split(ds)
            times.append(time.perf_counter() - start)
    return {"first_load_s": times[0], "prepared_load_s": times[1], "unpack_s": times[0] - times[1]}


def trial_times(folder: Path, cfg: StudyConfig) -> list[dict[str, float]]:
    """Every complete trial's ``time_*`` seconds and test error: its ``metrics.json`` where it holds
    the key (train, evaluate, bounds), else the Optuna user attributes the trial logged after it."""
    storage = open_storage(str(folder / "storage" / f"{cfg.name}.journal"))
    found = []
    for trial in optuna.load_study(study_name=cfg.name, storage=storage).get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,)
    ):
        times = {k: float(v) for k, v in trial.user_attrs.items() if k.startswith("time_")}
        report = folder / "reports" / cfg.name / f"trial-{trial.number:04d}" / "metrics.json"
        if report.is_file():
            metrics = json.loads(report.read_text(encoding="utf-8"))
            times |= {k: float(v) for k, v in metrics.get("timings", {}).items()}
            times["test_error"] = float(metrics["test_error"])
        found.append(times)
    return found


def study_argv(python: str, path: Path, trials: int | None, epochs: int | None) -> list[str]:
    extra = [*(["--trials", str(trials)] if trials else []), *(["--epochs", str(epochs)] if epochs else [])]
    return [python, "-m", "pipeline", "study", str(Path(path).resolve()), *extra]


def import_seconds(repeats: int, python: str = sys.executable) -> dict[str, dict[str, float]]:
    """Fresh interpreters doing nothing but their imports, interleaved: min / median / max wall."""
    times: dict[str, list[float]] = {name: [] for name in IMPORTS}
    for _ in range(repeats):
        for name, code in IMPORTS.items():
            times[name].append(run_child([python, "-c", code], REPO, repo_env()).check().wall_s)
    return {name: spread(t) for name, t in times.items()}


def import_profile(module: str = "pipeline.study.run", python: str = sys.executable) -> dict[str, float]:
    """Seconds each heavy package adds to importing ``module`` (``-X importtime``'s cumulative column;
    a package two others need is charged to the first that imports it)."""
    child = run_child([python, "-X", "importtime", "-c", f"import {module}"], REPO, repo_env()).check()
    found = {}
    for line in child.stderr.splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[2].strip() in (*PROFILED, module):
            with contextlib.suppress(ValueError):
                found[parts[2].strip()] = int(parts[1]) / 1e6
    return found


def whole_process(
    repeats: int,
    epochs: int = 5,
    log: Callable[[str], None] = print,
    *,
    quick: bool = False,
    data_root: Path = Path("data"),
    python: str = sys.executable,
) -> dict[str, Any]:
    """``pipeline study studies/fashion2.toml --trials 1`` against the seed-style script, interleaved,
    each in a fresh workspace; then one run of ours with a clock on each step, and the imports alone.
    ``quick``: one repeat of one epoch."""
    if quick:
        repeats, epochs = 1, 1
    cfg = load_study(FASHION_STUDY)
    result: dict[str, Any] = {"study": cfg.name, "trials": 1, "epochs": epochs, "repeats": repeats}
    result["load_average"] = {"start": load_average()}
    try:
        prepare_data(cfg, data_root)
        result["data"] = unpack_seconds(cfg)
    except DataError as exc:
        return result | {"skipped": str(exc)}
    ours_argv = study_argv(python, FASHION_STUDY, 1, epochs)
    seed_argv = [python, "-m", "pipeline.bench.seed_script", "--root", "data", "--epochs", str(epochs)]
    runs: dict[str, list[Child]] = {"ours": [], "seed": []}
    stages: list[dict[str, float]] = []
    for r in range(repeats):
        for side, argv in (("ours", ours_argv), ("seed", seed_argv)):
            log(f"whole process {r + 1}/{repeats}: {side} ({epochs} epochs) ...")
            with workspace(data_root) as folder:
                child = run_child(argv, folder, study_env(folder, cfg)).check()
                if side == "ours":
                    (times,) = trial_times(folder, cfg)
                    stages.append(times | {"outside_trial_s": child.wall_s - times[TRIAL_KEY]})
            runs[side].append(child)
    for side, children in runs.items():
        result[side] = {
            "argv": shown(children[0].argv),
            "wall_s": spread([c.wall_s for c in children]),
            "peak_rss_bytes": spread([c.peak_rss_bytes for c in children]),
        }
    result["ours"]["test_error"] = [s["test_error"] for s in stages]
    result["seed"]["test_error"] = [seed_error(c.stdout) for c in runs["seed"]]
    result["speedup"] = result["seed"]["wall_s"]["median"] / result["ours"]["wall_s"]["median"]
    paired = zip(runs["seed"], runs["ours"], strict=True)
    result["speedup_paired"] = spread([s.wall_s / o.wall_s for s, o in paired])
    keys = (*STAGE_KEYS, TRIAL_KEY, "outside_trial_s")
    result["stages"] = {k: spread([s.get(k, 0.0) for s in stages]) for k in keys}
    log("whole process: one more run of ours with a clock on each step ...")
    result["breakdown"] = probed_breakdown(cfg, ours_argv, data_root)
    log("imports alone (fresh interpreters) ...")
    result["imports"] = import_seconds(1 if quick else 3, python)
    result["import_profile"] = import_profile(python=python)
    result["load_average"]["end"] = load_average()
    return result


def shown(argv: Sequence[str]) -> list[str]:
    """A command line as the report shows it: ``python``, paths inside this checkout relative to it."""
    inside = [Path(a).is_absolute() and Path(a).is_relative_to(REPO) for a in argv]
    return [
        "python",
        *(str(Path(a).relative_to(REPO)) if i else a for a, i in zip(argv[1:], inside[1:], strict=True)),
    ]


def seed_error(stdout: str) -> float:
    """The test error the seed-style script printed, from its count of wrong images."""
    found = SEED_RESULT.search(stdout)
    if found is None:
        raise RuntimeError(f"the seed-style script printed no test error:\n{stdout[-500:]}")
    return int(found[1]) / int(found[2])


def probe_main(began: float) -> None:
    """In a child (``PROBE``): ``python -m pipeline`` on ``sys.argv[2:]`` with a clock on each step
    of ``PROBED``, exclusive of the clocked steps it calls; the seconds go to ``sys.argv[1]`` at exit."""
    out, argv = sys.argv[1], sys.argv[2:]
    spent: dict[str, float] = {}
    inner: list[float] = []  # per open step, the seconds its clocked callees took

    def clock(fn: Callable[..., Any], step: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            inner.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total = time.perf_counter() - start
                spent[step] = spent.get(step, 0.0) + total - inner.pop()
                if inner:
                    inner[-1] += total

        return timed

    missing = [f"{owner.__name__}.{name}" for owner, name, _ in PROBED if not hasattr(owner, name)]
    for owner, name, step in PROBED:
        if hasattr(owner, name):
            setattr(owner, name, clock(getattr(owner, name), step))
    imported = time.time()

    def done() -> None:
        record = {"began": began, "imported": imported, "ended": time.time(), "spent": spent}
        Path(out).write_text(json.dumps(record | {"missing": missing}))

    atexit.register(done)
    sys.argv = ["pipeline", *argv]
    runpy.run_module("pipeline", run_name="__main__", alter_sys=True)


def probed_breakdown(cfg: StudyConfig, argv: list[str], data_root: Path) -> dict[str, Any]:
    """The study command once more under the probe: seconds per step, from process start to exit."""
    with workspace(data_root) as folder:
        out = folder / "probe.json"
        child = run_child([argv[0], "-c", PROBE, str(out), *argv[3:]], folder, study_env(folder, cfg))
        child.check()
        probe = json.loads(out.read_text())
        in_trials = sum(t[TRIAL_KEY] for t in trial_times(folder, cfg))
    spent = dict(probe["spent"])
    loop = spent.pop("trials", 0.0)
    steps = {
        "interpreter start": probe["began"] - child.spawned,
        "imports": probe["imported"] - probe["began"],
        **spent,
        "trials (time_trial_s)": in_trials,
        "between trials (sampler, storage)": loop - in_trials,
        "rest of the command": probe["ended"] - probe["imported"] - sum(spent.values()) - loop,
        "exit": child.spawned + child.wall_s - probe["ended"],
    }
    return {"wall_s": child.wall_s, "steps": steps, "not_probed": probe["missing"]}


def study_stage_times(
    study_path: Path,
    trials: int | None = None,
    epochs: int | None = None,
    log: Callable[[str], None] = print,
    *,
    quick: bool = False,
    data_root: Path = Path("data"),
    python: str = sys.executable,
) -> dict[str, Any]:
    """One study as ``pipeline study`` runs it, in a fresh workspace: its wall time and peak RSS, and
    every complete trial's stage times (min / median / max across trials). ``quick``: at most 2
    trials of 2 epochs."""
    cfg = load_study(study_path)
    if quick:
        trials, epochs = min(trials or cfg.trials, 2), min(epochs or cfg.training.epochs, 2)
    n_trials, n_epochs = trials or cfg.trials, epochs or cfg.training.epochs
    path = Path(study_path).resolve()
    result: dict[str, Any] = {
        "study": cfg.name,
        "study_file": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path.name),
        "trials": n_trials,
        "epochs": n_epochs,
        "seeds": cfg.training.seeds,
        "as_in_file": n_trials == cfg.trials and n_epochs == cfg.training.epochs,
        "load_average": {"start": load_average()},
    }
    try:
        prepare_data(cfg, data_root)
    except DataError as exc:
        return result | {"skipped": str(exc)}
    log(f"{cfg.name}: {n_trials} trials x {n_epochs} epochs in a fresh workspace ...")
    with workspace(data_root) as folder:
        child = run_child(study_argv(python, path, trials, epochs), folder, study_env(folder, cfg)).check()
        times = trial_times(folder, cfg)
    result["load_average"]["end"] = load_average()
    result |= {"wall_s": child.wall_s, "peak_rss_bytes": child.peak_rss_bytes, "complete": len(times)}
    if not times:
        return result
    keys = (*STAGE_KEYS, TRIAL_KEY)
    result["stages"] = {k: spread([t.get(k, 0.0) for t in times]) for k in keys}
    rest = [(t[TRIAL_KEY] - t["time_train_s"], t[TRIAL_KEY], t["time_train_s"]) for t in times]
    result["non_training_s"] = spread([n for n, _, _ in rest])
    result["non_training_share"] = spread([n / trial for n, trial, _ in rest])
    result["non_training_per_training"] = spread([n / train for n, _, train in rest])
    result["outside_trials_s"] = child.wall_s - sum(t[TRIAL_KEY] for t in times)
    return result


# ------------------------------------------------------------------------------------------------
# Markdown


def _mmm(s: dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    return " / ".join(f"{s[k] / scale:.{digits}f}" for k in ("min", "median", "max"))


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def _load(result: dict[str, Any]) -> str:
    la = result.get("load_average", {})
    told = ", ".join(f"{la[k][0]:.2f} at the {k}" for k in ("start", "end") if k in la) or "not recorded"
    return f"1-minute load average {told} (a shared machine: others' work is in these numbers)"


def format_process(result: dict[str, Any]) -> list[str]:
    """``## Whole process: pipeline study vs a seed-style script``, from ``whole_process``'s result."""
    lines = ["## Whole process: pipeline study vs a seed-style script", ""]
    if "skipped" in result:
        return [*lines, f"Skipped: {result['skipped']}", ""]
    ours, seed = result["ours"], result["seed"]
    lines += [
        f"{result['study']}, {result['trials']} trial x {result['epochs']} epochs; {result['repeats']} "
        "repeat(s), interleaved (ours, seed, ours, ...), each process in a fresh workspace (its own Optuna "
        "journal, MLflow SQLite store and reports); wall time from start to exit, and the process's own "
        f"peak RSS (os.wait4); {_load(result)}.",
        "",
        "| process | wall s (min / median / max) | peak RSS MB (min / median / max) | test_error |",
        "|---|---|---|---|",
    ]
    for name, side in (("pipeline study", ours), ("seed-style script", seed)):
        errors = ", ".join(f"{e:.4f}" for e in side["test_error"])
        argv, rss = " ".join(side["argv"]), _mmm(side["peak_rss_bytes"], MB, 0)
        lines.append(f"| {name}: `{argv}` | {_mmm(side['wall_s'])} | {rss} | {errors} |")
    wall, paired = ours["wall_s"]["median"], result["speedup_paired"]
    speedup = seed["wall_s"]["median"] / wall
    lines += [
        "",
        f"Speed-up, seed-style wall / pipeline study wall: {speedup:.2f}x at the medians "
        f"(per repeat {paired['min']:.2f}x to {paired['max']:.2f}x).",
        f"Target, the whole process at least {SPEEDUP_TARGET:g}x faster than the seed-style script: "
        f"{_met(speedup >= SPEEDUP_TARGET)} ({speedup:.2f}x).",
        "",
        "The pipeline study's wall time, part by part (min / median / max over the repeats; stage times "
        "as the trial logged them, in its metrics.json and, for the later stages, its Optuna record):",
        "",
        "| part | seconds | share of median wall |",
        "|---|---|---|",
    ]
    for key, s in result["stages"].items():
        label = "outside the trial (process wall - time_trial_s)" if key == "outside_trial_s" else f"`{key}`"
        lines.append(f"| {label} | {_mmm(s)} | {100 * s['median'] / wall:.1f} % |")
    return [*lines, *_breakdown_lines(result.get("breakdown")), *_import_lines(result), ""]


def _breakdown_lines(breakdown: dict[str, Any] | None) -> list[str]:
    if not breakdown:
        return []
    wall = breakdown["wall_s"]
    lines = [
        "",
        f"One more run of the same command with a clock on each step of the study run (wall {wall:.2f} s; "
        "each step exclusive of the clocked steps it calls):",
        "",
        "| step | seconds | share of wall |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {s:.2f} | {100 * s / wall:.1f} % |" for name, s in breakdown["steps"].items()]
    if breakdown.get("not_probed"):
        lines += ["", f"Not found to clock (in the rest): {', '.join(breakdown['not_probed'])}."]
    return lines


def _import_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    if result.get("imports"):
        lines += ["", "Imports alone, a fresh interpreter each:", "", "| python -c | seconds |", "|---|---|"]
        lines += [f"| `{IMPORTS[name]}` | {_mmm(s)} |" for name, s in result["imports"].items()]
    if result.get("import_profile"):
        parts = ", ".join(f"{name} {s:.2f} s" for name, s in result["import_profile"].items())
        lines += ["", f"`-X importtime` of `import pipeline.study.run` (first importer pays): {parts}."]
    if "unpack_s" in (data := result.get("data", {})):
        lines += [
            "",
            f"Data, outside the timed runs: a fresh checkout's first load decompresses the idx files "
            f"({data['first_load_s']:.2f} s, of which unpacking {data['unpack_s']:.2f} s); a prepared "
            f"root loads in {data['prepared_load_s']:.2f} s.",
        ]
    return lines


def format_stage_times(results: Sequence[dict[str, Any]], process: dict[str, Any] | None = None) -> list[str]:
    """``## Where a trial's time goes`` and ``## Peak memory``, from ``study_stage_times`` results
    (and the whole-process result's peak RSS, when given)."""
    lines = ["## Where a trial's time goes", ""] if results else []
    for r in results:
        lines += [f"### {r['study']}: {r['trials']} trials x {r['epochs']} epochs", ""]
        if "skipped" in r:
            lines += [f"Skipped: {r['skipped']}", ""]
            continue
        lines += [
            f"`pipeline study {r['study_file']}`, {r['complete']} complete trials, {r['seeds']} training "
            f"seed(s) each; wall {r['wall_s']:.1f} s from start to exit, of which "
            f"{r.get('outside_trials_s', r['wall_s']):.1f} s outside the trials; {_load(r)}.",
            "",
        ]
        if "stages" not in r:
            lines += ["No complete trial recorded its stage times.", ""]
            continue
        lines += ["| stage | seconds (min / median / max) | share of median trial |", "|---|---|---|"]
        trial = r["stages"][TRIAL_KEY]["median"]
        for key, s in r["stages"].items():
            lines.append(f"| `{key}` | {_mmm(s)} | {100 * s['median'] / trial:.1f} % |")
        lines += [
            "",
            f"Non-training (trial - train): {_mmm(r['non_training_s'])} s; share of the trial "
            f"{_mmm(r['non_training_share'], 0.01, 1)} %; per second of training "
            f"{_mmm(r['non_training_per_training'])}.",
            *_stage_targets(r),
            "",
        ]
    return [*lines, *_memory_lines(results, process)]


def _stage_targets(r: dict[str, Any]) -> list[str]:
    share, ratio = r["non_training_share"]["median"], r["non_training_per_training"]["median"]
    if r["study"] == "fashion2" and r["epochs"] == 30:
        return [
            f"Target, Fashion-2 at 30 epochs, non-training at most {100 * NON_TRAINING_SHARE_TARGET:g} % "
            f"of the trial: {_met(share <= NON_TRAINING_SHARE_TARGET)} ({100 * share:.1f} % at the median)."
        ]
    if r["study"] == "fashion2" and r["epochs"] == 5:
        return [
            f"Target, Fashion-2 at 5 epochs, non-training at most {NON_TRAINING_RATIO_TARGET:g}x training: "
            f"{_met(ratio <= NON_TRAINING_RATIO_TARGET)} ({ratio:.2f}x at the median)."
        ]
    if r["study"] == "demo" and r["as_in_file"]:
        ok = r["wall_s"] <= DEMO_WALL_TARGET
        return [f"Target, the demo within {DEMO_WALL_TARGET:g} s: {_met(ok)} ({r['wall_s']:.1f} s)."]
    return ["No target is set for a run of this size."]


def _memory_lines(results: Sequence[dict[str, Any]], process: dict[str, Any] | None) -> list[str]:
    rows = [
        (f"`pipeline study {r['study_file']}`, {r['trials']} trials x {r['epochs']} epochs", r["study"], r)
        for r in results
        if "peak_rss_bytes" in r
    ]
    if process and "ours" in process:
        epochs = process["epochs"]
        rows.append((f"whole process, 1 trial x {epochs} epochs", process["study"], process["ours"]))
        rows.append((f"seed-style script, {epochs} epochs", None, process["seed"]))
    if not rows:
        return []
    lines = [
        "## Peak memory",
        "",
        "Each process's own peak resident set (os.wait4's ru_maxrss; the largest repeat where there were "
        "several; MB = 10^6 bytes, MiB = 2^20 bytes).",
        "",
        "| process | peak RSS MB | MiB |",
        "|---|---|---|",
    ]
    verdicts = []
    for label, study, r in rows:
        rss, target = r["peak_rss_bytes"], RSS_TARGETS.get(study)
        rss = rss["max"] if isinstance(rss, dict) else rss
        lines.append(f"| {label} | {rss / MB:.0f} | {rss / 2**20:.0f} |")
        if target:
            verdicts.append(
                f"Target, {label} at most {target / MB:g} MB: {_met(rss <= target)} ({rss / MB:.0f} MB)."
            )
    return [*lines, "", *verdicts, ""]
