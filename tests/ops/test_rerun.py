"""Scheduled reruns: the lock, idempotence, the baseline and its drift test, verdicts and exit codes.

Oracles: Optuna's storage (trial counts, the best trial), MLflow's store (the rerun runs' tags,
metrics and status), scipy's exact binomial interval, scipy's permutation test, numpy statistics,
the kernel (a SIGKILLed lock holder), and the selected trial itself: retrained with the study's own
training seed, the rerun must reproduce the trial's test error exactly.
"""

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from scipy import stats

from pipeline import cli
from pipeline.config import ConfigError, RerunConfig
from pipeline.ops import drift, rerun
from pipeline.ops.drift import changes, compare, freeze, permutation_p_value, permutation_p_values
from pipeline.ops.rerun import (
    EXIT_DRIFT,
    EXIT_FAILED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_USAGE,
    HISTORY_FILE,
    RerunLocked,
    run_rerun,
    study_lock,
)
from pipeline.ops.schedule import cron_line, parse_cron, rerun_command
from pipeline.report.reruns import rerun_section_html, save_history
from pipeline.storage import open_storage
from tests.conftest import TINY, tiny_study

DAY1 = dt.datetime(2026, 11, 1, 3, 0, tzinfo=dt.UTC)
DAY2 = dt.datetime(2026, 11, 2, 3, 0, tzinfo=dt.UTC)


def _rerun(cfg, ws, **kw):
    return run_rerun(
        cfg,
        storage=ws["storage"],
        tracking_uri=ws["tracking_uri"],
        reports_root=ws["reports_root"],
        progress=False,
        **kw,
    )


def _trials(ws, name="tiny"):
    return optuna.load_study(study_name=name, storage=open_storage(ws["storage"])).trials


def _history(ws, name="tiny"):
    return json.loads((ws["reports_root"] / name / HISTORY_FILE).read_text())["reruns"]


