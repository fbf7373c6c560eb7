"""The report pages as Jinja2 templates: escaping, one frame for every page, stable bytes.

Oracles: the standard library's ``html.escape`` (the spelling the pages have always used) and
``re`` over the package's source for markup built in Python.
"""

import dataclasses
import html
import math
import re
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from pipeline.data import load_split
from pipeline.evaluate import evaluate
from pipeline.model import build_mlp
from pipeline.report import html as pages
from pipeline.report import trial as trial_report
from pipeline.report.reruns import HISTORY_FILE, rerun_section_html
from pipeline.report.study_page import PageSources, write_study_page
from pipeline.train import Hyper, train
from tests.conftest import tiny_study

MARKUP = "<script>alert('x & \"y\"')</script>"
PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"
TEMPLATES = PACKAGE / "report" / "templates"
STYLE = re.compile(r"<style>.*?</style>", re.DOTALL)


@pytest.fixture(scope="module")
def trained():
    cfg = dataclasses.replace(tiny_study(), name=f"tiny{MARKUP}")  # a file's name cannot hold it
    split = load_split(cfg.dataset)
    model = build_mlp(split.input_dim, cfg.model.hidden, cfg.model.activation, seed=cfg.training.seed)
    result = dataclasses.replace(train(model, split, Hyper(lr=0.1), cfg.training), seconds=1.0)
    val = evaluate(model, split.x_val, split.y_val, split.classes, cfg.training.loss)
    test = evaluate(model, split.x_test, split.y_test, split.classes, cfg.training.loss)
    return cfg, split, model, result, val, test


def _trial_page(trained, folder: Path, monkeypatch) -> bytes:
    monkeypatch.setattr(trial_report, "TRUE_ERROR_SAMPLE", 100_000)  # the true error is not checked
    monkeypatch.setattr(trial_report, "BCA_RESAMPLES", 99)
    cfg, split, model, result, val, test = trained
    trial_report.bounds_and_report(
        folder=folder,
        cfg=cfg,
        split=split,
        model=model,
        trial_number=7,
        params={"lr": 0.1, "momentum": MARKUP},
        result=result,
        val=val,
        test=test,
        provenance={"git_commit": MARKUP},
    )
    return (folder / "report.html").read_bytes()


def _study(study_name: str) -> optuna.Study:
    """Two complete trials (no report folders) and one that failed with markup in its reason."""
    space = {"lr": FloatDistribution(0.01, 0.3, log=True), "momentum": CategoricalDistribution([0.0, 0.9])}
    study = optuna.create_study(study_name=study_name, direction="maximize")
    for number, lr in enumerate((0.05, 0.1)):
        study.add_trial(
            create_trial(
                value=0.7 + number / 10,
                params={"lr": lr, "momentum": 0.0},
                distributions=space,
                user_attrs={"val_acc": 0.7 + number / 10, "test_error": 0.3},
            )
        )
    study.add_trial(
        create_trial(
            state=TrialState.FAIL,
            params={"lr": 0.2, "momentum": 0.9},
            distributions=space,
            user_attrs={"reason": f"RuntimeError: {MARKUP}"},
        )
    )
    return study


def _study_page(tmp_path: Path, study: optuna.Study | None = None) -> str:
    cfg = dataclasses.replace(tiny_study(), name=f"tiny{MARKUP}")
    sources = PageSources(f"storage/{MARKUP}.journal", "sqlite:///mlflow.db", None, None)
    page, _, _ = write_study_page(cfg, study or _study(cfg.name), tmp_path / "reports" / "tiny", sources)
    return page.read_text(encoding="utf-8")


