"""Shared fixtures: a tiny synthetic study whose stores and reports live in a temporary folder."""

import logging
import socket
import subprocess
import uuid
import warnings

import optuna
import pytest

from pipeline.config import parse_study
from pipeline.study.run import run_study

logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

TINY = {
    "name": "tiny",
    "trials": 2,
    "dataset": {"source": "gmm", "n_train": 200, "n_test": 300, "seed": 0},
    "model": {"hidden": [8], "activation": "tanh"},
    "training": {"epochs": 3, "batch_size": 32, "seed": 0},
    "search": {"lr": {"low": 0.01, "high": 0.3, "log": True}, "momentum": {"choices": [0.0, 0.9]}},
    "bounds": {"fresh_sets": 200},
}


def with_changes(base, **changes):
    """A copy of a study document with ``section__key=value`` changes applied."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        table = raw
        for part in path:
            table = table.setdefault(part, {})
        table[key] = value
    return raw


def tiny_study(**changes):
    return parse_study(with_changes(TINY, **changes), "studies/tiny.toml")


class Workspace(dict):
    """``storage``, ``tracking_uri``, ``reports_root`` and ``root`` of a study's files, and a way to run
    a study in them."""

    def run(self, cfg, **overrides):
        """``run_study`` with this workspace's storage, tracking store and reports, no progress bars."""
        (self["root"] / "mlruns").mkdir(exist_ok=True)
        kw = {
            "storage": self["storage"],
            "tracking_uri": self["tracking_uri"],
            "reports_root": self["reports_root"],
            "progress": False,
        }
        return run_study(cfg, **{**kw, **overrides})


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Storage, tracking store and reports under tmp_path; the environment cannot redirect them."""
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Workspace(
        storage=str(tmp_path / "storage" / "study.journal"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
        reports_root=tmp_path / "reports",
        root=tmp_path,
    )


@pytest.fixture
def make_tmpfs(tmp_path):
    """``make_tmpfs(mb)``: a real tmpfs of that size under tmp_path, unmounted after the test.

    Mounting needs root (CI runs as root); elsewhere the test is skipped, with the reason.
    """
    mounts = []

    def make(mb: int):
        mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        mount.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(mount)], capture_output=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounts.append(mount)
        return mount

    yield make
    for mount in mounts:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def dead_port() -> int:
    """A local TCP port nothing listens on (bound by the OS, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listing(root) -> list[str]:
    """Every path under ``root``, relative and sorted: what a command wrote shows as a difference."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def read_only_mount():
    """``read_only_mount(path)``: an empty tmpfs mounted read-only at ``path`` (created), unmounted after.

    Root ignores file modes (CI runs as root), but not a read-only mount. Mounting needs root;
    elsewhere the test is skipped, with the reason.
    """
    mounts = []

    def make(path):
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {proc.stderr.decode().strip()}")
        mounts.append(path)
        return path

    yield make
    for path in reversed(mounts):
        subprocess.run(["umount", "-l", str(path)], check=False)
