"""The rerun history (``reports/<study>/reruns.json``), its baselines' predictions, and the study
page's Reruns section.

The history's format lives here, below both its writer (``pipeline.ops.rerun``) and its reader
(the study page), so the page never imports the rerun machinery. A record that froze a baseline
has ``froze_baseline`` true and names the file beside the history that holds its replicates' test
logits (``rerun-baseline-<index>.npz``); every later record names the baseline it was tested
against by its index. Records written before baselines existed (no ``verdict``) are still read: a
history with no baseline among them gets one at the next rerun.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline import files
from pipeline.report.figures import plot_reruns
from pipeline.report.html import Figure, figure, render

HISTORY_FILE = "reruns.json"


PLOT_FILE = "reruns.png"


HISTORY_VERSION = 2  # 2: records carry a verdict against a baseline; version 1 files are still read


READABLE_VERSIONS = (1, 2)


class RerunError(RuntimeError):
    """A rerun that cannot proceed as asked (corrupt history, nothing to retrain)."""


def load_history(path: Path) -> list[dict[str, Any]]:
    """The records of earlier reruns, oldest first ([] when there is no history yet)."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data["reruns"]
        if data.get("version") not in READABLE_VERSIONS or not isinstance(records, list):
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


LOOKS_FILE = "rerun-looks.json"  # the reruns' ledger: written before each retrain is tested


def record_rerun_looks(reports_dir: Path, date: str, networks: int) -> None:
    """Enter a rerun's ``networks`` in the ledger before they are trained and tested, so a rerun
    that dies before its record still counts (one that dies before testing is over-counted: the
    simultaneous bounds only get more cautious)."""
    entries = _looks_entries(reports_dir)
    files.write_json(reports_dir / LOOKS_FILE, {"looks": [*entries, {"date": date, "networks": networks}]})


