"""Study page: ``reports/<study>/index.html``, rebuilt from Optuna storage and MLflow alone.

It answers "which configuration, how sure, and is the winner really better" without over-claiming:
the selected trial is the best by the validation objective (never by test); its test error comes
with every interval of the bounds stage; the runner-up comparison is one exact McNemar test on the
paired test predictions; and anyone reading test errors across all N trials gets simultaneous
(Bonferroni / union-bound) intervals, since picking the best of N on one set is optimistic
(Cawley & Talbot 2010). With K ≥ 2 training seeds per trial it also lists the configurations the
seeds cannot tell from the selected one (the tied set) and compares it with the runner-up across
seeds, the McNemar test then a detail about one network of each. Nothing is retrained: each
trial's ``metrics.json`` and ``test_predictions.json`` are read from its report folder or, failing
that, its MLflow run. On a ground truth the selected network also meets ``[bounds] fresh_sets``
fresh test sets (``report.fresh_sets``).

The page carries no wall-clock time, so regenerating it from the same storage gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial
from scipy import stats

from pipeline import bounds, files, tracking
from pipeline.compare import PairedComparison, SeedComparison
from pipeline.config import StudyConfig
from pipeline.evaluate import Evaluation, summarize
from pipeline.report.figures import Plot, optuna_figures, plot_confusion, plot_forest
from pipeline.report.fresh_sets import FreshSection, selected_section
from pipeline.report.html import Figure, classification_rows, figure, number, render
from pipeline.report.reruns import RerunSection, rerun_looks, rerun_section
from pipeline.report.study_summary import (
    StudySummary,
    TrialOutputs,
    load_outputs,
    objective_seeds,
    ranked_trials,
    run_reasons,
    summarize_study,
    test_error_seeds,
    trials_frame,
)
from pipeline.signals import signal_in
from pipeline.storage import StudyError, open_storage, redact, storage_spec

PAGE = "index.html"


FOLDER = "study"  # figures, trials.csv and study_summary.json, beside index.html


class StudyPageWarning(UserWarning):
    """The study page could not be written; the study's trials are unaffected."""


@dataclass(frozen=True)
class PageSources:
    """Where the page's data came from (provenance; URIs with passwords redacted)."""

    storage: str
    tracking_uri: str
    parent_run_id: str | None
    experiment_id: str | None


def write_study_page(
    cfg: StudyConfig,
    study: optuna.Study,
    page_dir: Path,
    sources: PageSources,
    mlflow=None,
) -> tuple[Path, StudySummary, str]:
    """Write ``page_dir/index.html`` and ``page_dir/study/`` (figures, trials.csv, summary); also
    return the page's text for the copy in MLflow (``log_to_parent``)."""
    ranked = ranked_trials(study)
    classes = tuple(cfg.classes)
    outputs = {}
    for t in ranked:
        found = load_outputs(t, page_dir, classes, mlflow)
        if found is not None:
            outputs[t.number] = found
    summary = summarize_study(study, cfg, outputs, rerun_looks(page_dir))
    frame = trials_frame(study, cfg, page_dir, run_reasons(study, mlflow))
    with files.atomic_dir(page_dir / FOLDER) as tmp:
        frame.to_csv(tmp / "trials.csv", index=False)
        figures = optuna_figures(study, tmp, cfg.objective)
        forest = plot_forest(study, outputs, summary, tmp / "forest.png")
        selected = outputs.get(summary.selected) if summary.selected is not None else None
        confusion = None
        if selected is not None:
            evaluation = _evaluation(selected)
            confusion = plot_confusion(
                evaluation, selected.classes, tmp / "selected_confusion_matrix.png", "test set"
            )
        files.write_json(tmp / "study_summary.json", summary.to_dict())
        reruns = rerun_section(page_dir)
        fresh = selected_section(cfg, ranked[0] if ranked else None, selected, page_dir, mlflow, tmp)
        content = _page(cfg, study, summary, frame, outputs, figures, forest, confusion, sources, reruns)
        content = dataclasses.replace(content, fresh_sets=fresh)
        text = render("study.html.j2", page=content)
        # in MLflow's artifact viewer a trial's report is not beside the page but in the trial's run
        copy = render("study.html.j2", page=dataclasses.replace(content, in_mlflow=True))
    page = files.write_text(page_dir / PAGE, text)
    return page, summary, copy


