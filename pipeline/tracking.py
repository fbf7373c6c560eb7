"""MLflow edge: one experiment per study, one parent run per study, one nested run per trial.

Everything goes through an explicit ``MlflowClient`` and run ids (no global active run), so a
worker process never confuses its runs with another's. Metrics are buffered and written with
``log_batch`` at most every few seconds: one call per epoch costs ~6 ms on SQLite, which is most
of a small trial's time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import platform
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy
import optuna
import requests
import sklearn
import sqlalchemy
import torch
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from sqlalchemy.engine import make_url

import pipeline
from pipeline import device as devices
from pipeline.errors import UsageError
from pipeline.urls import redact

# a new store's "Creating initial MLflow database tables" lines say nothing a user acts on
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)

DEFAULT_TRACKING_DIR = Path("mlruns")
STUDY_ROLE = "study"
TRIAL_ROLE = "trial"


def tracking_uri(explicit: str | None = None) -> str:
    """``explicit``, else $MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns (created on first use)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(DEFAULT_TRACKING_DIR / 'mlflow.db').resolve()}"


def client(uri: str | None = None) -> MlflowClient:
    """A client on the store; a SQLite store is created (or migrated) under a file lock.

    Two processes creating a fresh SQLite store at once race in MLflow's table creation
    (``duplicate column name: step``): the lock makes the second wait for the first.
    """
    uri = tracking_uri(uri)
    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db.with_name(f"{db.name}.create.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return MlflowClient(uri)  # constructing it creates (or migrates) the tables
    finally:
        os.close(fd)


def store_error(exc: BaseException) -> str | None:
    """One line describing ``exc`` when it is a store failing (full, gone, refusing): the MLflow
    tracking store or Optuna's database storage, told apart by the code that raised it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (MlflowException, sqlalchemy.exc.SQLAlchemyError, requests.RequestException)):
            text = str(getattr(exc, "orig", None) or exc).strip().split("\n")[0]
            return f"the {_store_of(exc)} failed: {type(exc).__name__}: {text[:300]}"
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _store_of(exc: BaseException) -> str:
    """Which store raised ``exc``: the outermost optuna or mlflow frame of its traceback."""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        if name.startswith("optuna."):
            return "Optuna storage"
        if name.startswith("mlflow."):
            return "MLflow tracking store"
        tb = tb.tb_next
    return "MLflow tracking store" if isinstance(exc, MlflowException) else "store"


class TrackingUnreachable(UsageError):
    """The MLflow tracking store does not answer; nothing was run."""


REACH_TIMEOUT = 5  # seconds for the pre-study check that the tracking store answers


def check_reachable(uri: str) -> None:
    """A cheap call with a short timeout to a tracking server or database, before anything is written.

    A SQLite store is local (its folder is checked for writing instead). A plain path or ``file:``
    URI names MLflow's file store, which MLflow 3 refuses to open: said before anything is written.
    """
    shown = redact(uri)
    fix = "start it or fix --tracking-uri / $MLFLOW_TRACKING_URI; nothing was run"
    if "://" not in uri or uri.startswith("file:"):
        raise TrackingUnreachable(
            f"MLflow tracking URI {shown} names a file store, which MLflow 3 no longer opens; "
            "give a database such as sqlite:///mlruns/mlflow.db (the default) or a server's "
            "http:// URL via --tracking-uri / $MLFLOW_TRACKING_URI; nothing was run"
        )
    if uri.startswith(("http://", "https://")):
        try:
            health = f"{uri.rstrip('/')}/health"  # http(s) only: checked above
            with urllib.request.urlopen(health, timeout=REACH_TIMEOUT) as answer:  # noqa: S310
                answer.read(64)
        except (OSError, ValueError) as exc:  # URLError, timeouts and refused connections are OSErrors
            reason = getattr(exc, "reason", exc)
            raise TrackingUnreachable(
                f"MLflow tracking server {shown} does not answer ({reason}); {fix}"
            ) from None
    elif "://" in uri and not uri.startswith(("sqlite", "file:", "databricks")):
        connect_args = {"connect_timeout": REACH_TIMEOUT} if uri.startswith("postgresql") else {}
        try:
            engine = sqlalchemy.create_engine(
                uri, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool
            )
            with engine.connect():
                pass
            engine.dispose()
        except Exception as exc:  # a driver error: its first line, without the password
            first = (
                str(getattr(exc, "orig", exc)).split("\n")[0].replace(make_url(uri).password or "\0", "***")
            )
            raise TrackingUnreachable(
                f"MLflow tracking database {shown} is unreachable ({first}); {fix}"
            ) from None


PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def download_artifact(
    mlflow: MlflowClient, run_id: str, name: str, into: str | os.PathLike[str]
) -> Path | None:
    """The run's artifact ``name`` downloaded into ``into`` (no progress bar), or None if the run
    or the artifact is gone."""
    before = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "false"  # small files: no bar on the terminal or in a log
    try:
        return Path(mlflow.download_artifacts(run_id, name, str(into)))
    except Exception:  # MLflow raises its own or an OSError for a missing artifact or run
        return None
    finally:
        if before is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = before


def artifact_location(uri: str, name: str) -> str | None:
    """For a SQLite store, artifacts go beside the database (MLflow's default is ./mlruns of the cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / name).resolve().as_uri()
    return None  # a tracking server decides


EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's UI opens such an experiment on its runs table


def experiment_id(mlflow: MlflowClient, name: str, description: str = "") -> str:
    """The experiment named after the study, created on first use (never ``Default``).

    Tagged so that MLflow 3's UI opens it on the runs table (not the GenAI overview), with the
    study file's ``description`` as the experiment's description.
    """
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            mlflow.restore_experiment(found.experiment_id)
        exp_id = found.experiment_id
        tags = found.tags
    else:
        try:
            exp_id = mlflow.create_experiment(name, artifact_location(mlflow.tracking_uri, name))
        except Exception:  # another worker created it first
            found = mlflow.get_experiment_by_name(name)
            if found is None:
                raise
            exp_id = found.experiment_id
        tags = {}
    wanted = {"mlflow.experimentKind": EXPERIMENT_KIND}
    if description:
        wanted["mlflow.note.content"] = description
    for key, value in wanted.items():
        if tags.get(key) != value:
            mlflow.set_experiment_tag(exp_id, key, value)
    return exp_id


def log_dataset(mlflow: MlflowClient, run_id: str, name: str, source: str, digest: str) -> None:
    """The run's data as an MLflow dataset input: its name, where it came from, the split hash."""
    dataset = Dataset(name=name, digest=digest[:36], source_type="local", source=source)
    context = InputTag(key="mlflow.data.context", value="train/validation/test split")
    mlflow.log_inputs(run_id, datasets=[DatasetInput(dataset=dataset, tags=[context])])


def provenance(device: torch.device | None = None) -> dict[str, str]:
    """Git commit and package versions, attached to every run; with ``device`` also where it
    trained (``pipeline.device.describe``: device, its name, CUDA / cuDNN / driver versions)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(pipeline.__file__).parent,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(pipeline.__file__).parent,
            check=False,
        ).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    return {
        "git_commit": (commit + ("-dirty" if dirty else "")) or "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "mlflow": mlflow.__version__,
        "numpy": numpy.__version__,
        "scikit_learn": sklearn.__version__,
        "pipeline": pipeline.__version__,
        **(
            devices.describe(device) | {"torch_threads": str(torch.get_num_threads())}
            if device is not None
            else {}
        ),
    }


def study_run(
    mlflow: MlflowClient, exp_id: str, study: str, tags: Mapping[str, str], params: Mapping[str, Any]
) -> str:
    """The study's parent run: reused across invocations (one parent per study), else created.

    Params are logged when it is created (MLflow params are immutable); what may change between
    invocations (trial target, overrides, commit) goes in tags, which are overwritten.
    """
    runs = mlflow.search_runs(
        [exp_id],
        filter_string=f"tags.pipeline_role = '{STUDY_ROLE}'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    if runs:
        run_id = runs[0].info.run_id
        mlflow.update_run(run_id, status="RUNNING")
    else:
        run_id = mlflow.create_run(
            exp_id, run_name=study, tags={"pipeline_role": STUDY_ROLE, "optuna_study": study}
        ).info.run_id
        log(mlflow, run_id, params=params)
    log(mlflow, run_id, tags=tags)
    return run_id


def trial_run(mlflow: MlflowClient, exp_id: str, parent_id: str, name: str, tags: Mapping[str, str]) -> str:
    """A nested run under the study's parent run (MLflow nests by the parentRunId tag)."""
    all_tags = {MLFLOW_PARENT_RUN_ID: parent_id, MLFLOW_RUN_NAME: name, "pipeline_role": TRIAL_ROLE}
    all_tags.update(tags)
    return mlflow.create_run(exp_id, run_name=name, tags=all_tags).info.run_id


def log(
    mlflow: MlflowClient,
    run_id: str,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, Any] | None = None,
    step: int = 0,
) -> None:
    """Params, metrics and tags in one ``log_batch`` call (MLflow caps a batch at 1000 entries)."""
    now = int(time.time() * 1000)
    p = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    m = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
    t = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
    for i in range(0, max(len(p), len(m), len(t), 1), 100):
        mlflow.log_batch(run_id, metrics=m[i : i + 100], params=p[i : i + 100], tags=t[i : i + 100])


class MetricBuffer:
    """Collects per-epoch metrics and flushes them with ``log_batch`` every ``interval`` seconds."""

    def __init__(self, mlflow: MlflowClient, run_id: str, interval: float = 5.0) -> None:
        self.mlflow, self.run_id, self.interval = mlflow, run_id, interval
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()

    def add(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if time.monotonic() - self.last_flush >= self.interval:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.pending), 1000):
            self.mlflow.log_batch(self.run_id, metrics=self.pending[i : i + 1000])
        self.pending.clear()
        self.last_flush = time.monotonic()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"epochs": 30}}`` → ``{"training.epochs": 30}`` for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
