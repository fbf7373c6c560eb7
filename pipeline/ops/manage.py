"""Study management: the winner (``best``), every study on disk (``studies``), and ``delete``.

``best`` reads the selection the study page makes (``report.study_summary.ranked_trials``: best by
the validation objective, never by test) and says where its report and weights are. ``delete``
removes a study's Optuna storage, its MLflow experiment (the way MLflow deletes: recoverable
with ``mlflow experiments restore``) and its reports folder, and only with ``--yes``. ``studies``
shows each study's finished trials against its target: the ``trials_target`` tag of its MLflow
parent run, which every run of the study (``study``, ``worker``, ``rerun``) sets to its target.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import optuna

from pipeline import tracking
from pipeline.config import StudyConfig
from pipeline.storage import (
    DEFAULT_STORAGE_DIR,
    StudyError,
    open_storage,
    ranked_trials,
    redact,
    storage_spec,
    trial_counts,
)


def open_existing(cfg: StudyConfig, storage: str | None = None) -> tuple[optuna.storages.BaseStorage, str]:
    """The storage that holds ``cfg``'s study, and its spec; one clear error (and nothing created)
    when there is no such storage or no such study in it."""
    spec = storage_spec(cfg, storage)
    if "://" not in spec and not Path(spec).is_file():
        raise StudyError(f"{cfg.path}: no Optuna storage at {spec}; run `pipeline study {cfg.path}` first")
    opened = open_storage(spec)
    try:
        opened.get_study_id_from_name(cfg.name)
    except KeyError:
        raise StudyError(f"{cfg.path}: no study named {cfg.name!r} in {redact(spec)}") from None
    return opened, spec


def load(cfg: StudyConfig, storage: str | None = None) -> tuple[optuna.Study, str]:
    """The study of ``cfg`` in its storage, or one clear error."""
    opened, spec = open_existing(cfg, storage)
    return optuna.load_study(study_name=cfg.name, storage=opened), spec


def _weights(mlflow, run_id: str | None) -> str:
    """Where the trial's model.pt is: a local path for a file artifact store, else its URI."""
    if not run_id:
        return "— (no MLflow run recorded)"
    try:
        root = mlflow.get_run(run_id).info.artifact_uri
    except Exception:  # the run was deleted from MLflow
        return f"— (MLflow run {run_id} not found)"
    uri = f"{root.rstrip('/')}/model.pt"
    parsed = urllib.parse.urlparse(uri)
    return urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else uri


def best_main(cfg: StudyConfig, storage: str | None, tracking_uri: str | None) -> int:
    """``pipeline best``: the selected trial, its numbers and where its files are."""
    study, _ = load(cfg, storage)
    ranked = ranked_trials(study)
    if not ranked:
        raise StudyError(f"{cfg.path}: study {cfg.name!r} has no complete trial yet")
    top = ranked[0]
    attrs = top.user_attrs
    confidence = cfg.bounds.confidence
    print(f"selected trial {top.number} of study {cfg.name} (best {cfg.objective} on validation)")
    for key, value in top.params.items():
        print(f"  {key} = {value!r}")
    seeds = attrs.get("test_error_seeds") or []
    spread = f" (mean of {len(seeds)} seeds, sd {attrs.get(f'{cfg.objective}_std', 0.0):.4f})"
    print(f"  {cfg.objective} = {top.value:.4f}{spread if len(seeds) > 1 else ''}")
    if "test_error" in attrs:
        low, high = attrs.get("test_error_clopper_pearson_low"), attrs.get("test_error_clopper_pearson_high")
        interval = f", {confidence:.0%} Clopper–Pearson [{low:.4f}, {high:.4f}]" if low is not None else ""
        if len(seeds) > 1:  # the interval is one network's (replicate 0): never pinned on the mean
            print(
                f"  test_error = {attrs['test_error']:.4f} (mean of {len(seeds)} seeds, sd "
                f"{attrs.get('test_error_std', 0.0):.4f}); replicate 0's network: {seeds[0]:.4f}{interval}"
            )
        else:
            print(f"  test_error = {attrs['test_error']:.4f}{interval}")
    print(f"  report: {attrs.get('report', '— (none recorded)')}")
    mlflow = tracking.client(tracking_uri)
    print(f"  weights: {_weights(mlflow, attrs.get('mlflow_run_id'))}  (pipeline.model.load_weights)")
    print(f"  MLflow run: {attrs.get('mlflow_run_id', '—')}")
    return 0


@dataclass(frozen=True)
class StudyRow:
    name: str
    finished: int  # complete or pruned: what the target counts
    failed: int
    best: float | None
    updated: str
    storage: str


