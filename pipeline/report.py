"""Report stage: per-trial figures, ``metrics.json`` and a self-contained ``report.html``.

A report folder is built under a temporary name and renamed into place, so a crash never leaves
a half-written report that looks complete.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

from pipeline.evaluate import Evaluation
from pipeline.files import save_figure
from pipeline.train import EpochRecord


def plot_confusion(evaluation: Evaluation, classes: Sequence[str], path: Path, title: str) -> Path:
    fig = Figure(figsize=(4.2, 3.6))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(evaluation.confusion, display_labels=list(classes)).plot(
        ax=ax, colorbar=False, values_format="d"
    )
    ax.set_title(title)
    return save_figure(fig, path)


def plot_curves(history: Sequence[EpochRecord], path: Path) -> Path:
    """Loss and accuracy per epoch, train and validation."""
    epochs = [r.epoch for r in history]
    fig = Figure(figsize=(9, 3.4))
    for ax, key, label in (
        (fig.add_subplot(1, 2, 1), "loss", "loss"),
        (fig.add_subplot(1, 2, 2), "acc", "accuracy"),
    ):
        ax.plot(epochs, [getattr(r, f"train_{key}") for r in history], "o-", ms=2, label="train")
        ax.plot(epochs, [getattr(r, f"val_{key}") for r in history], "o-", ms=2, label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def table_html(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "—" if not math.isfinite(v) else f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def classification_table(evaluation: Evaluation) -> str:
    rows = []
    for name, values in evaluation.report.items():
        if isinstance(values, dict):
            rows.append(
                (name, values["precision"], values["recall"], values["f1-score"], int(values["support"]))
            )
        else:
            rows.append((name, "", "", values, int(sum(evaluation.confusion.ravel()))))
    return table_html(rows, ("class", "precision", "recall", "F1", "support"))


def image_html(path: Path, alt: str) -> str:
    """An <img> with the PNG embedded, so the page stands alone (the file is also beside it)."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}
.note{color:#555;font-size:.92em}.bad{color:#a00}.good{color:#070}code{background:#f5f5f5}
"""


def html_page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{content}\n" for h, content in sections)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}</body></html>\n"
    )