def test_markup_in_a_name_a_parameter_or_provenance_is_escaped_on_the_trial_page(
    trained, tmp_path, monkeypatch
):
    text = _trial_page(trained, tmp_path / "trial-0007", monkeypatch).decode()
    assert "<script>" not in text
    title = html.escape(f"tiny{MARKUP} trial 7")
    assert f"<title>{title}</title>" in text and f"<h1>{title}</h1>" in text
    assert f"<td>lr=0.1, momentum={html.escape(MARKUP)}</td>" in text
    assert f"<td>git_commit</td><td>{html.escape(MARKUP)}</td>" in text


def test_the_trial_page_is_the_same_bytes_when_rendered_twice(trained, tmp_path, monkeypatch):
    first = _trial_page(trained, tmp_path / "a" / "trial-0007", monkeypatch)
    second = _trial_page(trained, tmp_path / "b" / "trial-0007", monkeypatch)
    assert first == second
    assert first.count(b'src="data:image/png;base64,') >= 6  # every figure embedded, ground truth too


def test_markup_in_a_study_name_or_a_failure_reason_is_escaped_on_the_study_page(tmp_path):
    study = _study("tiny")
    text = _study_page(tmp_path, study)
    assert "<script>" not in text
    title = html.escape(f"Study tiny{MARKUP}")
    assert f"<title>{title}</title>" in text and f"<h1>{title}</h1>" in text
    assert f"<td>RuntimeError: {html.escape(MARKUP)}</td>" in text  # the trials table
    assert f"<td>Optuna storage</td><td>storage/{html.escape(MARKUP)}.journal</td>" in text
    assert _study_page(tmp_path, study) == text  # regenerated from the same storage: the same page


def test_every_page_has_the_base_templates_frame_and_style(trained, tmp_path, monkeypatch):
    base = (TEMPLATES / "base.html.j2").read_text(encoding="utf-8")
    style = STYLE.search(base).group()
    trial_page = _trial_page(trained, tmp_path / "trial-0007", monkeypatch).decode()
    for text in (trial_page, _study_page(tmp_path)):
        assert text.startswith("<!doctype html><html><head><meta charset='utf-8'><title>")
        assert text.endswith("\n</body></html>\n")
        assert len(re.findall(r"\n<h2>[^<]+</h2>\n", text)) == text.count("<h2>") >= 4  # the section frame
        assert STYLE.findall(text)[0] == style  # the study page adds one rule for its wide table
        assert text.count("<body>") == 1 and text.count("<h1>") == 1


def test_the_reruns_section_escapes_what_the_history_error_says(tmp_path):
    folder = tmp_path / "a<b>'c\"d"
    folder.mkdir()
    assert rerun_section_html(folder) is None  # never rerun: no section
    (folder / HISTORY_FILE).write_text('{"version": 1, "reruns": "<b>"}')
    section = rerun_section_html(folder)
    assert section.startswith("<p class='bad'>") and section.endswith("</p>")
    assert html.escape(str(folder / HISTORY_FILE)) in section  # &#x27; and &quot;, as html.escape
    assert "&#39;" not in section and "&#34;" not in section and "<b>" not in section


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.123456, "0.1235"),
        (np.float64(12345.678), "1.235e+04"),
        (math.nan, "—"),
        (-math.inf, "—"),
        (None, "—"),
        (pd.NA, "—"),
        (3, "3"),
        ("<b>", "<b>"),  # escaping is the template's job, not the filter's
    ],
)
def test_the_number_filter_shows_four_significant_digits_and_a_dash_when_missing(value, shown):
    assert pages.number(value) == shown


def test_a_table_cell_formats_python_floats_only():
    assert pages.cell(2 / 3) == "0.6667" and pages.cell(math.nan) == "—"
    assert pages.cell(np.float32(0.5)) == "0.5" and pages.cell(None) == "None"


def test_no_markup_is_built_in_python():
    """Every tag lives in a template: no html.escape, no f-string or string starting with a tag."""
    built = re.compile(r"html\.escape|\bimport html\b|\bf?[\"']<[a-zA-Z/!]|\.to_html\(")
    found = [
        f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if built.search(line)
    ]
    assert found == []
