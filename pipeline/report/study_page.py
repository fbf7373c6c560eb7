"""Study page: ``reports/<study>/index.html``, rebuilt from Optuna storage and MLflow alone.

It answers "which configuration, how sure, and is the winner really better" without over-claiming:
the selected trial is the best by the validation objective (never by test); its test error comes
with every interval of the bounds stage; the runner-up comparison is one exact McNemar test on the
paired test predictions; and anyone reading test errors across all N trials gets simultaneous
(Bonferroni / union-bound) intervals, since picking the best of N on one set is optimistic
(Cawley & Talbot 2010). Nothing is retrained: each trial's ``metrics.json`` and
``test_predictions.json`` are read from its report folder or, failing that, its MLflow run.

The page carries no wall-clock time, so regenerating it from the same storage gives the same bytes.
"""

from __future__ import annotations

import html
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
from pipeline.config import StudyConfig
from pipeline.evaluate import Evaluation, summarize
from pipeline.report.figures import Plot, optuna_figures, plot_confusion, plot_forest
from pipeline.report.html import classification_table, html_page, image_html, table_html
from pipeline.report.reruns import rerun_section_html
from pipeline.report.study_summary import (
    StudySummary,
    TrialOutputs,
    load_outputs,
    ranked_trials,
    run_reasons,
    summarize_study,
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
) -> tuple[Path, StudySummary]:
    """Write ``page_dir/index.html`` and ``page_dir/study/`` (figures, trials.csv, summary)."""
    ranked = ranked_trials(study)
    classes = tuple(cfg.classes)
    outputs = {}
    for t in ranked:
        found = load_outputs(t, page_dir, classes, mlflow)
        if found is not None:
            outputs[t.number] = found
    summary = summarize_study(study, cfg, outputs)
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
        sections = _sections(cfg, study, summary, frame, outputs, figures, forest, confusion, sources)
        reruns = rerun_section_html(page_dir)
        if reruns is not None:
            sections.insert(-1, ("Reruns", reruns))
        text = html_page(f"Study {cfg.name}", sections)
    page = files.write_text(page_dir / PAGE, text)
    return page, summary


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


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or value is pd.NA:
        return "—"
    if isinstance(value, (float, np.floating)):
        return "—" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def _trials_html(frame: pd.DataFrame) -> str:
    shown = frame.copy()
    for col in shown.columns:
        if col == "report":
            shown[col] = [f'<a href="{html.escape(v)}">report</a>' if v else "" for v in shown[col]]
        else:
            shown[col] = [html.escape(_fmt(v)) for v in shown[col]]
    low, high = frame["test_error_clopper_pearson_low"], frame["test_error_clopper_pearson_high"]
    shown["test_error_clopper_pearson_low"] = [
        f"[{_fmt(lo)}, {_fmt(hi)}]" if math.isfinite(lo) else "—" for lo, hi in zip(low, high, strict=True)
    ]
    shown = shown.drop(columns="test_error_clopper_pearson_high").rename(
        columns={"test_error_clopper_pearson_low": "Clopper–Pearson", "duration_s": "duration (s)"}
    )
    table = shown.to_html(index=False, escape=False, border=0, na_rep="—")
    return f'<style>.dataframe td{{white-space:nowrap}}</style><div style="overflow-x:auto">{table}</div>'


def _figure_html(fig: Plot | Path | None, alt: str) -> str:
    plot = fig if isinstance(fig, Plot) else Plot(fig, "" if fig else "nothing to draw")
    shown = image_html(plot.path, alt) if plot.path is not None else ""
    if plot.note:
        shown += f'<p class="note">{html.escape(alt)}: {html.escape(plot.note)}</p>'
    return shown


