"""The rerun history file (``reports/<study>/reruns.json``) and the study page's Reruns section.

The history's format lives here, below both its writer (``pipeline.ops.rerun``) and its reader
(the study page), so the page never imports the rerun machinery.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import files
from pipeline.report.figures import plot_reruns
from pipeline.report.html import Figure, figure, render

HISTORY_FILE = "reruns.json"


PLOT_FILE = "reruns.png"


HISTORY_VERSION = 1


class RerunError(RuntimeError):
    """A rerun that cannot proceed as asked (corrupt history, nothing to retrain)."""


def load_history(path: Path) -> list[dict[str, Any]]:
    """The records of earlier reruns, oldest first ([] when there is no history yet)."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data["reruns"]
        if data.get("version") != HISTORY_VERSION or not isinstance(records, list):
            raise ValueError(f"expected version {HISTORY_VERSION} with a list of reruns")
    except (ValueError, KeyError, TypeError) as exc:
        raise RerunError(
            f"{path}: not a rerun history ({exc}); move it aside to start a new history "
            "(the MLflow runs tagged rerun=true keep every earlier record)"
        ) from None
    return records


def save_history(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Write the whole history through a temporary file and a rename."""
    files.write_json(path, {"version": HISTORY_VERSION, "reruns": list(records)})


def params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


@dataclass(frozen=True)
class RerunSection:
    """What the study page's Reruns section shows (``reruns.html.j2``); ``error``: why not."""

    error: str = ""  # the history could not be read
    count: int = 0
    date: str = ""  # of the latest rerun
    verdict: str = ""  # the latest rerun's: "drift", "no drift" or "first"
    seeds: tuple[int, ...] = ()  # the latest rerun's training seeds
    confidence: float = 0.0
    plot: Figure = Figure("")
    rows: tuple[tuple[Any, ...], ...] = ()  # newest first


def rerun_section(reports_dir: Path) -> RerunSection | None:
    """The Reruns section's content for ``reports/<study>/``; None when it was never rerun."""
    try:
        history = load_history(Path(reports_dir) / HISTORY_FILE)
    except RerunError as exc:
        return RerunSection(error=str(exc))
    if not history:
        return None
    rows = []
    for r in history:
        d = r.get("drift", {})
        status = "first" if d.get("compared_with") is None else ("DRIFT" if d.get("detected") else "no drift")
        low, high = r["test_error_clopper_pearson"]
        rows.append(
            (
                r["date"],
                r["selected_trial"],
                params_text(r["selected_params"]),
                r["test_error_mean"],
                r["test_error_std"],
                f"{r['test_error_min']:.4f}–{r['test_error_max']:.4f}",
                f"[{low:.4f}, {high:.4f}]",
                r["new_trials"],
                status + (": " + "; ".join(d.get("reasons", ())) if d.get("detected") else ""),
                "; ".join(d.get("changes", ())),
            )
        )
    last = history[-1]
    latest = last.get("drift", {})
    verdict = "drift" if latest.get("detected") else "no drift" if latest.get("compared_with") else "first"
    with tempfile.TemporaryDirectory() as tmp:
        plot = figure(plot_reruns(history, Path(tmp) / PLOT_FILE))
    return RerunSection(
        count=len(history),
        date=last["date"],
        verdict=verdict,
        seeds=tuple(last["seeds"]),
        confidence=last["confidence"],
        plot=plot,
        rows=tuple(rows[::-1]),
    )


def rerun_section_html(reports_dir: Path) -> str | None:
    """The study page's "Reruns" section for ``reports/<study>/``; None when it was never rerun."""
    section = rerun_section(reports_dir)
    return None if section is None else render("reruns.html.j2", reruns=section)
