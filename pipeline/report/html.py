"""The pages' Jinja2 environment: the templates in ``templates/``, autoescaped, and their filters.

Python prepares each page's context (frozen dataclasses of plain values: rows, numbers, strings,
embedded figures); the templates hold every tag. The same context renders to the same bytes.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from pipeline.evaluate import Evaluation

ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("pipeline.report", "templates"),
    autoescape=True,  # every {{ value }} is escaped unless it is already markup (a macro's output)
    undefined=jinja2.StrictUndefined,  # a misspelt name fails the page instead of printing nothing
    trim_blocks=True,  # a line holding only a {% tag %} leaves nothing behind, not even its newline
    lstrip_blocks=True,
    keep_trailing_newline=True,
)

# markupsafe spells ' and " as &#39; and &#34;; the pages have always used the standard library's
# &#x27; and &quot;. Escaping turns every & into &amp; and no template writes either spelling, so in a
# rendered page they only ever come from escaping: respelling them changes no meaning.
_ENTITIES = {"&#39;": "&#x27;", "&#34;": "&quot;"}


@dataclass(frozen=True)
class Figure:
    """A PNG embedded as a data URI (``src``; "" when nothing was drawn) and the plotter's note."""

    src: str
    note: str = ""


def number(value: Any, digits: int = 4) -> str:
    """A value as the pages show it: floats to ``digits`` significant digits, "—" when missing."""
    if value is None or value is pd.NA:
        return "—"
    if isinstance(value, (float, np.floating)):
        return "—" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def cell(value: Any) -> str:
    """A table cell: Python floats as ``number`` shows them, anything else as its text."""
    return number(value) if isinstance(value, float) else str(value)


def data_uri(path: Path) -> str:
    """The PNG at ``path`` as a data URI, so the page stands alone (the file is also beside it)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def figure(path: Path | None, note: str = "") -> Figure:
    """The figure at ``path`` embedded, or only ``note`` when nothing was drawn (``path`` None)."""
    return Figure(data_uri(path) if path is not None else "", note)


def classification_rows(evaluation: Evaluation) -> tuple[tuple[Any, ...], ...]:
    """sklearn's classification report as (class, precision, recall, F1, support) rows."""
    rows = []
    for name, values in evaluation.report.items():
        if isinstance(values, dict):
            rows.append(
                (name, values["precision"], values["recall"], values["f1-score"], int(values["support"]))
            )
        else:
            rows.append((name, "", "", values, int(sum(evaluation.confusion.ravel()))))
    return tuple(rows)


ENV.filters.update(
    number=number,
    cell=cell,
    fmt=format,  # {{ x|fmt(".4f") }} is f"{x:.4f}"
)


def render(template_name: str, **context: Any) -> str:
    """Render ``templates/<template_name>`` with ``context``."""
    text = ENV.get_template(template_name).render(**context)
    for markupsafe_spelling, page_spelling in _ENTITIES.items():
        text = text.replace(markupsafe_spelling, page_spelling)
    return text
