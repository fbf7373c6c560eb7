"""Seed replicates: a trial scored over K training seeds.

Oracles: separate ``train()`` runs with each replicate's seed (float64), the mean of the per-seed
values recomputed here, scipy's t-interval and Clopper–Pearson limits, and MLflow's stored metrics.
"""

import dataclasses
import json
import math

import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient
from scipy import stats

from pipeline.config import ConfigError
from pipeline.data import load_split
from pipeline.evaluate import evaluate
from pipeline.model import build_mlp
from pipeline.seeds import derive_seed
from pipeline.storage import open_storage
from pipeline.train import Hyper, replicate_seeds, train
from tests.conftest import tiny_study


def _study(workspace, cfg):
    return optuna.load_study(study_name=cfg.name, storage=open_storage(workspace["storage"]))


def test_replicate_seeds_are_derived_and_one_seed_keeps_the_old_numbers():
    cfg = tiny_study(training__seeds=4)
    assert replicate_seeds(cfg.training) == [derive_seed(0, "replicate", i) for i in range(4)]
    assert replicate_seeds(tiny_study().training) == [0]
    # the default leaves a study's config hash and search signature as they were before the key
    base = tiny_study()
    assert "seeds" not in base.search_space_signature()
    assert cfg.search_space_signature() != base.search_space_signature()


def test_seeds_must_be_positive():
    with pytest.raises(ConfigError, match=r"training.seeds = 0: must be >= 1"):
        tiny_study(training__seeds=0)


@pytest.mark.parametrize("backward", ["autograd", "manual"])
def test_a_trial_is_the_mean_over_its_replicates(workspace, backward):
    """Objective = mean of each replicate's objective; each replicate is train() with its seed."""
    cfg = tiny_study(
        trials=1,
        training__seeds=3,
        training__dtype="float64",
        training__backward=backward,
        training__epochs=8,
    )
    cfg = dataclasses.replace(cfg, gradcheck=dataclasses.replace(cfg.gradcheck, enabled=False))
    workspace.run(cfg)
    trial = _study(workspace, cfg).trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    split = load_split(cfg.dataset)
    hyper = Hyper(trial.params["lr"], trial.params["momentum"], 0.0)
    accs, losses, errors = [], [], []
    for seed in replicate_seeds(cfg.training):
        model = build_mlp(split.input_dim, cfg.model.hidden, cfg.model.activation, seed, dtype=torch.float64)
        train(model, split, hyper, dataclasses.replace(cfg.training, seed=seed))
        val = evaluate(model, split.x_val, split.y_val, split.classes)
        test = evaluate(model, split.x_test, split.y_test, split.classes)
        accs.append(val.accuracy)
        losses.append(val.loss)
        errors.append(test.error)
    assert trial.user_attrs["objective_seeds"] == pytest.approx(accs, abs=1e-12)
    assert trial.value == pytest.approx(np.mean(accs), abs=1e-12)
    assert trial.user_attrs["val_loss"] == pytest.approx(np.mean(losses), abs=1e-12)
    assert trial.user_attrs["test_error_seeds"] == pytest.approx(errors, abs=1e-12)
    assert trial.user_attrs["test_error"] == pytest.approx(np.mean(errors), abs=1e-12)
    assert trial.user_attrs["test_error_std"] == pytest.approx(np.std(errors, ddof=1), abs=1e-12)
    assert trial.user_attrs["replicates"] == 3

    run = MlflowClient(workspace["tracking_uri"]).get_run(trial.user_attrs["mlflow_run_id"])
    m = run.data.metrics
    for i in range(3):
        assert m[f"val_acc_seed{i}"] == pytest.approx(accs[i], abs=1e-12)
        assert m[f"val_loss_seed{i}"] == pytest.approx(losses[i], abs=1e-12)
        assert m[f"test_error_seed{i}"] == pytest.approx(errors[i], abs=1e-12)
    assert m["val_acc"] == pytest.approx(np.mean(accs), abs=1e-12)  # the last epoch of the mean curve
    assert m["val_acc_seed0"] == pytest.approx(accs[0], abs=1e-12)
    assert m["test_error"] == pytest.approx(np.mean(errors), abs=1e-12)
    assert m["val_acc_std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-12)
    majority = np.bincount(split.y_val.numpy()).max() / len(split.y_val)
    assert m["stalled"] == sum(abs(a - majority) <= 0.02 for a in accs)
    assert len(set(errors)) > 1  # the seeds made different networks, or the interval proves little
    low, high = stats.t.interval(
        cfg.bounds.confidence, 2, loc=np.mean(errors), scale=np.std(errors, ddof=1) / math.sqrt(3)
    )
    assert (m["test_error_mean_t_low"], m["test_error_mean_t_high"]) == pytest.approx((low, high), abs=1e-12)
    history = MlflowClient(workspace["tracking_uri"]).get_metric_history(run.info.run_id, "val_acc")
    assert len(history) == cfg.training.epochs  # the mean curve, one point per epoch

    folder = workspace["reports_root"] / cfg.name / "trial-0000"
    block = json.loads((folder / "metrics.json").read_text())["replicates"]
    m_test = len(split.y_test)
    assert block["test_k"] == [round(e * m_test) for e in errors]
    page = (folder / "report.html").read_text()
    assert "Seed replicates" in page and "approximate" in page
    cp = stats.beta.ppf(
        1 - (1 - cfg.bounds.confidence) / 2, block["test_k"][1] + 1, m_test - block["test_k"][1]
    )
    assert f"{cp:.4f}" in page  # replicate 1's own Clopper–Pearson upper limit is in its row
    assert (folder / "replicates.png").stat().st_size > 0


def test_replicates_with_a_population_equal_one_trial_at_a_time(workspace, tmp_path):
    """population = 2 with seeds = 2: four networks, two lockstep sets; the same numbers as
    population = 1 (float64)."""
    grid = {"lr": {"choices": [0.05, 0.2]}, "momentum": {"choices": [0.0]}}
    kw = dict(trials=2, training__seeds=2, training__dtype="float64", search=grid, sampler__kind="grid")
    values = {}
    for population in (1, 2):
        cfg = tiny_study(name=f"pop{population}", training__population=population, **kw)
        workspace.run(cfg)
        study = _study(workspace, cfg)
        values[population] = sorted(
            (t.params["lr"], t.value, tuple(t.user_attrs["test_error_seeds"])) for t in study.trials
        )
    for (lr1, v1, e1), (lr2, v2, e2) in zip(values[1], values[2], strict=True):
        assert lr1 == lr2
        assert v1 == pytest.approx(v2, abs=1e-12)
        assert e1 == pytest.approx(e2, abs=1e-12)


def test_the_pruner_sees_the_mean_curve(workspace):
    """Each epoch's intermediate value is the mean of the replicates' val_acc (MLflow's seed-0 curve
    and the per-replicate finals are the oracle at the last epoch)."""
    cfg = tiny_study(trials=1, training__seeds=2, training__dtype="float64")
    workspace.run(cfg)
    trial = _study(workspace, cfg).trials[0]
    assert sorted(trial.intermediate_values) == list(range(1, cfg.training.epochs + 1))
    last = trial.intermediate_values[cfg.training.epochs]
    assert last == pytest.approx(np.mean(trial.user_attrs["objective_seeds"]), abs=1e-12)