def _rerun_runs(ws, name="tiny"):
    client = MlflowClient(ws["tracking_uri"])
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], filter_string="tags.rerun = 'true'")


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def write_tiny_toml(path: Path, **tables) -> Path:
    """The conftest's tiny study as a TOML file, with whole tables added or replaced."""
    raw = {**TINY, **tables}
    lines = [f"{k} = {_toml_value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for table, values in raw.items():
        if isinstance(values, dict):
            lines.append(f"\n[{table}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cli(ws, *args):
    return cli.main(["rerun", *args, "--storage", ws["storage"], "--tracking-uri", ws["tracking_uri"]])


@pytest.fixture
def project(workspace, monkeypatch):
    """The workspace as the current folder (the command line writes reports/ there), with a study file."""
    (workspace["root"] / "mlruns").mkdir(exist_ok=True)
    monkeypatch.chdir(workspace["root"])
    write_tiny_toml(workspace["root"] / "tiny.toml", trials=1, rerun={"seeds": 2})
    return workspace


# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rerun_twice_reproduces_the_selection_adds_a_record_and_no_trials(workspace):
    (workspace["root"] / "mlruns").mkdir()
    # first_seed = 0 is the study's own training seed: seed 0 must reproduce the trial exactly
    cfg = tiny_study(trials=1, rerun={"seeds": 3, "first_seed": 0})
    first = _rerun(cfg, workspace, now=DAY1)
    assert len(_trials(workspace)) == 1
    best = optuna.load_study(study_name="tiny", storage=open_storage(workspace["storage"])).best_trial
    rec = first.record
    assert rec["selected_trial"] == best.number and rec["selected_params"] == best.params
    assert rec["seeds"] == [0, 1, 2] and rec["new_trials"] == 1
    assert rec["test_errors"][0] == best.user_attrs["test_error"]  # the trial, retrained
    assert rec["selected_test_error_clopper_pearson"] == [
        best.user_attrs["test_error_clopper_pearson_low"],
        best.user_attrs["test_error_clopper_pearson_high"],
    ]
    errors = np.array(rec["test_errors"])
    assert rec["test_error_mean"] == pytest.approx(errors.mean())
    assert rec["test_error_std"] == pytest.approx(errors.std(ddof=1))
    assert (rec["test_error_min"], rec["test_error_max"]) == (errors.min(), errors.max())
    m = rec["test_m"]
    assert m == 300
    k = round(np.mean([round(e * m) for e in errors]))
    ci = stats.binomtest(k, m).proportion_ci(0.9, method="exact")
    assert rec["test_error_clopper_pearson"] == pytest.approx([ci.low, ci.high])
    assert first.verdict.verdict == "baseline" and first.verdict.froze_baseline
    assert rec["baseline"] is None and rec["baseline_reason"] == "first rerun" and rec["p_value"] is None
    folder = workspace["reports_root"] / "tiny"
    with np.load(folder / rec["predictions_file"]) as stored:  # the baseline's test logits, kept
        assert stored["logits"].shape == (3, 300, 2) and list(stored["seeds"]) == [0, 1, 2]

    second = _rerun(cfg, workspace, now=DAY2)
    assert len(_trials(workspace)) == 1  # no duplicate trials
    history = _history(workspace)
    assert [r["date"] for r in history] == [DAY1.isoformat(), DAY2.isoformat()]
    assert second.record["test_errors"] == rec["test_errors"]  # fixed seeds: the same numbers
    assert second.record["new_trials"] == 0
    assert second.verdict.verdict == "reproduced" and second.verdict.reproduced
    assert second.record["baseline"] == 0 and second.record["p_value"] == 1.0
    assert second.record["label_changes"] == [0, 0, 0] and second.verdict.changes == ()
    assert "predictions_file" not in second.record  # only a baseline keeps its predictions

    client, runs = _rerun_runs(workspace)
    assert len(runs) == 2
    by_id = {r.info.run_id: r for r in runs}
    run = by_id[second.run_id]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_error_mean"] == pytest.approx(second.record["test_error_mean"])
    assert run.data.metrics["drift"] == 0.0 and run.data.tags["drift"] == "false"
    assert run.data.tags["verdict"] == "reproduced" and run.data.metrics["p_value"] == 1.0
    for key in ("git_commit", "torch", "optuna", "split_hash", "config_hash", "rerun_date", "torch_threads"):
        assert key in run.data.tags
    assert run.data.tags["selected_trial"] == str(best.number)
    assert sorted(m.step for m in client.get_metric_history(second.run_id, "seed_test_error")) == [0, 1, 2]
    assert {"rerun.json", "reruns.png"} <= {a.path for a in client.list_artifacts(second.run_id)}
    assert rec["predictions_file"] in {a.path for a in client.list_artifacts(first.run_id)}
    # reruns are runs of their own: the study still has one parent run
    exp = client.get_experiment_by_name("tiny")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.pipeline_role = 'study'")
    assert len(parents) == 1

    assert (folder / "reruns.png").stat().st_size > 0
    assert "reproduced baseline #0" in (folder / "rerun.log").read_text()
    section = rerun_section_html(folder)
    assert section.count("<tr>") == 3 and "reproduced" in section and "data:image/png" in section
    assert "Baseline: record #0" in section
    assert rerun_section_html(workspace["root"]) is None
    # the study page is refreshed after each rerun and carries the same section
    assert section in (folder / "index.html").read_text()

    # a raised trial target continues the study; a new selection is its own kind of change
    third = _rerun(tiny_study(trials=1, rerun={"seeds": 3, "first_seed": 0, "trials": 2}), workspace)
    assert len(_trials(workspace)) == 2 and third.record["new_trials"] == 1
    moved = third.record["selected_params"] != rec["selected_params"]
    assert third.verdict.verdict == ("selection_changed" if moved else "reproduced")
    assert "trials_target: 1 → 2" in third.verdict.changes


# ----------------------------------------------------------------------------------------------
# The test and the verdicts, on constructed records


def _record(k, seeds=None, params=None, **extra):
    """A reruns.json record with error counts ``k`` out of 300 (what compare and freeze read)."""
    return {
        "date": "2026-11-01T03:00:00+00:00",
        "selected_trial": 4,
        "selected_params": params or {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
        "seeds": list(seeds or range(1, len(k) + 1)),
        "test_k": list(k),
        "test_m": 300,
        "predictions_sha256": [f"digest-{i}" for i in range(len(k))],
        "split_hash": "aaaa",
        "config_hash": "cccc",
        "trials_target": 8,
        "provenance": {"git_commit": "abc", "torch": "2.14.1", "torch_threads": "2"},
        **extra,
    }


def _logits(k, shift=0.0):
    """Test logits whose class-1 predictions are the first k of 300 points, one row per replicate."""
    out = np.zeros((len(k), 300, 2), dtype=np.float32)
    for i, n in enumerate(k):
        out[i, :n, 1] = 1.0 + shift
    return out


def _mean_difference(x, y, axis):
    return np.mean(y, axis=axis) - np.mean(x, axis=axis)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([52, 60, 61, 75, 58], [64, 70, 66, 80, 71]),  # 5 vs 5: 252 splits
        ([10, 10, 11, 12], [10, 13, 13, 15, 16]),  # unequal sizes, ties
        (list(range(100, 110)), list(range(103, 113))),  # 10 vs 10: all 184 756 splits
        ([7, 7, 7], [7, 7, 7]),  # identical: p = 1
    ],
)
def test_permutation_p_value_is_scipys_exact_permutation_test(a, b):
    oracle = stats.permutation_test(
        (a, b), _mean_difference, permutation_type="independent", n_resamples=np.inf, vectorized=True
    )
    assert permutation_p_value(np.array(a), np.array(b)) == pytest.approx(oracle.pvalue, rel=1e-12)


def test_permutation_p_values_row_by_row_and_by_random_splits():
    rng = np.random.default_rng(3)
    a, b = rng.integers(40, 60, (6, 6)), rng.integers(45, 70, (6, 6))
    rows = permutation_p_values(a, b)
    exact = [
        stats.permutation_test((x, y), _mean_difference, n_resamples=np.inf, vectorized=True).pvalue
        for x, y in zip(a, b, strict=True)
    ]
    assert rows == pytest.approx(exact, rel=1e-12)
    # past the exact limit: seeded random splits, within Monte Carlo error of the exact p-value
    sampled = permutation_p_values(a, b, rng=np.random.default_rng(0), exact_limit=100, resamples=40_000)
    assert np.abs(sampled - exact).max() < 4 * np.sqrt(0.25 / 40_000) * 2
    with pytest.raises(ValueError, match="pass an rng"):
        permutation_p_values(a, b, exact_limit=100)
    # float test errors give the p-value of their counts
    assert permutation_p_value(a[0] / 300, b[0] / 300) == pytest.approx(rows[0], rel=1e-12)


NONE = RerunConfig(seeds=10)


def test_verdicts_reproduced_consistent_drift():
    k = list(range(100, 110))
    base, stored = _record(k), _logits(k)
    same = compare(base, 0, _record(k), _logits(k), stored, NONE, 1, np.random.default_rng(0))
    assert (same.verdict, same.reproduced, same.p_value, same.baseline) == ("reproduced", True, 1.0, 0)
    assert same.label_changes == (0,) * 10 and same.changes == ()

    # the same error counts from logits that moved in their last bits: consistent, and why
    moved = _record(k, provenance={"git_commit": "abc", "torch": "2.15.0", "torch_threads": "1"})
    near = compare(base, 0, moved, _logits(k, 1e-6), stored, NONE, 2, np.random.default_rng(0))
    assert (near.verdict, near.reproduced, near.p_value) == ("consistent", False, 1.0)
    assert near.changes == ("torch: 2.14.1 → 2.15.0", "torch_threads: 2 → 1") and near.comparison == 2

    # bitwise the same predictions from another torch: not a reproduction (other code), consistent
    upgraded = _record(k, provenance={"git_commit": "abc", "torch": "2.15.0", "torch_threads": "2"})
    same_bits = compare(base, 0, upgraded, _logits(k), stored, NONE, 2, np.random.default_rng(0))
    assert (same_bits.verdict, same_bits.reproduced, same_bits.p_value) == ("consistent", True, 1.0)
    assert "from other code or versions (torch: 2.14.1 → 2.15.0)" in same_bits.reasons[0]
    # the host or the thread count is not code: identical predictions there are still reproduced
    elsewhere = _record(k, provenance={"git_commit": "abc", "torch": "2.14.1", "torch_threads": "1"})
    assert compare(base, 0, elsewhere, _logits(k), stored, NONE, 2, None).verdict == "reproduced"

    # errors up by 5 counts on every replicate: drift, with scipy's p-value
    up = [n + 5 for n in k]
    shifted = compare(base, 0, _record(up), _logits(up), stored, NONE, 1, np.random.default_rng(0))
    oracle = stats.permutation_test((k, up), _mean_difference, n_resamples=np.inf, vectorized=True)
    assert shifted.verdict == "drift" and shifted.p_value == pytest.approx(oracle.pvalue, rel=1e-12)
    assert shifted.p_value <= 0.01 and shifted.alpha == 0.01 and shifted.label_changes == (5,) * 10
    assert "mean test error 0.3483 → 0.3650" in shifted.reasons[0]

    # the baseline's predictions file lost: the digests decide reproduced
    lost = compare(base, 0, _record(k), _logits(k), None, NONE, 1, np.random.default_rng(0))
    assert lost.verdict == "reproduced" and lost.label_changes is None
    other = _record(k, predictions_sha256=["x"] * 10)
    assert (
        compare(base, 0, other, _logits(k), None, NONE, 1, np.random.default_rng(0)).verdict == "consistent"
    )

    # too few replicates for the test to ever reach alpha: said so
    few = compare(_record([1, 2]), 0, _record([50, 60]), _logits([50, 60]), None, NONE, 1, None)
    assert few.verdict == "consistent" and "can never flag drift" in few.reasons[-1]


def test_bonferroni_tests_each_rerun_at_alpha_over_planned():
    k, up = list(range(100, 110)), list(range(105, 115))  # p = 0.0027: below 0.01, above 0.01 / 10
    spending = RerunConfig(seeds=10, alpha_spending="bonferroni", planned=10)
    assert spending.alpha_per_rerun == pytest.approx(0.001)
    args = (_record(k), 0, _record(up), _logits(up), _logits(k))
    plain = compare(*args, NONE, 1, np.random.default_rng(0))
    spent = compare(*args, spending, 1, np.random.default_rng(0))
    assert plain.p_value == spent.p_value == pytest.approx(0.0027062720561172576)
    assert (plain.verdict, plain.alpha) == ("drift", 0.01)
    assert (spent.verdict, spent.alpha) == ("consistent", pytest.approx(0.001))
    beyond = compare(*args, spending, 11, np.random.default_rng(0))  # the 11th of 10 planned
    assert "beyond the 10 planned" in beyond.reasons[-1]
    # the study file: alpha / planned each rerun, and a test that can reach it
    cfg = tiny_study(rerun={"alpha_spending": "bonferroni", "planned": 365})
    assert cfg.rerun.alpha_per_rerun == pytest.approx(0.01 / 365)


def test_a_new_selection_freezes_a_new_baseline_and_is_not_drift():
    base = _record([100, 101], params={"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0})
    current = _record([130, 140], params={"lr": 0.2, "momentum": 0.0, "weight_decay": 0.0}, selected_trial=9)
    v = freeze("the selected configuration changed", 0.01, base, 3, current)
    assert (v.verdict, v.froze_baseline, v.baseline, v.previous_baseline) == (
        "selection_changed",
        True,
        None,
        3,
    )
    assert v.p_value is None and not v.drift
    assert v.reasons == (
        "selected configuration changed: trial 4 (lr=0.05, momentum=0.9, weight_decay=0) → trial 9 "
        "(lr=0.2, momentum=0, weight_decay=0); a new baseline is frozen for it",
    )
    same = freeze("--rebaseline", 0.01, base, 3, _record([120, 121], selected_trial=9))
    assert same.verdict == "baseline" and same.previous_baseline == 3 and same.reasons == ()
    assert freeze("first rerun", 0.01).to_dict()["baseline_reason"] == "first rerun"
    moved = _record([1, 2], split_hash="bbbb", provenance={"git_commit": "def", "torch": "2.14.1"})
    assert changes(base, moved) == (
        "split_hash: aaaa → bbbb",
        "git_commit: abc → def",
        "torch_threads: 2 → None",
    )


def test_the_reruns_section_shows_baseline_verdicts_p_values_and_old_records(tmp_path):
    common = {
        "study": "tiny",
        "test_error_mean": 0.35,
        "test_error_std": 0.01,
        "test_error_min": 0.34,
        "test_error_max": 0.36,
        "test_errors": [0.34, 0.35, 0.36],
        "new_trials": 0,
        "alpha_family": 0.01,
        "alpha_spending": "none",
        "planned": 0,
        "test": "two-sided permutation test",
    }
    baseline = _record([102, 105, 108], **common, **freeze("first rerun", 0.01).to_dict())
    tested = []
    for verdict, p in (("reproduced", 1.0), ("consistent", 0.4), ("drift", 0.004)):
        v = drift.Verdict(verdict, 1, 0.01, p_value=p, reproduced=verdict == "reproduced", comparison=1)
        tested.append(_record([102, 105, 108], **common, **v.to_dict()))
    history = [OLD_RECORD, baseline, *tested]
    save_history(tmp_path / HISTORY_FILE, history)
    section = rerun_section_html(tmp_path)
    assert "the latest (2026-11-01T03:00:00+00:00): <span class='bad'>drift</span>" in section
    assert "Baseline: record #1" in section and "seeds 1, 2, 3" in section
    assert "each rerun at α = 0.01" in section
    rows = section.split("<tr>")[2:]  # newest first, after the header
    assert [row.split("</td>")[9].removeprefix("<td>") for row in rows] == [
        "drift",
        "consistent",
        "reproduced",
        "baseline",
        "old rule: first",
    ]
    assert "<td>0.004</td><td>0.01</td><td>no</td>" in rows[0]
    assert "<td>1</td><td>0.01</td><td>yes</td>" in rows[2]
    assert "data:image/png" in section


def test_rerun_table_is_validated():
    defaults = tiny_study().rerun
    assert (defaults.seeds, defaults.first_seed, defaults.alpha) == (10, 1, 0.01)
    assert (defaults.alpha_spending, defaults.planned, defaults.alpha_per_rerun) == ("none", 0, 0.01)
    with pytest.raises(ConfigError, match=r"rerun\.seeds = 1: must be >= 2"):
        tiny_study(rerun={"seeds": 1})
    with pytest.raises(ConfigError, match=r"unknown key rerun\.seed;"):
        tiny_study(rerun={"seed": 3})
    with pytest.raises(ConfigError, match=r"rerun\.trials = -1"):
        tiny_study(rerun={"trials": -1})
    with pytest.raises(ConfigError, match=r"use seeds >= 6, or a larger alpha"):  # 2 / C(10, 5) > 0.005
        tiny_study(rerun={"seeds": 5, "alpha_spending": "bonferroni", "planned": 2})
    assert tiny_study(rerun={"seeds": 6, "alpha_spending": "bonferroni", "planned": 2}).rerun.planned == 2


# ----------------------------------------------------------------------------------------------
# Verdicts and exit codes, through the command line

OLD_RECORD = {  # a reruns.json record from before baselines, as the old rule wrote it
    "date": "2026-10-31T03:00:00+00:00",
    "study": "tiny",
    "selected_trial": 0,
    "selected_params": {"lr": 0.01, "momentum": 0.0, "weight_decay": 50.0},
    "test_errors": [0.52, 0.52],
    "test_error_mean": 0.52,
    "test_error_std": 0.0,
    "test_error_min": 0.52,
    "test_error_max": 0.52,
    "test_error_clopper_pearson": [0.47, 0.57],
    "new_trials": 1,
    "confidence": 0.9,
    "seeds": [1, 2],
    "drift": {"compared_with": None, "detected": False, "changes": []},
}


def _edit_baseline(ws, index, **changes):
    path = ws["reports_root"] / "tiny" / HISTORY_FILE
    data = json.loads(path.read_text())
    data["reruns"][index].update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.slow
def test_verdicts_and_exit_codes(project, capsys, monkeypatch):
    """A seed-stable configuration (weight decay pulls every seed's weights to one point within 10
    full-batch steps: the same test error from every seed, logits that still differ bitwise): other
    seeds are consistent; a constructed shift is drift; a new selection freezes its own baseline."""
    stable = {"lr": {"value": 0.01}, "momentum": {"value": 0.0}, "weight_decay": {"value": 50.0}}
    write_tiny_toml(
        project["root"] / "stable.toml",
        trials=1,
        training={"epochs": 10, "batch_size": 0, "seed": 0},
        search=stable,
        rerun={"seeds": 5},
    )
    folder = project["reports_root"] / "tiny"
    folder.mkdir(parents=True)
    (folder / HISTORY_FILE).write_text(json.dumps({"version": 1, "reruns": [OLD_RECORD]}))

    # a history from before baselines is read, and the next rerun freezes one
    assert _cli(project, "stable.toml") == EXIT_OK
    assert "baseline frozen (the history's records predate baselines)" in capsys.readouterr().out
    history = _history(project)
    assert len(history) == 2 and history[1]["froze_baseline"] and history[1]["baseline"] is None
    assert len(set(history[1]["test_k"])) == 1  # seed-stable: one test error from every seed
    assert (folder / "rerun-baseline-0001.npz").is_file()

    # other seeds (and another torch, as the provenance says): the numbers moved, not significantly
    _edit_baseline(project, 1, seeds=[21, 22, 23, 24, 25])
    real = rerun.tracking.provenance
    with monkeypatch.context() as patch:
        patch.setattr(rerun.tracking, "provenance", lambda *device: {**real(*device), "torch": "9.9.9"})
        assert _cli(project, "stable.toml") == EXIT_OK
    out = capsys.readouterr().out
    last = _history(project)[-1]
    assert (last["verdict"], last["reproduced"], last["p_value"], last["baseline"]) == (
        "consistent",
        False,
        1.0,
        1,
    )
    assert last["seeds"] == [21, 22, 23, 24, 25]  # the baseline's seed list, not the file's
    assert "consistent with baseline #1: " in out and "p = 1 > alpha = 0.01" in out
    assert f"torch: {real()['torch']} → 9.9.9" in out

    # a constructed shift: the baseline claims no test errors at all
    _edit_baseline(project, 1, test_k=[0] * 5, test_errors=[0.0] * 5)
    assert _cli(project, "stable.toml") == EXIT_DRIFT
    out = capsys.readouterr().out
    assert "DRIFT from baseline #1: mean test error 0.0000 → " in out
    assert "p = 0.00794 <= alpha = 0.01" in out  # 2 / C(10, 5): the most extreme of 252 splits
    assert _history(project)[-1]["p_value"] == pytest.approx(2 / 252)
    _, runs = _rerun_runs(project)
    assert sorted(r.data.tags["verdict"] for r in runs) == ["baseline", "consistent", "drift"]

    # a failure: exit 1, the traceback in rerun.log, the MLflow run FAILED, no record, lock released
    def boom(*args, **kwargs):
        raise RuntimeError("boom while retraining")

    with monkeypatch.context() as patch:
        patch.setattr(drift, "train_population", boom)
        assert _cli(project, "stable.toml") == EXIT_FAILED
    assert "boom while retraining" in capsys.readouterr().err
    log = (folder / "rerun.log").read_text()
    assert "RuntimeError: boom while retraining" in log and "Traceback" in log
    assert len(_history(project)) == 4
    _, runs = _rerun_runs(project)
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    with study_lock(folder):
        pass

    # the baseline says another configuration was selected: a selection change, never drift
    _edit_baseline(project, 1, selected_params={**OLD_RECORD["selected_params"], "lr": 0.02})
    assert _cli(project, "stable.toml") == EXIT_OK
    out = capsys.readouterr().out
    assert "SELECTION CHANGED: selected configuration changed: trial 0 (lr=0.02, momentum=0, " in out
    assert "→ trial 0 (lr=0.01, momentum=0, weight_decay=50); a new baseline is frozen for it" in out
    last = _history(project)[-1]
    assert (last["verdict"], last["froze_baseline"], last["previous_baseline"]) == (
        "selection_changed",
        True,
        1,
    )
    assert last["seeds"] == [1, 2, 3, 4, 5] and (folder / "rerun-baseline-0004.npz").is_file()

    # --rebaseline freezes the next one on purpose; the rerun after it is tested against that
    assert _cli(project, "stable.toml", "--rebaseline") == EXIT_OK
    assert "baseline frozen (--rebaseline)" in capsys.readouterr().out
    assert _history(project)[-1]["previous_baseline"] == 4
    section = rerun_section_html(folder)
    for shown in ("selection_changed", "consistent", "drift", "old rule: first", "Baseline: record #5"):
        assert shown in section

    # a history that is not one is bad input: exit 2, and nothing else is touched
    (folder / HISTORY_FILE).write_text("{not json")
    assert _cli(project, "stable.toml") == EXIT_USAGE
    assert "not a rerun history" in capsys.readouterr().err
    assert len(_trials(project)) == 1 and len(_rerun_runs(project)[1]) == 6


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"seeds": 0}, "rerun.seeds = 0: must be >= 2"),
        ({"alpha": 1.5}, "rerun.alpha = 1.5: must be strictly between 0 and 1"),
        ({"alpha": 0.0}, "rerun.alpha = 0.0: must be strictly between 0 and 1"),
        ({"alpha": "low"}, "rerun.alpha = 'low': expected float, got str"),
        ({"alpha_spending": "holm"}, "rerun.alpha_spending = 'holm': must be 'none' (each rerun tests"),
        ({"alpha_spending": "bonferroni"}, "rerun.planned = 0: alpha_spending = 'bonferroni' tests each"),
        ({"planned": 365}, "rerun.planned = 365: is only used with alpha_spending = 'bonferroni'"),
        ({"planned": -1}, "rerun.planned = -1: must be >= 0"),
        (
            {"alpha_spending": "bonferroni", "planned": 365, "seeds": 5},
            "rerun.seeds = 5: with alpha_spending = 'bonferroni' each rerun tests at alpha / planned = "
            "0.01 / 365 = 2.74e-05, but 5 replicates against 5 give no p-value below 0.00794, so drift "
            "could never be flagged; use seeds >= 10, or a larger alpha or a smaller planned",
        ),
    ],
)
def test_bad_rerun_keys_are_exit_2_naming_the_key(project, capsys, table, message):
    write_tiny_toml(project["root"] / "bad.toml", rerun=table)
    assert _cli(project, "bad.toml") == EXIT_USAGE
    assert capsys.readouterr().err.startswith(f"error: bad.toml: {message}")
    assert not (project["reports_root"] / "tiny").exists()  # nothing was written


