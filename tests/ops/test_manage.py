"""``best``, ``studies`` and ``delete`` on a temporary workspace. Oracles: Optuna's storage (the
selection), the weights themselves re-tested on the split, MLflow's store, the file system."""

import optuna
import pytest
from mlflow import MlflowClient

from pipeline import cli
from pipeline.config import load_study
from pipeline.data import load_split
from pipeline.evaluate import evaluate
from pipeline.model import build_mlp, load_weights
from pipeline.storage import open_storage
from tests.ops.test_rerun import write_tiny_toml


@pytest.fixture
def project(workspace, monkeypatch):
    monkeypatch.chdir(workspace["root"])
    write_tiny_toml(workspace["root"] / "tiny.toml", trials=3)
    workspace["args"] = ["--storage", workspace["storage"], "--tracking-uri", workspace["tracking_uri"]]
    assert cli.main(["study", "tiny.toml", *workspace["args"]]) == 0
    return workspace


def test_best_names_the_validation_winner_and_weights_that_retest_to_its_error(project, capsys):
    capsys.readouterr()
    assert cli.main(["best", "tiny.toml", *project["args"]]) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="tiny", storage=open_storage(project["storage"]))
    winner = max(study.trials, key=lambda t: (t.value, -t.number))  # best val_acc, earliest of ties
    assert out.startswith(f"selected trial {winner.number} of study tiny")
    assert f"val_acc = {winner.value:.4f}" in out
    assert f"test_error = {winner.user_attrs['test_error']:.4f}" in out
    weights = next(
        line.split("weights: ")[1].split("  ")[0] for line in out.splitlines() if "weights: " in line
    )
    cfg = load_study("tiny.toml")
    split = load_split(cfg.dataset)
    model = build_mlp(split.input_dim, cfg.model.hidden, cfg.model.activation, seed=0)
    load_weights(weights, model)
    test = evaluate(model, split.x_test, split.y_test, split.classes, cfg.training.loss)
    assert test.error == winner.user_attrs["test_error"]  # the same errors, to the last count


def test_best_with_seed_replicates_gives_the_mean_and_pins_the_interval_on_one_network(
    workspace, monkeypatch, capsys
):
    """With K seeds test_error is the mean; the exact interval belongs to replicate 0's network."""
    monkeypatch.chdir(workspace["root"])
    (workspace["root"] / "mlruns").mkdir(exist_ok=True)
    training = {"epochs": 3, "batch_size": 32, "seed": 0, "seeds": 2}
    write_tiny_toml(workspace["root"] / "tiny.toml", trials=1, training=training)
    args = ["--storage", workspace["storage"], "--tracking-uri", workspace["tracking_uri"]]
    assert cli.main(["study", "tiny.toml", *args]) == 0
    capsys.readouterr()
    assert cli.main(["best", "tiny.toml", *args]) == 0
    out = capsys.readouterr().out
    (trial,) = optuna.load_study(study_name="tiny", storage=open_storage(workspace["storage"])).trials
    a = trial.user_attrs
    assert f"val_acc = {trial.value:.4f} (mean of 2 seeds, sd {a['val_acc_std']:.4f})" in out
    assert (
        f"test_error = {a['test_error']:.4f} (mean of 2 seeds, sd {a['test_error_std']:.4f}); "
        f"replicate 0's network: {a['test_error_seeds'][0]:.4f}, 90% Clopper–Pearson "
        f"[{a['test_error_clopper_pearson_low']:.4f}, {a['test_error_clopper_pearson_high']:.4f}]"
    ) in out
    # the interval is replicate 0's: it holds that network's error, whatever the mean is
    low, high = a["test_error_clopper_pearson_low"], a["test_error_clopper_pearson_high"]
    assert low <= a["test_error_seeds"][0] <= high


def _studies(capsys, *args):
    """``pipeline studies ARGS``: its exit code, its rows split into columns, its stderr."""
    capsys.readouterr()
    rc = cli.main(["studies", *args])
    out, err = capsys.readouterr()
    return rc, [line.split("\t") for line in out.strip().splitlines()], err