def _sections(
    cfg, study, summary, frame, outputs, figures, forest, confusion, sources
) -> list[tuple[str, str]]:
    conf = summary.confidence
    pct = f"{100 * conf:g} %"
    c = summary.counts
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    sel = by_number.get(summary.selected) if summary.selected is not None else None
    sel_out = outputs.get(summary.selected) if summary.selected is not None else None
    runner = by_number.get(summary.runner_up) if summary.runner_up is not None else None
    objective = cfg.objective
    sections: list[tuple[str, str]] = []

    # --- summary
    lines = [
        f"{len(frame)} trials: {c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed"
        + (f", {c['running']} running" if c["running"] else "")
        + ". The selected trial is the best by the validation objective "
        f"(<code>{objective}</code>); the test set chose nothing."
    ]
    if sel is not None and sel_out is not None:
        lines.append(
            f"Selected: <b>trial {sel.number}</b> ({html.escape(_params_text(sel))}), "
            f"{objective} = {sel.value:.4f}, "
            f"test error {sel_out.k}/{sel_out.m} = {sel_out.k / sel_out.m:.4f} "
            f"({pct} Clopper–Pearson {_interval_text(sel, 'clopper_pearson')})."
        )
    if summary.comparison is not None and runner is not None:
        cmp = summary.comparison
        lines.append(
            f"Against the runner-up, trial {runner.number}: <b>{_verdict_text(cmp.verdict)}</b> "
            f"(exact McNemar p = {cmp.p_value:.3g}, error difference {cmp.difference:+.4f}, "
            f"{pct} interval [{cmp.low:+.4f}, {cmp.high:+.4f}])."
        )
    lines += [html.escape(n) for n in summary.notes]
    sections.append(("Summary", "".join(f"<p>{line}</p>" for line in lines)))

    # --- trials
    sections.append(
        (
            "Trials",
            f'<p class="note">From the Optuna storage. Clopper–Pearson: the {pct} exact interval '
            f"of each trial's test error on its own. best_val_acc is the best epoch's; val_acc is "
            f"the final model's (the objective is {objective}). Also as "
            f'<a href="{FOLDER}/trials.csv">trials.csv</a>.</p>' + _trials_html(frame),
        )
    )

    # --- study figures
    sections.append(
        (
            "Study figures",
            _figure_html(figures.get("history"), "optimization history")
            + _figure_html(figures.get("importances"), "parameter importances")
            + '<p class="note">Importances: Optuna\'s default (PED-ANOVA) on the complete trials; '
            "with few trials they are rough.</p>"
            + _figure_html(figures.get("slice"), "slice plot")
            + _figure_html(figures.get("contour"), "contour plot"),
        )
    )

    # --- forest
    sections.append(
        (
            "Every complete trial's test error",
            f"<p>Sorted by {objective} (best at the top), the selected trial in red. The thick bar is "
            f"each trial's own {pct} exact interval; the thin bar is the Bonferroni-corrected one "
            f"(confidence 1 − δ/N, N = {summary.n_tested}), which may be read across all trials at "
            "once.</p>" + _figure_html(forest, "forest plot"),
        )
    )

    # --- selected trial
    if sel is not None and sel_out is not None:
        rows = [
            (
                iv["method"],
                iv["low"],
                iv["high"],
                iv["width"],
                "yes" if iv["guaranteed"] else "no",
                iv["note"] or "",
            )
            for iv in sel_out.metrics["intervals"]
        ]
        link = f"trial-{sel.number:04d}/report.html"
        body = (
            f"<p>Trial {sel.number}: {html.escape(_params_text(sel))}. {objective} = {sel.value:.4f}; "
            f"test error {sel_out.k}/{sel_out.m} = {sel_out.k / sel_out.m:.4f}. "
            f"Intervals at {sel_out.metrics.get('confidence', conf):g} from the bounds stage "
            f'(<a href="{link}">its report</a>):</p>'
            + table_html(rows, ("method", "low", "high", "width", "guaranteed", "note"))
            + _figure_html(confusion, "confusion matrix")
            + classification_table(_evaluation(sel_out))
        )
        sections.append(("The selected trial", body))

    # --- best vs runner-up
    sections.append(("Selected trial against the runner-up", _comparison_html(summary, sel, runner)))

    # --- simultaneous
    sections.append(("Simultaneous bounds over all trials", _simultaneous_html(summary, sel, sel_out)))

    # --- gap and resolution
    sections.append(
        ("Validation-to-test gap and test-set resolution", _gap_html(summary, sel, sel_out, outputs))
    )

    # --- provenance
    sections.append(("Provenance", _provenance_html(cfg, study, outputs, sel_out, sources)))
    return sections


