"""The gradient check inside a study: its own MLflow run, the gate that stops a study whose backprop
is wrong, and the decision-boundary figure of a 2-D study."""

import dataclasses
import json

import numpy as np
import optuna
import pytest
import torch
from matplotlib.image import imread
from mlflow import MlflowClient

from pipeline import backprop
from pipeline.data import load_split
from pipeline.model import build_mlp
from pipeline.report.figures import plot_decision_boundary
from pipeline.storage import open_storage
from pipeline.study.gate import GradcheckFailed, run_gradcheck
from tests.conftest import tiny_study


def test_gradcheck_run_is_logged_and_passes_on_a_smooth_net(workspace):
    cfg = tiny_study(gradcheck__max_examples=100)
    result, table, failures, folder = run_gradcheck(
        cfg, tracking_uri=workspace["tracking_uri"], reports_root=workspace["reports_root"]
    )
    assert failures == []
    assert "Grad error in W1:" in table and "Grad error in b2:" in table
    # O(eps^2) in float64 for every parameter of the tanh net (oracle: the lab's expectation)
    assert all(1.8 < order < 2.2 for order in result.order64.values())
    saved = json.loads((folder / "gradcheck.json").read_text())
    assert saved["examples"] == 100
    client = MlflowClient(workspace["tracking_uri"])
    exp = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([exp.experiment_id], "tags.pipeline_role = 'gradcheck'")
    assert run.data.tags["passed"] == "True" and run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"gradcheck.json", "gradcheck.png"}


def test_a_wrong_backprop_fails_the_study_before_any_trial(workspace, monkeypatch):
    real = backprop.manual_loss_and_gradients

    def off_by_one_percent(*args, **kwargs):
        out = real(*args, **kwargs)
        return dataclasses.replace(out, gradients=tuple(1.01 * g for g in out.gradients))

    monkeypatch.setattr(backprop, "manual_loss_and_gradients", off_by_one_percent)
    cfg = tiny_study(gradcheck__enabled=True, gradcheck__max_examples=100)
    with pytest.raises(GradcheckFailed, match="manual vs autograd"):
        workspace.run(cfg)
    study = optuna.load_study(study_name="tiny", storage=open_storage(workspace["storage"]))
    assert study.trials == []


def test_decision_boundary_for_2d_and_refused_for_images(tmp_path):
    split = load_split(tiny_study().dataset)
    model = build_mlp(2, (8,), "tanh", seed=0)
    path = plot_decision_boundary(model, split, tmp_path / "boundary.png", "t")
    pixels = imread(path)
    assert pixels.shape[0] > 100 and np.ptp(pixels[..., :3]) > 0.5
    images = dataclasses.replace(split, x_train=torch.zeros(4, 784), x_val=torch.zeros(4, 784))
    with pytest.raises(ValueError, match="2-D inputs.*784 features"):
        plot_decision_boundary(build_mlp(784, (8,), "relu", seed=0), images, tmp_path / "no.png", "t")
    assert not (tmp_path / "no.png").exists()