def _evaluation(outputs: TrialOutputs) -> Evaluation:
    if outputs.labels is not None and outputs.predictions is not None:
        return summarize(outputs.labels, outputs.predictions, outputs.classes)
    return Evaluation(
        labels=np.array([]),
        predictions=np.array([]),
        loss=math.nan,
        confusion=np.asarray(outputs.metrics["confusion_matrix"]),
        report=outputs.metrics["classification_report"],
    )


@dataclass(frozen=True)
class Ranked:
    """A trial the page names: the selected one or the runner-up."""

    number: int
    value: float  # the objective
    params: str  # "lr=0.1, momentum=0.9, …"


@dataclass(frozen=True)
class TrialsTable:
    """The trials, laid out as ``DataFrame.to_html`` did and with its cell text (see ``_to_html_text``)."""

    header: tuple[str, ...]  # every column but the last, the report link
    rows: tuple[tuple[tuple[str, ...], str], ...]  # (cells, report link or "")
    run_ids: tuple[str, ...] = ()  # each row's MLflow run id ("" when it has none), for the copy in MLflow


@dataclass(frozen=True)
class Tested:
    """The selected trial's test results, from its report folder or MLflow run."""

    k: int
    m: int
    clopper_pearson: str  # "[low, high]" at the study's confidence, from the trial's attributes
    bounds_confidence: float  # the confidence its bounds stage computed the intervals at
    intervals: tuple[dict[str, Any], ...]  # metrics.json's records
    confusion: Figure
    classification: tuple[tuple[Any, ...], ...]
    link: str  # its report, relative to the page
    simultaneous: tuple[tuple[Any, ...], ...]  # its intervals alone and over all N tested trials
    union_epsilon: float
    val_error: float
    test_error: float
    mean_gap: float  # test − validation error, averaged over the complete trials
    n_gaps: int
    half_width: float  # of its exact interval at the study's confidence


@dataclass(frozen=True)
class Versus:
    """The selected trial against the runner-up: the exact McNemar test of their paired predictions."""

    test: PairedComparison
    table: tuple[tuple[Any, ...], ...]  # the 2×2 rows as the page shows them
    selected_only_wrong: int
    runner_up_only_wrong: int


@dataclass(frozen=True)
class Tied:
    """The tied set as the page lists it: the selected trial's row first, then every other one tested."""

    replicates: int  # K, the selected trial's seeds; 1: no tied set can be stated
    delta: float
    objective: str
    header: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]  # trial, params, mean ± sd, seeds, p, Holm p, tied
    n_tied: int  # other trials tied with the selected one
    n_tested: int  # other trials tested (those with ≥ 2 seeds)
    left_out: tuple[int, ...]  # complete trials with one seed
    test_error: str  # the selected trial's test error over its seeds, "mean ± sd" ("" without them)


@dataclass(frozen=True)
class AcrossSeeds:
    """The selected trial against the runner-up, their test errors paired by seed."""

    test: SeedComparison
    verdict: str  # as a phrase: "better than the runner-up", …