def _params_text(trial: FrozenTrial) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())


def _interval_text(trial: FrozenTrial, method: str) -> str:
    low = trial.user_attrs.get(f"test_error_{method}_low", math.nan)
    high = trial.user_attrs.get(f"test_error_{method}_high", math.nan)
    return f"[{_fmt(low)}, {_fmt(high)}]"


def _comparison_html(summary: StudySummary, sel, runner) -> str:
    if sel is None or runner is None:
        return "<p>Fewer than two complete trials: there is no runner-up to compare with.</p>"
    cmp = summary.comparison
    if cmp is None:
        return "<p>" + " ".join(html.escape(n) for n in summary.notes) + "</p>"
    pct = f"{100 * cmp.confidence:g} %"
    delta = 1 - cmp.confidence
    t = cmp.table
    table = table_html(
        [
            (f"trial {sel.number} wrong", int(t[0, 0]), int(t[0, 1])),
            (f"trial {sel.number} right", int(t[1, 0]), int(t[1, 1])),
        ],
        ("", f"trial {runner.number} wrong", f"trial {runner.number} right"),
    )
    tie = ""
    if sel.value == runner.value:
        tie = (
            f" They tie on {summary.objective}; the study's order (the earlier trial) ranked them, "
            "which is still independent of the test set."
        )
    resolvable = summary.metrics.get("smallest_resolvable_difference", math.nan)
    return (
        f"<p>The runner-up is the second best by {summary.objective} (trial {runner.number}, "
        f"{summary.objective} = {runner.value:.4f}).{tie} Both were ranked on validation data, so "
        "comparing them on the test set is one honest test, not a search.</p>"
        + table
        + f"<p>They disagree on {cmp.n_discordant} of {cmp.m} test points. Exact McNemar test "
        f"(statsmodels <code>mcnemar(table, exact=True)</code>: a two-sided binomial test of the "
        f"{int(t[0, 1])} vs {int(t[1, 0])} split of those points): p = {cmp.p_value:.4g}.</p>"
        f"<p>Difference in test error (selected − runner-up): {cmp.difference:+.4f}, {pct} interval "
        f"[{cmp.low:+.4f}, {cmp.high:+.4f}] by Newcombe's (1998) square-and-add method for paired "
        "proportions (Wilson limits for each error rate, combined through the correlation of the "
        "pairs). It is approximate; it is used instead of the Wald interval, which degenerates when "
        "the models rarely disagree, while the McNemar p-value above is exact.</p>"
        f"<p><b>Verdict at δ = {delta:.3g}: the selected trial is {_verdict_text(cmp.verdict)}.</b>"
        + (
            f" With {cmp.n_discordant} disagreements, the smallest error difference this test "
            f"could call significant is {_fmt(resolvable)} (see below).</p>"
            if math.isfinite(resolvable)
            else f" With only {cmp.n_discordant} disagreements, no difference could be significant.</p>"
        )
    )


def _verdict_text(verdict: str) -> str:
    if verdict in ("better", "worse"):
        return f"{verdict} than the runner-up"
    return "indistinguishable from the runner-up at this test size"


