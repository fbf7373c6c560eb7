"""Several worker processes on one study: on the local journal file and on a real PostgreSQL.

Oracles: Optuna's storage (trial numbers, states, params), MLflow's store (one run per trial
attempt, statuses, experiments), and the workers' own logs (no lock errors, no passwords).
Each worker is a real ``python -m pipeline worker`` process, as ``make workers`` starts them.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipeline import cli
from pipeline.config import parse_study
from pipeline.storage import open_storage
from pipeline.study.workers import process_alive, worker_id
from tests.conftest import TINY, tiny_study, with_changes
from tests.postgres import find_bindir, postgres_server

PG_BINDIR = find_bindir()
LOCK_ERRORS = ("database is locked", "could not obtain lock", "deadlock")


@pytest.fixture(scope="module")
def postgres():
    """One throwaway server per module; each test makes its own database on it."""
    if PG_BINDIR is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    with postgres_server(PG_BINDIR) as server:
        yield server


# ----------------------------------------------------------------------------------------------
# Helpers shared with test_reliability.py

# A small Fashion-MNIST written by ``write_fashion``: trials take a fraction of a second, with none
# of the synthetic source's ground-truth measurements (which cost seconds per trial).
FASHION = {"source": "fashion2", "classes": ["Pullover", "Bag"], "root": "data", "download": False}


def write_fashion(folder: Path, per_class: tuple[int, int] = (16, 8)) -> None:
    """Pullover (2) vs Bag (8) in the real idx format under ``folder/data``; bags are darker on top."""
    rng = np.random.default_rng(0)
    raw = folder / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in zip(("train", "t10k"), per_class, strict=True):
        labels = np.repeat(np.array([2, 8], dtype=np.uint8), n)
        images = rng.integers(0, 256, (2 * n, 28, 28), dtype=np.uint8)
        images[labels == 8, :14] //= 4
        header = struct.pack(">IIII", 2051, 2 * n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 2 * n) + labels.tobytes())


def fast_study(**changes):
    """``tiny_study`` on the ``write_fashion`` data."""
    return tiny_study(dataset=dict(FASHION), **changes)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"


def write_study(folder: Path, **changes) -> Path:
    """tests/conftest.py's tiny study (same ``a__b`` changes as ``tiny_study``) as a TOML file."""
    raw = with_changes(TINY, **changes)
    parse_study(raw, "check")  # a typo in a test fails here, not in a subprocess
    lines = [f"{k} = {_toml_value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for section, table in raw.items():
        if isinstance(table, dict):
            lines += ["", f"[{section}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    path = folder / "study.toml"
    path.write_text("\n".join(lines) + "\n")
    if raw["dataset"].get("source") == "fashion2":
        write_fashion(folder)
    return path


def worker_env(folder: Path, storage: str, **extra: str) -> dict[str, str]:
    """The workers' environment: storage and tracking store under ``folder``, one torch thread each."""
    return {
        **os.environ,
        "OPTUNA_STORAGE": storage,
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "GIT_PYTHON_REFRESH": "quiet",
        **extra,
    }


def start_worker(
    folder: Path, env: dict[str, str], *args: str, log: str, sigint=signal.SIG_DFL
) -> subprocess.Popen:
    """``python -m pipeline worker study.toml ARGS`` in ``folder``, stdout and stderr to ``log``.

    The child starts with SIGINT set to ``sigint`` (default: its default action), whatever this
    process inherited: a test suite run as a background job of a non-interactive shell has SIGINT
    ignored, and its children would inherit that.
    """
    with open(folder / log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "worker", "study.toml", *args],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
        )


def load(spec: str, name: str = "tiny", storage=None) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage or open_storage(spec))
    except KeyError:
        return None