@dataclass(frozen=True)
class StudyPage:
    """What ``study.html.j2`` shows; the template lays it out and formats the numbers."""

    title: str
    objective: str
    confidence: float
    summary: StudySummary  # counts, N tested, notes
    n_trials: int
    selected: Ranked | None
    runner_up: Ranked | None
    tested: Tested | None  # None: the selected trial left no outputs
    verdict: str  # the comparison's verdict as a phrase ("" without one)
    versus: Versus | None
    tied: Tied | None  # None: no complete trial
    across_seeds: AcrossSeeds | None  # None: K < 2, or the runner-up has other seeds
    resolvable: float  # smallest error difference the McNemar test could call significant
    resolvable_errors: int | None  # the same in errors on the test set; None when none could be
    trials: TrialsTable
    figures: dict[str, Figure]  # Optuna's: history, importances, slice, contour
    forest: Figure
    provenance: tuple[tuple[str, Any], ...]
    reruns: RerunSection | None
    folder: str = FOLDER
    stage_times: StageTimes | None = None  # None: no complete trial recorded its stage times
    in_mlflow: bool = False  # the copy logged to the parent run: trials named by run id, not linked
    fresh_sets: FreshSection | None = None  # None: no ground truth, or no ground-truth numbers


# a trial's stages, in order: each trial logs time_<stage>_s (pipeline.study.trial measures them)
STAGES = ("train", "evaluate", "bounds", "report", "tracking")


@dataclass(frozen=True)
class StageTimes:
    """Where a complete trial's time goes: each stage's median over the complete trials and its
    share of the median trial wall time (shares of medians, so they need not add up to 100 %)."""

    n: int  # complete trials that recorded their stage times
    trial_median: float  # median time_trial_s
    rows: tuple[tuple[str, float, str], ...]  # (stage, median seconds, share of the median trial)


def _stage_times(study: optuna.Study) -> StageTimes | None:
    """The stage-time table from the complete trials' user attributes (``time_<stage>_s``)."""
    timed = [
        t.user_attrs
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if isinstance(t.user_attrs.get("time_trial_s"), (int, float))
    ]
    if not timed:
        return None
    trial_median = float(np.median([a["time_trial_s"] for a in timed]))
    rows = []
    for stage in STAGES:
        median = float(np.median([a.get(f"time_{stage}_s", 0.0) for a in timed]))
        share = f"{100 * median / trial_median:.1f} %" if trial_median > 0 else "—"
        rows.append((f"time_{stage}_s", median, share))
    rows.append(("time_trial_s", trial_median, "100 %"))
    return StageTimes(len(timed), trial_median, tuple(rows))


def _figure(fig: Plot | Path | None) -> Figure:
    plot = fig if isinstance(fig, Plot) else Plot(fig, "" if fig else "nothing to draw")
    return figure(plot.path, plot.note)


def _to_html_text(text: str) -> str:
    """A cell's text as ``DataFrame.to_html`` printed it: tab, CR and newline spelled out, ends stripped."""
    return text.replace("\t", "\\t").replace("\r", "\\r").replace("\n", "\\n").strip()


def _trials_table(frame: pd.DataFrame, run_ids: dict[int, str]) -> TrialsTable:
    shown = {col: [_to_html_text(number(v)) for v in frame[col]] for col in frame.columns if col != "report"}
    low, high = frame["test_error_clopper_pearson_low"], frame["test_error_clopper_pearson_high"]
    shown["test_error_clopper_pearson_low"] = [
        f"[{number(lo)}, {number(hi)}]" if math.isfinite(lo) else "—"
        for lo, hi in zip(low, high, strict=True)
    ]
    del shown["test_error_clopper_pearson_high"]
    names = {"test_error_clopper_pearson_low": "Clopper–Pearson", "duration_s": "duration (s)"}
    rows = zip(zip(*shown.values(), strict=True), frame["report"], strict=True)
    return TrialsTable(
        header=tuple(names.get(col, col).strip() for col in shown),
        rows=tuple((cells, link or "") for cells, link in rows),
        run_ids=tuple(run_ids.get(int(n), "") for n in frame["number"]),
    )