# ----------------------------------------------------------------------------------------------
# The lock


def _wait_for_lock(
    folder: Path, proc: subprocess.Popen, pid: int | None = None, timeout: float = 180
) -> None:
    """Poll until the lock file names ``pid`` (any pid if None): the holder has the lock by then."""
    lock = folder / rerun.LOCK_FILE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = lock.read_text() if lock.exists() else ""
        if (f"pid {pid} " if pid else "pid ") in text:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the holder exited early with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError("the holder never took the lock")


@pytest.mark.reliability
def test_lock_concurrent_reruns_and_a_killed_holder(project, capsys):
    """Two reruns at once: one runs, the other exits with the lock code at once. A holder killed
    with SIGKILL leaves the lock file but not the lock. The first rerun is started exactly as cron
    would start it: the command of the crontab line ``pipeline schedule`` installs.
    """
    root = project["root"]
    folder = root / "reports" / "tiny"
    options = {"storage": project["storage"], "tracking_uri": project["tracking_uri"]}
    line = cron_line(parse_cron("0 3 * * *"), "tiny", rerun_command(Path("tiny.toml"), options), root)
    command = line.split(" ", 5)[5].rsplit(" # pipeline-rerun:", 1)[0].replace("\\%", "%")
    first = subprocess.Popen(["/bin/sh", "-c", command], cwd="/", start_new_session=True)
    try:
        _wait_for_lock(folder, first)
        assert _cli(project, "tiny.toml") == EXIT_LOCKED
        assert "another rerun of this study is running (pid" in capsys.readouterr().err
        assert first.wait(timeout=600) == EXIT_OK
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert len(_history(project)) == 1  # only the first rerun did anything
    assert len(_trials(project)) == 1
    assert "first rerun" in (folder / "cron.log").read_text()
    assert "skipped: another rerun" in (folder / "rerun.log").read_text()

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pathlib import Path\nfrom pipeline.ops.rerun import study_lock\n"
            "with study_lock(Path(sys.argv[1])):\n    time.sleep(600)\n",
            str(folder),
        ],
        cwd=Path(__file__).parents[2],
    )
    try:
        _wait_for_lock(folder, holder, holder.pid)
        with pytest.raises(RerunLocked, match=f"pid {holder.pid} "), study_lock(folder):
            pass
        assert _cli(project, "tiny.toml") == EXIT_LOCKED
        assert len(_history(project)) == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    assert f"pid {holder.pid} " in (folder / rerun.LOCK_FILE).read_text()  # the file stays, the lock went
    capsys.readouterr()
    assert _cli(project, "tiny.toml") == EXIT_OK
    assert "reproduced baseline #0" in capsys.readouterr().out
    assert len(_history(project)) == 2 and len(_trials(project)) == 1