def list_studies(specs: list[str], name: str | None = None) -> list[StudyRow]:
    """Every study in the given storages (journal files or database URLs); only ``name`` if given."""
    rows = []
    for spec in specs:
        storage = open_storage(spec)
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            if name is not None and summary.study_name != name:
                continue
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            counts = trial_counts(study)
            ranked = ranked_trials(study)
            best = ranked[0].value if ranked else None
            stamps = [t.datetime_complete for t in study.get_trials(deepcopy=False) if t.datetime_complete]
            updated = max(stamps).isoformat(sep=" ", timespec="seconds") if stamps else "—"
            rows.append(
                StudyRow(summary.study_name, counts.finished, counts.fail, best, updated, redact(spec))
            )
    return sorted(rows, key=lambda r: (r.name, r.storage))


def trial_targets(names: set[str], tracking_uri: str | None) -> dict[str, int]:
    """Each study's trial target, from the ``trials_target`` tag of its MLflow parent run.

    A SQLite store that does not exist yet has none (and is not created by a listing).
    """
    uri = tracking.tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return {}
    tracking.check_reachable(uri)
    mlflow = tracking.client(uri)
    targets = {}
    for name in sorted(names):
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            continue
        runs = mlflow.search_runs(  # the parent run, found as tracking.study_run finds it
            [experiment.experiment_id],
            filter_string=f"tags.pipeline_role = '{tracking.STUDY_ROLE}'",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        tag = runs[0].data.tags.get("trials_target", "") if runs else ""
        if tag.isdigit():
            targets[name] = int(tag)
    return targets


def studies_main(storage: str | None, name: str | None = None, tracking_uri: str | None = None) -> int:
    """``pipeline studies``: every study in storage/ (and in --storage / $OPTUNA_STORAGE), its trials
    done against its target; ``name``: only that study."""
    journals = sorted(DEFAULT_STORAGE_DIR.glob("*.journal")) if DEFAULT_STORAGE_DIR.is_dir() else []
    specs = [str(p) for p in journals]
    if storage and ("://" in storage or Path(storage).resolve() not in {p.resolve() for p in journals}):
        specs.append(storage)  # a journal under storage/ given again is listed once
    rows = list_studies(specs, name)
    where = "storage/" + (f" or {redact(storage)}" if storage else "")
    if not rows:
        if name is not None:
            raise StudyError(f"no study named {name!r} in {where}")
        print(f"no studies found in {where} (run `pipeline study studies/demo.toml`)", file=sys.stderr)
        return 0
    targets = trial_targets({r.name for r in rows}, tracking_uri)
    print("study\tdone/target\tfailed\tbest\tlast update\tstorage")
    for r in rows:
        best = f"{r.best:.4f}" if r.best is not None else "—"
        done = f"{r.finished}/{targets[r.name]}" if r.name in targets else str(r.finished)
        print(f"{r.name}\t{done}\t{r.failed}\t{best}\t{r.updated}\t{r.storage}")
    return 0


def delete_main(
    cfg: StudyConfig,
    storage: str | None,
    tracking_uri: str | None,
    yes: bool,
    reports_root: Path = Path("reports"),
) -> int:
    """``pipeline delete``: say what would go (exit 2), or with ``--yes`` remove it (exit 0)."""
    study, spec = load(cfg, storage)
    mlflow = tracking.client(tracking_uri)
    experiment = mlflow.get_experiment_by_name(cfg.name)
    folder = reports_root / cfg.name
    journal_only_this = "://" not in spec and [
        s.study_name for s in optuna.get_all_study_summaries(study._storage, include_best_trial=False)
    ] == [cfg.name]
    what = [
        f"Optuna study {cfg.name!r} in {redact(spec)}" + (" (the journal file)" if journal_only_this else ""),
        f"MLflow experiment {cfg.name!r} (id {experiment.experiment_id})" if experiment else None,
        f"reports folder {folder}/" if folder.exists() else None,
    ]
    what = [w for w in what if w]
    if not yes:
        print(
            "would remove:\n  " + "\n  ".join(what) + "\nrun again with --yes to remove them", file=sys.stderr
        )
        return 2
    if journal_only_this:
        del study
        for path in Path(spec).parent.glob(f"{Path(spec).name}*"):  # the journal, its locks
            path.unlink(missing_ok=True)
    else:
        optuna.delete_study(study_name=cfg.name, storage=open_storage(spec))
    if experiment is not None:  # renamed first, so that a new study of this name starts afresh
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        mlflow.rename_experiment(experiment.experiment_id, f"{cfg.name}-deleted-{stamp}")
        mlflow.delete_experiment(experiment.experiment_id)
    shutil.rmtree(folder, ignore_errors=True)
    print("removed:\n  " + "\n  ".join(what))
    return 0