def _page(cfg, study, summary, frame, outputs, figures, forest, confusion, sources, reruns) -> StudyPage:
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    sel = by_number.get(summary.selected) if summary.selected is not None else None
    sel_out = outputs.get(summary.selected) if summary.selected is not None else None
    runner = by_number.get(summary.runner_up) if summary.runner_up is not None else None
    cmp = summary.comparison
    resolvable = summary.metrics.get("smallest_resolvable_difference", math.nan)
    versus = None
    if cmp is not None and sel is not None and runner is not None:
        t = cmp.table
        versus = Versus(
            test=cmp,
            table=(
                (f"trial {sel.number} wrong", int(t[0, 0]), int(t[0, 1])),
                (f"trial {sel.number} right", int(t[1, 0]), int(t[1, 1])),
            ),
            selected_only_wrong=int(t[0, 1]),
            runner_up_only_wrong=int(t[1, 0]),
        )
    return StudyPage(
        title=f"Study {cfg.name}",
        objective=cfg.objective,
        confidence=summary.confidence,
        summary=summary,
        n_trials=len(frame),
        selected=_ranked(sel),
        runner_up=_ranked(runner),
        tested=_tested(summary, sel, sel_out, outputs, confusion) if sel is not None else None,
        verdict=_verdict_text(cmp.verdict) if cmp is not None else "",
        versus=versus,
        tied=_tied(summary, by_number) if sel is not None else None,
        across_seeds=AcrossSeeds(summary.seed_comparison, _verdict_text(summary.seed_comparison.verdict))
        if summary.seed_comparison is not None
        else None,
        resolvable=resolvable,
        resolvable_errors=round(resolvable * cmp.m)
        if cmp is not None and math.isfinite(resolvable)
        else None,
        trials=_trials_table(
            frame, {t.number: t.user_attrs.get("mlflow_run_id", "") for t in study.get_trials(deepcopy=False)}
        ),
        figures={name: _figure(figures.get(name)) for name in ("history", "importances", "slice", "contour")},
        forest=_figure(forest),
        provenance=_provenance_rows(cfg, study, outputs, sel_out, sources),
        reruns=reruns,
        stage_times=_stage_times(study),
    )


def _params(trial: FrozenTrial) -> str:
    return ", ".join(f"{k}={number(v)}" for k, v in trial.params.items())


def _ranked(trial: FrozenTrial | None) -> Ranked | None:
    if trial is None:
        return None
    return Ranked(trial.number, trial.value, _params(trial))


def _tied(summary: StudySummary, by_number: dict[int, FrozenTrial]) -> Tied:
    sel = by_number[summary.selected]
    seeds = np.asarray(objective_seeds(sel))
    k = len(seeds)
    spread = f"{seeds.mean():.4f} ± {seeds.std(ddof=1):.4f}" if k >= 2 else f"{seeds.mean():.4f}"
    rows = [(f"{sel.number} (selected)", _params(sel), spread, k, math.nan, math.nan, "—")]
    for row in summary.tied or ():
        other = by_number[row.number]
        rows.append(
            (
                row.number,
                _params(other),
                f"{row.mean:.4f} ± {row.sd:.4f}",
                len(objective_seeds(other)),
                row.p_value,
                row.p_adjusted,
                "yes" if row.tied else "no",
            )
        )
    errors = np.asarray(test_error_seeds(sel))
    header = ("trial", "params", f"{summary.objective} mean ± sd", "seeds", "Welch p", "Holm-adjusted p")
    return Tied(
        replicates=k,
        delta=1 - summary.confidence,
        objective=summary.objective,
        header=(*header, "tied"),
        rows=tuple(rows),
        n_tied=sum(row.tied for row in summary.tied or ()),
        n_tested=len(summary.tied or ()),
        left_out=summary.left_out,
        test_error=f"{errors.mean():.4f} ± {errors.std(ddof=1):.4f}" if errors.size >= 2 else "",
    )


def _interval_text(trial: FrozenTrial, method: str) -> str:
    low = trial.user_attrs.get(f"test_error_{method}_low", math.nan)
    high = trial.user_attrs.get(f"test_error_{method}_high", math.nan)
    return f"[{number(low)}, {number(high)}]"


