"""The pages' HTML pieces: tables, embedded figures, the page frame and its style."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.evaluate import Evaluation


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