def _simultaneous_html(summary: StudySummary, sel, sel_out: TrialOutputs | None) -> str:
    if sel is None or sel_out is None or not summary.n_tested:
        return "<p>No tested trial.</p>"
    conf = summary.confidence
    delta = 1 - conf
    n, m = summary.n_tested, sel_out.m
    err = sel_out.k / m
    single_low, single_high = stats.binomtest(sel_out.k, m).proportion_ci(conf, method="exact")
    hoeff = bounds.hoeffding_epsilon(m, delta)
    union = summary.metrics["union_hoeffding_epsilon"]
    blow = summary.metrics["selected_test_error_bonferroni_low"]
    bhigh = summary.metrics["selected_test_error_bonferroni_high"]
    rows = [
        (
            "Clopper–Pearson, this trial alone",
            f"1 − δ = {conf:g}",
            single_low,
            single_high,
            single_high - single_low,
        ),
        ("Clopper–Pearson, Bonferroni over N", f"1 − δ/N = {1 - delta / n:.4g}", blow, bhigh, bhigh - blow),
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
    ]
    return (
        f"<p>N = {n} trials had their test error computed on the same m = {m} points. The selected "
        "trial was chosen on validation data, so its own interval (first row) is valid for it. But "
        "whoever reads the test errors of all N trials side by side — or picks the lowest — needs "
        "all N intervals to hold at once. Spending δ/N on each (Bonferroni; for Hoeffding the union "
        f"bound ε = sqrt(ln(2N/δ)/(2m)) = {union:.4f}) makes that hold with probability ≥ 1 − δ; "
        "that is why these rows are wider.</p>"
        + table_html(
            rows, ("interval for trial " + str(sel.number), "confidence each", "low", "high", "width")
        )
    )


def _gap_html(
    summary: StudySummary, sel, sel_out: TrialOutputs | None, outputs: dict[int, TrialOutputs]
) -> str:
    if sel is None or sel_out is None:
        return "<p>No tested trial.</p>"
    conf = summary.confidence
    val_error = 1 - sel_out.metrics["val_acc"]
    test_error = sel_out.metrics["test_error"]
    gaps = [o.metrics["test_error"] - (1 - o.metrics["val_acc"]) for o in outputs.values()]
    low, high = stats.binomtest(sel_out.k, sel_out.m).proportion_ci(conf, method="exact")
    resolvable = summary.metrics.get("smallest_resolvable_difference", math.nan)
    text = (
        f"<p>Selected trial: validation error {val_error:.4f}, test error {test_error:.4f}, gap "
        f"(test − validation) <b>{test_error - val_error:+.4f}</b>; the mean gap over all "
        f"{len(gaps)} complete trials is {np.mean(gaps):+.4f}. The selected trial's validation "
        "accuracy is the best of N noisy estimates on one validation set, so in expectation it is optimistic "
        "(Cawley &amp; Talbot 2010); its test error, which played no part in the choice, is the "
        "honest estimate.</p>"
        f"<p>Resolution of one test error at m = {sel_out.m}: the {100 * conf:g} % Clopper–Pearson "
        f"half-width at the selected error is {(high - low) / 2:.4f}.</p>"
    )
    if summary.comparison is not None:
        cmp = summary.comparison
        text += (
            "<p>Smallest resolvable difference between two trials, as defined here: the smallest "
            "|error(A) − error(B)| for which the exact two-sided McNemar test rejects at level "
            f"δ = {1 - conf:.3g}, given the number of test points on which the two disagree. For "
            f"the selected trial and the runner-up ({cmp.n_discordant} disagreements of {cmp.m}) "
            f"it is <b>{_fmt(resolvable)}</b>"
            + (
                "; no split of so few disagreements is significant"
                if not math.isfinite(resolvable)
                else f" ({round(resolvable * cmp.m)} more errors for one model than the other)"
            )
            + ". A smaller true difference needs a larger test set or models that disagree less.</p>"
        )
    return text


def _provenance_html(cfg, study, outputs, sel_out, sources: PageSources) -> str:
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
    return table_html(rows, ("", ""))


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


def log_to_parent(mlflow, parent_run_id: str, page: Path, summary: StudySummary) -> None:
    """The page, its folder and the study-level numbers onto the study's parent run."""
    mlflow.log_artifact(parent_run_id, str(page))
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
    page, summary = write_study_page(cfg, study, reports_root / cfg.name, sources, mlflow)
    if mlflow is not None and parent is not None:
        log_to_parent(mlflow, parent, page, summary)
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
        page, summary = write_study_page(cfg, study, page_dir, sources, mlflow)
        log_to_parent(mlflow, parent_run_id, page, summary)
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