def _verdict_text(verdict: str) -> str:
    """A comparison's verdict as a phrase: "better than the runner-up", "indistinguishable from the
    runner-up at this test size" (McNemar) or "… across these seeds" (seed-paired t)."""
    if verdict in ("better", "worse"):
        return f"{verdict} than the runner-up"
    return "indistinguishable from the runner-up" + verdict.removeprefix("indistinguishable")


def _tested(summary: StudySummary, sel, sel_out, outputs, confusion) -> Tested | None:
    if sel_out is None:
        return None
    conf = summary.confidence
    delta = 1 - conf
    m = sel_out.m
    err = sel_out.k / m
    low, high = stats.binomtest(sel_out.k, m).proportion_ci(conf, method="exact")
    simultaneous = ()
    union = math.nan
    if summary.test_looks:
        n = summary.test_looks
        hoeff = bounds.hoeffding_epsilon(m, delta)
        union = summary.metrics["union_hoeffding_epsilon"]
        blow = summary.metrics["selected_test_error_bonferroni_low"]
        bhigh = summary.metrics["selected_test_error_bonferroni_high"]
        simultaneous = (
            ("Clopper–Pearson, this trial alone", f"1 − δ = {conf:g}", low, high, high - low),
            (
                "Clopper–Pearson, Bonferroni over N",
                f"1 − δ/N = {1 - delta / n:.4g}",
                blow,
                bhigh,
                bhigh - blow,
            ),
            (
                "Hoeffding, this trial alone",
                f"1 − δ = {conf:g}",
                max(0.0, err - hoeff),
                min(1.0, err + hoeff),
                2 * hoeff,
            ),
            (
                "Hoeffding, union bound over N",
                f"1 − δ/N = {1 - delta / n:.4g}",
                max(0.0, err - union),
                min(1.0, err + union),
                2 * union,
            ),
        )
    gaps = [o.metrics["test_error"] - (1 - o.metrics["val_acc"]) for o in outputs.values()]
    return Tested(
        k=sel_out.k,
        m=m,
        clopper_pearson=_interval_text(sel, "clopper_pearson"),
        bounds_confidence=sel_out.metrics.get("confidence", conf),
        intervals=tuple(sel_out.metrics["intervals"]),
        confusion=_figure(confusion),
        classification=classification_rows(_evaluation(sel_out)),
        link=f"trial-{sel.number:04d}/report.html",
        simultaneous=simultaneous,
        union_epsilon=union,
        val_error=1 - sel_out.metrics["val_acc"],
        test_error=sel_out.metrics["test_error"],
        mean_gap=np.mean(gaps),
        n_gaps=len(gaps),
        half_width=(high - low) / 2,
    )