def test_sigterm_during_a_rerun_fails_queues_and_explains_the_trial(project, monkeypatch, capsys):
    """The one signal policy under ``pipeline rerun``: FAIL, queued again, reason, exit 143."""
    from pipeline.signals import Terminated

    def stopped(*args, **kwargs):
        raise Terminated(signal.SIGTERM)

    monkeypatch.setattr("pipeline.study.trial.train", stopped)
    assert _cli(project, "tiny.toml") == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM: trial 0 was marked FAIL and queued again" in err
    failed, queued = _trials(project)
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.user_attrs["reason"] == "stopped by SIGTERM"
    assert queued.state == optuna.trial.TrialState.WAITING and queued.params == failed.params
    assert not (project["reports_root"] / "tiny" / HISTORY_FILE).exists()  # no record was added


def test_a_signal_while_the_study_page_is_written_still_stops_the_command(project, monkeypatch, capsys):
    from pipeline.signals import Terminated

    def stopped(*args, **kwargs):
        raise Terminated(signal.SIGTERM)

    monkeypatch.setattr("pipeline.report.study_page.write_study_page", stopped)
    args = ["study", "tiny.toml", "--storage", project["storage"], "--tracking-uri", project["tracking_uri"]]
    assert cli.main(args) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert [t.state for t in _trials(project)] == [optuna.trial.TrialState.COMPLETE]  # the trial is kept