def wait_for(what: str, check: Callable[[], bool], procs=(), timeout: float = 240) -> None:
    """Poll ``check`` until true; fail at once if a worker exits first (with its log)."""
    deadline = time.monotonic() + timeout
    while not check():
        for proc, log in procs:
            if proc.poll() is not None:
                pytest.fail(f"worker exited ({proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def mid_trial(spec: str, storage=None) -> Callable[[], bool]:
    """True once some trial is RUNNING and has reported two epochs: the moment to kill its worker."""

    def check() -> bool:
        study = load(spec, storage=storage)
        return study is not None and any(
            t.state == TrialState.RUNNING and len(t.intermediate_values) >= 2
            for t in study.get_trials(deepcopy=False)
        )

    return check


def trial_runs(tracking_uri: str, name: str = "tiny"):
    """(trial runs, parent runs, runs in ``Default``) of the study's MLflow experiment."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    default = client.get_experiment_by_name("Default")
    in_default = client.search_runs([default.experiment_id]) if default is not None else []
    trials = [r for r in runs if r.data.tags.get("pipeline_role") == "trial"]
    parents = [r for r in runs if r.data.tags.get("pipeline_role") == "study"]
    return trials, parents, in_default


def run_workers(folder: Path, env: dict[str, str], n: int) -> list[str]:
    """Create the study once (``--create-only``, in this process), then ``n`` workers; their logs."""
    old = {k: os.environ.get(k) for k in ("OPTUNA_STORAGE", "MLFLOW_TRACKING_URI")}
    os.environ.update({k: env[k] for k in old})
    cwd = Path.cwd()
    try:
        os.chdir(folder)
        assert cli.main(["worker", "study.toml", "--create-only", "--index", "0"]) == 0
    finally:
        os.chdir(cwd)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    procs = [start_worker(folder, env, "--index", str(i), log=f"worker-{i}.log") for i in range(1, n + 1)]
    for proc in procs:
        proc.wait(timeout=600)
    logs = [(folder / f"worker-{i}.log").read_text() for i in range(1, n + 1)]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log
    return logs


def assert_exactly(study: optuna.Study, total: int) -> list[optuna.trial.FrozenTrial]:
    """``total`` finished trials numbered 0…total-1: none duplicated, lost, failed or left running."""
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(total))
    assert [t.state for t in trials if t.state not in (TrialState.COMPLETE, TrialState.PRUNED)] == []
    return trials


def assert_one_run_per_trial(tracking_uri: str, trials) -> None:
    runs, parents, in_default = trial_runs(tracking_uri)
    numbers = sorted(int(r.data.tags["optuna_trial"]) for r in runs)
    assert numbers == sorted(t.number for t in trials)  # one run per attempt, none twice
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.info.run_id for r in runs} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert in_default == []


# ----------------------------------------------------------------------------------------------


@pytest.mark.reliability
def test_four_local_workers_share_the_journal_without_lost_or_extra_trials(tmp_path):
    write_study(tmp_path, trials=5, dataset=dict(FASHION))
    spec = str(tmp_path / "storage" / "tiny.journal")
    env = worker_env(tmp_path, spec)
    logs = run_workers(tmp_path, env, 4)

    trials = assert_exactly(load(spec), 5)
    assert len({t.params["lr"] for t in trials}) == 5  # workers' samplers are seeded apart
    assert all(t.user_attrs["worker"].split(":")[1].isdigit() for t in trials)
    assert_one_run_per_trial(env["MLFLOW_TRACKING_URI"], trials)
    for log in logs:
        assert "Traceback" not in log
        assert not [e for e in LOCK_ERRORS if e in log.lower()]
    print(f"trials per worker pid: {_per_worker(trials)}")


@pytest.mark.reliability
def test_three_workers_on_postgresql_and_the_password_is_never_logged(tmp_path, postgres):
    url = postgres.create_database("workers")
    write_study(tmp_path, trials=4, dataset=dict(FASHION))
    env = worker_env(tmp_path, url)
    logs = run_workers(tmp_path, env, 3)

    trials = assert_exactly(load(url), 4)
    assert_one_run_per_trial(env["MLFLOW_TRACKING_URI"], trials)
    for log in logs:
        assert "Traceback" not in log
        assert postgres.password not in log
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    for run in runs:
        logged = [*run.data.params.values(), *run.data.tags.values()]
        assert not [v for v in logged if postgres.password in v]
    parent = next(r for r in runs if r.data.tags.get("pipeline_role") == "study")
    assert parent.data.tags["optuna_storage"] == url.replace(postgres.password, "***")
    print(f"trials per worker pid: {_per_worker(trials)}")


def _per_worker(trials) -> dict[str, int]:
    found: dict[str, int] = {}
    for t in trials:
        pid = t.user_attrs["worker"].split(":")[1]
        found[pid] = found.get(pid, 0) + 1
    return found


def test_a_grid_study_stops_when_its_points_are_done(workspace):
    """More trials asked than the grid has points: each point once, then stop (no repeats)."""
    cfg = tiny_study(
        trials=5, sampler__kind="grid", search__lr={"choices": [0.05, 0.2]}, search__momentum={"value": 0.0}
    )
    outcome = workspace.run(cfg)
    assert (outcome.n_complete, outcome.n_failed) == (2, 0)
    trials = assert_exactly(load(workspace["storage"]), 2)
    assert sorted(t.params["lr"] for t in trials) == [0.05, 0.2]


def test_a_worker_id_tells_live_dead_reused_and_foreign_processes_apart():
    """The journal sweep's oracle for "this trial's worker is gone": /proc (pid and start time)."""
    me = worker_id()
    assert process_alive(me) is True
    child = subprocess.Popen(["sleep", "30"])
    try:
        alive = worker_id(child.pid)
        assert process_alive(alive) is True
    finally:
        child.kill()
        child.wait()
    assert process_alive(alive) is False  # killed and reaped
    host, pid, ticks = me.rsplit(":", 2)
    assert process_alive(f"{host}:{pid}:{int(ticks) + 1}") is False  # same pid, another process
    assert process_alive(f"elsewhere.example:{pid}:{ticks}") is None  # another host: cannot tell


@pytest.mark.reliability
def test_ctrl_c_to_make_workers_leaves_no_worker_and_requeues_their_trials(tmp_path):
    """SIGINT to the process group of ``make workers`` (what Ctrl-C in a terminal sends)."""
    repo = Path(__file__).resolve().parents[2]
    for name in ("Makefile", "pyproject.toml", ".venv"):  # the project's Makefile, run in tmp_path
        (tmp_path / name).symlink_to(repo / name)
    spec = str(tmp_path / "storage" / "tiny.journal")
    write_study(tmp_path, trials=4, training__epochs=5000)
    env = worker_env(tmp_path, spec, PYTHONPATH=str(repo))
    make = subprocess.Popen(
        ["make", "workers", "STUDY=study.toml", "N=2"],
        cwd=tmp_path,
        env=env,
        stdout=open(tmp_path / "make.log", "w"),  # noqa: SIM115 - the child holds it
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    storage = open_storage(spec)

    def both_running() -> bool:
        study = load(spec, storage=storage)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if study else []
        return len(running) == 2 and all(len(t.intermediate_values) >= 2 for t in running)

    wait_for("two workers mid-trial", both_running, [(make, tmp_path / "make.log")])
    workers = [int(t.user_attrs["worker"].split(":")[1]) for t in load(spec, storage=storage).trials]
    os.killpg(make.pid, signal.SIGINT)
    make.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(process_alive(f"{worker_id(pid)}") for pid in workers):
        time.sleep(0.5)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists() and process_alive(worker_id(pid))]
    assert alive == [], (tmp_path / "make.log").read_text()
    trials = load(spec, storage=storage).trials
    assert sorted(t.state for t in trials[:2]) == [TrialState.FAIL, TrialState.FAIL]
    queued = [t for t in trials[2:] if t.state == TrialState.WAITING]
    assert sorted(t.params["lr"] for t in queued) == sorted(t.params["lr"] for t in trials[:2])
    assert all(t.user_attrs["reason"] in ("stopped by Ctrl-C", "stopped by SIGTERM") for t in trials[:2])