def _provenance_rows(cfg, study, outputs, sel_out, sources: PageSources) -> tuple[tuple[str, Any], ...]:
    prov = dict(sel_out.metrics.get("provenance", {})) if sel_out else {}
    commits = sorted({o.metrics.get("provenance", {}).get("git_commit", "unknown") for o in outputs.values()})
    config_hashes = sorted({o.metrics.get("config_hash", "") for o in outputs.values()} - {""})
    split_hashes = sorted({o.metrics.get("split_hash", "") for o in outputs.values()} - {""})
    finished = [t.datetime_complete for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    rows = [
        ("study", cfg.name),
        ("study file", cfg.path),
        ("config hash (this file)", cfg.config_hash()),
        ("config hash (trials)", ", ".join(config_hashes) or "—"),
        *(
            [("note", "the trials ran under another config hash: the file or the config schema changed")]
            if config_hashes and config_hashes != [cfg.config_hash()]
            else []
        ),
        ("split hash", ", ".join(split_hashes) or "—"),
        ("git commit (trials)", ", ".join(commits) or "—"),
        ("training seed", cfg.training.seed),
        ("dataset seed", cfg.dataset.seed),
        ("sampler", f"{cfg.sampler.kind}, seed {cfg.sampler.seed}"),
        ("Optuna storage", sources.storage),
        ("MLflow tracking URI", sources.tracking_uri),
        ("MLflow experiment id", sources.experiment_id or "—"),
        ("MLflow parent run", sources.parent_run_id or "— (not found)"),
        ("last trial finished", max(finished).isoformat(sep=" ", timespec="seconds") if finished else "—"),
    ]
    for key in ("python", "torch", "optuna", "mlflow", "numpy", "scikit_learn", "pipeline"):
        if key in prov:
            rows.append((f"{key} (selected trial)", prov[key]))
    return tuple(rows)


def find_study_run(mlflow, name: str) -> tuple[str | None, str | None]:
    """(experiment id, parent run id) of a study in MLflow, or Nones when it was never tracked."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        return None, None
    runs = mlflow.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.pipeline_role = '{tracking.STUDY_ROLE}'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return exp.experiment_id, (runs[0].info.run_id if runs else None)


def log_to_parent(mlflow, parent_run_id: str, page: Path, summary: StudySummary, copy: str) -> None:
    """The page's MLflow copy (``copy``, as index.html), its folder and the study-level numbers onto
    the study's parent run."""
    mlflow.log_text(parent_run_id, copy, page.name)
    mlflow.log_artifacts(parent_run_id, str(page.parent / FOLDER), FOLDER)
    metrics = {k: v for k, v in summary.metrics.items() if math.isfinite(v)}
    tracking.log(mlflow, parent_run_id, metrics=metrics)


def regenerate(
    cfg: StudyConfig,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    reports_root: Path = Path("reports"),
) -> Path:
    """Rebuild the study page from storage and MLflow (no training) and log it to the parent run."""
    spec = storage_spec(cfg, storage)
    if "://" not in spec and not Path(spec).is_file():
        raise StudyError(
            f"{cfg.path}: no Optuna storage at {spec} for study {cfg.name!r}; run "
            f"`pipeline study {cfg.path}` first, or pass --storage"
        )
    try:
        study = optuna.load_study(study_name=cfg.name, storage=open_storage(spec))
    except KeyError:
        raise StudyError(
            f"{cfg.path}: no study named {cfg.name!r} in {redact(spec)}; check --name and --storage"
        ) from None
    uri = tracking.tracking_uri(tracking_uri)
    mlflow = None
    if not (uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()):
        mlflow = tracking.client(uri)
    exp_id, parent = find_study_run(mlflow, cfg.name) if mlflow is not None else (None, None)
    sources = PageSources(redact(spec), redact(uri), parent, exp_id)
    page, summary, copy = write_study_page(cfg, study, reports_root / cfg.name, sources, mlflow)
    if mlflow is not None and parent is not None:
        log_to_parent(mlflow, parent, page, summary, copy)
    else:
        warnings.warn(
            f"study {cfg.name!r} has no parent run in MLflow at {redact(uri)}: the page was written "
            "but not logged",
            StudyPageWarning,
            stacklevel=2,
        )
    return page


def write_after_study(
    cfg: StudyConfig, study: optuna.Study, mlflow, parent_run_id: str, page_dir: Path, spec: str
) -> Path | None:
    """The end of a study run: write and log the page; a failure warns and never touches the trials."""
    try:
        exp_id = mlflow.get_run(parent_run_id).info.experiment_id
        sources = PageSources(redact(spec), redact(mlflow.tracking_uri), parent_run_id, exp_id)
        page, summary, copy = write_study_page(cfg, study, page_dir, sources, mlflow)
        log_to_parent(mlflow, parent_run_id, page, summary, copy)
        return page
    except Exception as exc:  # the trials are safely stored; `pipeline report` can retry the page
        stop = signal_in(exc)
        if stop is not None:  # a signal is not a page failure: the command must still stop with 143
            raise stop from None
        warnings.warn(
            f"study page for {cfg.name!r} not written ({type(exc).__name__}: {exc}); the trials are "
            f"stored — run `pipeline report {cfg.path}` to retry",
            StudyPageWarning,
            stacklevel=2,
        )
        return None