def test_studies_shows_done_of_target_and_takes_name_storage_and_tracking_uri(project, capsys):
    """Oracles: the trial target the run was given (--trials) and Optuna's own count of trials."""
    optuna.create_study(study_name="other", storage=open_storage(project["storage"]))  # not in MLflow
    assert cli.main(["study", "tiny.toml", "--trials", "5", *project["args"]]) == 0  # a new target: 5

    rc, rows, _ = _studies(capsys, *project["args"])  # its journal is also storage/study.journal: listed once
    assert rc == 0 and rows[0][:4] == ["study", "done/target", "failed", "best"]
    assert [r[:3] for r in rows[1:]] == [["other", "0", "0"], ["tiny", "5/5", "0"]]

    rc, rows, _ = _studies(capsys, "--name", "tiny", *project["args"])
    assert rc == 0 and [r[:2] for r in rows[1:]] == [["tiny", "5/5"]]

    elsewhere = project["root"] / "other-mlruns" / "mlflow.db"  # a store that holds no target
    rc, rows, _ = _studies(capsys, "--name", "tiny", "--tracking-uri", f"sqlite:///{elsewhere}")
    assert rc == 0 and [r[:2] for r in rows[1:]] == [["tiny", "5"]] and not elsewhere.parent.exists()

    rc, rows, err = _studies(capsys, "--name", "nosuch", *project["args"])
    assert rc == 2 and rows == []
    assert err == f"error: no study named 'nosuch' in storage/ or {project['storage']}\n"


def test_studies_lists_and_delete_asks_then_removes_everything(project, capsys, monkeypatch):
    rc, rows, _ = _studies(capsys, "--storage", project["storage"])
    assert rc == 0 and rows[0][:4] == ["study", "done/target", "failed", "best"]
    assert rows[1][:3] == ["tiny", "3/3", "0"]

    journal = project["root"] / "storage" / "study.journal"
    reports = project["root"] / "reports" / "tiny"
    assert cli.main(["delete", "tiny.toml", *project["args"]]) == 2  # no --yes: nothing goes
    assert "would remove" in capsys.readouterr().err
    assert journal.exists() and reports.exists()
    client = MlflowClient(project["tracking_uri"])
    assert client.get_experiment_by_name("tiny") is not None

    assert cli.main(["delete", "tiny.toml", *project["args"], "--yes"]) == 0
    assert not journal.exists() and not reports.exists()
    assert client.get_experiment_by_name("tiny") is None
    assert [e for e in client.search_experiments(view_type=2) if e.name.startswith("tiny-deleted-")]
    assert cli.main(["study", "tiny.toml", *project["args"], "--trials", "1"]) == 0  # a fresh start
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len([r for r in runs if r.data.tags["pipeline_role"] == "trial"]) == 1


@pytest.mark.parametrize("change", [["--epochs", "2"], ["--trials", "5", "--epochs", "7"]])
def test_resuming_with_another_epoch_budget_is_refused_with_both_budgets_shown(project, capsys, change):
    capsys.readouterr()
    study = optuna.load_study(study_name="tiny", storage=open_storage(project["storage"]))
    before = [(t.number, t.state) for t in study.trials]
    stored_epochs = load_study("tiny.toml").training.epochs
    assert cli.main(["study", "tiny.toml", *change, *project["args"]]) == 2
    err = capsys.readouterr().err
    asked = change[change.index("--epochs") + 1]
    assert "another training budget" in err
    assert f'stored:  {{"epochs": {stored_epochs}, "seeds": 1}}' in err
    assert f'now:     {{"epochs": {asked}, "seeds": 1}}' in err
    study = optuna.load_study(study_name="tiny", storage=open_storage(project["storage"]))
    assert [(t.number, t.state) for t in study.trials] == before  # nothing was run or queued
    # the stored budget still resumes: the same epochs, more trials
    assert cli.main(["study", "tiny.toml", "--trials", "4", *project["args"]]) == 0
    assert len(optuna.load_study(study_name="tiny", storage=open_storage(project["storage"])).trials) == 4