def _looks_entries(reports_dir: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((reports_dir / LOOKS_FILE).read_text(encoding="utf-8"))
        return [e for e in data["looks"] if isinstance(e, dict) and isinstance(e.get("networks"), int)]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def rerun_looks(reports_dir: Path) -> int:
    """Networks the reruns of a study retrained and evaluated on its test set (the ledger's rerun
    share): every ledger entry, plus one per replicate of each history record the ledger predates."""
    entries = _looks_entries(reports_dir)
    try:
        history = load_history(reports_dir / HISTORY_FILE)
    except RerunError:
        history = []
    entered = {e.get("date") for e in entries}
    older = sum(
        len(r.get("test_errors") or r.get("seeds") or ()) for r in history if r.get("date") not in entered
    )
    return sum(e["networks"] for e in entries) + older


def current_baseline(history: Sequence[Mapping[str, Any]]) -> int | None:
    """Index of the record holding the baseline in force (the latest that froze one), or None."""
    return next((i for i in range(len(history) - 1, -1, -1) if history[i].get("froze_baseline")), None)


def predictions_name(index: int) -> str:
    """The file beside the history holding the test logits of the baseline frozen by record ``index``."""
    return f"rerun-baseline-{index:04d}.npz"


def save_predictions(path: Path, logits: NDArray, seeds: Sequence[int]) -> Path:
    """A baseline's test logits [K, m, classes], in their training dtype, compressed, atomically."""
    return files.atomic_write(
        path, lambda handle: np.savez_compressed(handle, logits=logits, seeds=np.asarray(seeds))
    )


def load_predictions(path: Path) -> NDArray | None:
    """A baseline's stored test logits, or None when the file is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["logits"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def alpha_policy(record: Mapping[str, Any]) -> str:
    """The record's alpha policy in words."""
    if record.get("alpha_spending") == "bonferroni":
        return (
            f"Bonferroni over {record['planned']} planned reruns: each at α = {record['alpha_family']:g} "
            f"/ {record['planned']} = {record['alpha']:.3g}, so the chance of any false alarm over "
            f"the planned reruns is at most {record['alpha_family']:g}"
        )
    return (
        f"each rerun at α = {record['alpha']:g}: the false-alarm rate per rerun (over N reruns expect "
        f"about N · {record['alpha']:g} false alarms)"
    )


@dataclass(frozen=True)
class BaselineView:
    """The baseline in force, as the Reruns section shows it."""

    index: int
    date: str
    trial: int
    params: str
    seeds: tuple[int, ...]
    test_errors: tuple[float, ...]
    mean: float
    std: float
    reason: str  # why it was frozen
    provenance: str  # commit and versions it was trained with


@dataclass(frozen=True)
class RerunSection:
    """What the study page's Reruns section shows (``reruns.html.j2``); ``error``: why not."""

    error: str = ""  # the history could not be read
    count: int = 0
    date: str = ""  # of the latest rerun
    verdict: str = ""  # the latest record's (VERDICTS), or "old rule" for a record from before baselines
    reasons: str = ""  # the latest record's, in words
    baseline: BaselineView | None = None
    policy: str = ""  # the alpha policy in words
    test: str = ""  # the test in words
    plot: Figure = Figure("")
    rows: tuple[tuple[Any, ...], ...] = ()  # newest first


def _short_date(iso: str) -> str:
    """``2026-12-06T10:30:38+00:00`` as ``2026-12-06 10:30 UTC`` (a table cell that can wrap)."""
    if len(iso) >= 16 and iso[10] == "T" and iso.endswith("+00:00"):
        return f"{iso[:10]} {iso[11:16]} UTC"
    return iso


def _row(index: int, r: Mapping[str, Any]) -> tuple[Any, ...]:
    if "verdict" in r:  # a record with a baseline
        verdict = r["verdict"] + (f": {'; '.join(r['reasons'])}" if r.get("reasons") else "")
        baseline = "—" if r.get("baseline") is None else f"#{r['baseline']}"
        reproduced = "—" if r.get("reproduced") is None else ("yes" if r["reproduced"] else "no")
        p, alpha, changed = r.get("p_value"), r.get("alpha"), "; ".join(r.get("changes", ()))
    else:  # from before baselines: the old rule's verdict against the previous rerun
        d = r.get("drift", {})
        verdict = "old rule: " + (
            "first" if d.get("compared_with") is None else "drift" if d.get("detected") else "no drift"
        )
        baseline, reproduced, p, alpha = "—", "—", None, None
        changed = "; ".join(d.get("changes", ()))
    return (
        index,
        _short_date(r["date"]),
        r["selected_trial"],
        params_text(r["selected_params"]),
        r["test_error_mean"],
        r["test_error_std"],
        f"{r['test_error_min']:.4f}–{r['test_error_max']:.4f}",
        r["new_trials"],
        baseline,
        verdict,
        "—" if p is None else f"{p:.3g}",
        "—" if alpha is None else f"{alpha:.3g}",
        reproduced,
        changed,
    )


def _baseline_view(history: Sequence[Mapping[str, Any]]) -> BaselineView | None:
    index = current_baseline(history)
    if index is None:
        return None
    b = history[index]
    prov = b.get("provenance", {})
    return BaselineView(
        index=index,
        date=b["date"],
        trial=b["selected_trial"],
        params=params_text(b["selected_params"]),
        seeds=tuple(b["seeds"]),
        test_errors=tuple(b["test_errors"]),
        mean=b["test_error_mean"],
        std=b["test_error_std"],
        reason=b.get("baseline_reason", ""),
        provenance=", ".join(
            f"{k} {prov[k]}" for k in ("git_commit", "torch", "numpy", "device") if k in prov
        ),
    )


def rerun_section(reports_dir: Path) -> RerunSection | None:
    """The Reruns section's content for ``reports/<study>/``; None when it was never rerun."""
    try:
        history = load_history(Path(reports_dir) / HISTORY_FILE)
    except RerunError as exc:
        return RerunSection(error=str(exc))
    if not history:
        return None
    last = history[-1]
    with tempfile.TemporaryDirectory() as tmp:
        plot = figure(plot_reruns(history, Path(tmp) / PLOT_FILE))
    return RerunSection(
        count=len(history),
        date=last["date"],
        verdict=last.get("verdict", "old rule"),
        reasons="; ".join(last.get("reasons", ())),
        baseline=_baseline_view(history),
        policy=alpha_policy(last) if "alpha" in last else "",
        test=last.get("test", ""),
        plot=plot,
        rows=tuple(_row(i, r) for i, r in reversed(list(enumerate(history)))),
    )


def rerun_section_html(reports_dir: Path) -> str | None:
    """The study page's "Reruns" section for ``reports/<study>/``; None when it was never rerun."""
    section = rerun_section(reports_dir)
    return None if section is None else render("reruns.html.j2", reruns=section)
