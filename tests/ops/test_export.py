"""``pipeline export`` on a tiny study run once. Oracles: Optuna's storage (the selection, the trial's
params and recorded test error), the trial's own report folder (metrics.json, test_predictions.json),
the study-file parser (config.toml, in-process and through `pipeline check`), the weights
re-tested on the split, a retrain of config.toml, MLflow's store and registry
(mlflow.pytorch.load_model), and the file system (nothing written)."""

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline import cli
from pipeline.config import load_study
from pipeline.data import load_split
from pipeline.evaluate import evaluate
from pipeline.model import build_mlp
from pipeline.ops.export import FILES, fluent_tracking, model_card, toml_value
from pipeline.storage import open_storage, ranked_trials
from pipeline.train import trial_setup
from tests.conftest import Workspace
from tests.ops.test_rerun import write_tiny_toml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A 3-trial tiny study run once through the command line in a folder of its own."""
    root = tmp_path_factory.mktemp("export")
    ws = Workspace(
        storage=str(root / "storage" / "study.journal"),
        tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
        reports_root=root / "reports",
        root=root,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("OPTUNA_STORAGE", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(root)
        write_tiny_toml(root / "tiny.toml", trials=3)
        ws["args"] = ["--storage", ws["storage"], "--tracking-uri", ws["tracking_uri"]]
        assert cli.main(["study", "tiny.toml", *ws["args"]]) == 0
        study = optuna.load_study(study_name="tiny", storage=open_storage(ws["storage"]))
        ws["study"] = study
        ws["top"] = ranked_trials(study)[0]
        ws["cfg"] = load_study("tiny.toml")
        ws["split"] = load_split(ws["cfg"].dataset)
        pristine = root / "pristine" / "mlflow.db"  # the store before any export: an empty registry
        pristine.parent.mkdir()
        shutil.copyfile(root / "mlruns" / "mlflow.db", pristine)  # artifacts stay where they are
        ws["pristine_uri"] = f"sqlite:///{pristine}"
        yield ws


def _export(project, out, *extra):
    return cli.main(["export", "tiny.toml", "--out", str(out), *project["args"], *extra])


def _report(project, name):
    return json.loads(
        (project["root"] / "reports" / "tiny" / f"trial-{project['top'].number:04d}" / name).read_text()
    )


def _network(config_path, state):
    """The MLP that DIR/config.toml describes, holding ``state``."""
    cfg = load_study(config_path)
    params = {key: spec.value for key, spec in cfg.search.items()}
    shape, _ = trial_setup(cfg.model, params)
    split = load_split(cfg.dataset)
    model = build_mlp(split.input_dim, shape.hidden, shape.activation, seed=cfg.training.seed)
    model.load_state_dict(state)
    return model, split


def test_export_writes_the_selected_trial_config_weights_metrics_and_card(project, capsys):
    top = project["top"]
    complete = [t for t in project["study"].trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert top.value == max(t.value for t in complete)  # the validation winner, nothing else
    out = project["root"] / "first" / "tiny"
    capsys.readouterr()
    assert _export(project, out) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"exported trial {top.number} of study tiny")
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # and no temporary left beside it
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]

    # config.toml: the study file's parser reads it back to exactly the trial's configuration
    cfg, exported = project["cfg"], load_study(out / "config.toml")
    assert all(spec.kind == "value" for spec in exported.search.values())
    assert {key: spec.value for key, spec in exported.search.items()} == top.params
    assert exported.trials == 1 and exported.name == f"tiny-trial-{top.number}"
    for section in ("dataset", "model", "training", "bounds", "sampler", "pruner"):
        assert getattr(exported, section) == getattr(cfg, section), section

    # model.pt: plain CPU tensors that reproduce the trial's stored test predictions and error
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state.values())
    model, split = _network(out / "config.toml", state)
    test = evaluate(model, split.x_test, split.y_test, split.classes, exported.training.loss)
    stored = _report(project, "test_predictions.json")
    assert test.predictions.tolist() == stored["predictions"]
    assert test.error == top.user_attrs["test_error"]  # to the last count

    # metrics.json: the trial's own, unchanged
    assert json.loads((out / "metrics.json").read_text()) == _report(project, "metrics.json")

    # MODEL.md: the facts, and a loading snippet that runs and gives the same predictions
    card = (out / "MODEL.md").read_text()
    metrics = _report(project, "metrics.json")
    cp = next(iv for iv in metrics["intervals"] if iv["method"] == "clopper_pearson")
    for fact in (
        f"trial {top.number}",
        top.user_attrs["mlflow_run_id"],
        metrics["split_hash"],
        f"[{cp['low']:.4f}, {cp['high']:.4f}]",
        f"{metrics['test_k']} of {metrics['test_m']}",
        "Clopper–Pearson",
        "validation split",
        "3 complete trials",
        "`class 0` vs `class 1`",
        *(f"| `{key}` |" for key in top.params),
    ):
        assert fact in card, fact
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert len(snippet.strip().splitlines()) == 5
    scope = {"x": split.x_test}
    exec(snippet, scope)
    assert scope["predicted"].tolist() == stored["predictions"]


def test_the_exported_config_passes_check_and_retrains_to_the_trial_itself(project, tmp_path, monkeypatch):
    """The round trip a user makes: export, `pipeline check` the config (a real process), run it."""
    out = project["root"] / "exported" / "retrain"
    assert _export(project, out, "--no-register") == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    checked = subprocess.run(
        [sys.executable, "-m", "pipeline", "check", str(out / "config.toml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stderr
    exported = load_study(out / "config.toml")
    assert json.loads(checked.stdout) == json.loads(json.dumps(exported.to_dict(), default=list))
    assert f"config hash {exported.config_hash()}" in checked.stderr
    monkeypatch.chdir(tmp_path)
    ws = Workspace(
        storage=str(tmp_path / "study.journal"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
        reports_root=tmp_path / "reports",
        root=tmp_path,
    )
    cfg = load_study(out / "config.toml")
    ws.run(cfg)
    (retrained,) = optuna.load_study(study_name=cfg.name, storage=open_storage(ws["storage"])).trials
    top = project["top"]
    assert retrained.params == top.params
    assert retrained.value == top.value
    assert retrained.user_attrs["test_error"] == top.user_attrs["test_error"]


def _versions(client, name):
    return sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))


def test_the_default_export_registers_study_best_with_alias_best(project, capsys):
    client = MlflowClient(project["tracking_uri"])
    top = project["top"]
    run_id = top.user_attrs["mlflow_run_id"]
    status = client.get_run(run_id).info.status
    latest = max(_versions(client, "tiny-best"), default=0)  # other tests' exports register too
    out = project["root"] / "exported" / "registered"
    capsys.readouterr()
    assert _export(project, out) == 0
    assert f"registered model 'tiny-best' version {latest + 1} (alias best" in capsys.readouterr().out
    version = client.get_model_version_by_alias("tiny-best", "best")
    assert int(version.version) == latest + 1 and version.run_id == run_id
    assert version.tags["optuna_study"] == "tiny" and version.tags["optuna_trial"] == str(top.number)
    assert client.get_run(run_id).info.status == status  # the trial's run is not reopened for good
    card = (out / "MODEL.md").read_text()
    said = f"registered model `tiny-best` version {latest + 1}, alias `best`: `models:/tiny-best@best`"
    assert said in card

    # the registered model, loaded back by its alias, re-tested on the study's test split
    split, metrics = project["split"], _report(project, "metrics.json")
    with fluent_tracking(project["tracking_uri"]):
        loaded = mlflow.pytorch.load_model("models:/tiny-best@best")
    with torch.no_grad():
        predicted = loaded(split.x_test).argmax(1)
    assert int((predicted != split.y_test).sum()) == metrics["test_k"]  # to the last count
    assert len(predicted) == metrics["test_m"]
    assert predicted.tolist() == _report(project, "test_predictions.json")["predictions"]

    assert _export(project, out) == 0  # again: a new version, and the alias moves to it
    assert _versions(client, "tiny-best")[-2:] == [latest + 1, latest + 2]
    assert int(client.get_model_version_by_alias("tiny-best", "best").version) == latest + 2


def test_register_names_another_registered_model(project, capsys):
    client = MlflowClient(project["tracking_uri"])
    ours = _versions(client, "tiny-best")
    capsys.readouterr()
    assert _export(project, project["root"] / "exported" / "other", "--register", "other") == 0
    assert "registered model 'other' version 1 (alias best: models:/other@best)" in capsys.readouterr().out
    version = client.get_model_version_by_alias("other", "best")
    assert int(version.version) == 1 and version.run_id == project["top"].user_attrs["mlflow_run_id"]
    assert _versions(client, "tiny-best") == ours  # the default name is left alone


def test_no_register_changes_nothing_in_mlflow(project, capsys):
    """On a copy of the store taken before any export: its registry stays empty."""
    uri = project["pristine_uri"]
    client = MlflowClient(uri)
    run_id = project["top"].user_attrs["mlflow_run_id"]
    experiment = client.get_experiment_by_name("tiny").experiment_id

    def snapshot():
        return (
            client.get_run(run_id).to_dictionary(),
            [r.name for r in client.search_registered_models()],
            [m.model_id for m in client.search_logged_models([experiment])],
            [a.path for a in client.list_artifacts(run_id)],
        )

    before = snapshot()
    assert before[1] == [] and before[2] == []
    out = project["root"] / "exported" / "quiet"
    capsys.readouterr()
    assert _export(project, out, "--no-register", "--tracking-uri", uri) == 0
    assert "not registered (--no-register)" in capsys.readouterr().out
    assert snapshot() == before
    assert "registered model" not in (out / "MODEL.md").read_text()


def test_a_store_failing_while_registering_is_one_line_and_no_folder(project, capsys, monkeypatch):
    client = MlflowClient(project["tracking_uri"])
    versions = _versions(client, "tiny-best")
    run_id = project["top"].user_attrs["mlflow_run_id"]
    status = client.get_run(run_id).info.status

    def gone(*args, **kwargs):
        raise MlflowException("database is locked")

    monkeypatch.setattr(mlflow.pytorch, "log_model", gone)
    out = project["root"] / "refused" / "registering" / "out"
    capsys.readouterr()
    assert _export(project, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: registering 'tiny-best': ") and "database is locked" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # no folder, no temporaries
    assert _versions(client, "tiny-best") == versions
    assert client.get_run(run_id).info.status == status  # end_run restored it


def test_an_earlier_export_of_the_same_study_is_replaced_and_said_so(project, capsys):
    out = project["root"] / "exported" / "again"
    assert _export(project, out) == 0
    (out / "MODEL.md").write_text("stale\n")
    capsys.readouterr()
    assert _export(project, out) == 0
    assert (
        f"replaced the earlier export of study tiny (trial {project['top'].number})"
        in capsys.readouterr().out
    )
    assert (out / "MODEL.md").read_text().startswith("# Model card")


def test_without_its_report_folder_the_metrics_come_from_the_mlflow_run(project):
    reports = project["root"] / "reports"
    expected = _report(project, "metrics.json")
    reports.rename(project["root"] / "reports-away")
    try:
        out = project["root"] / "exported" / "no-reports"
        assert _export(project, out) == 0
    finally:
        (project["root"] / "reports-away").rename(reports)
    assert json.loads((out / "metrics.json").read_text()) == expected


def _foreign(folder):
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine\n")


def _other_study(folder):
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text('# pipeline export of study "other", trial 4 (MLflow run x).\n')


def _extra_file(folder):
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text('# pipeline export of study "tiny", trial 0 (MLflow run x).\n')
    (folder / "notes.txt").write_text("mine\n")


@pytest.mark.parametrize(
    ("argv", "prepare", "says"),
    [
        (["--name", "nosuch"], None, "no study named 'nosuch'"),
        ([], _foreign, "not empty and not a pipeline export (it holds notes.txt)"),
        ([], _other_study, "holds the export of study 'other' (trial 4), not of 'tiny'"),
        ([], _extra_file, "also holds notes.txt"),
        (["--register", "a/b"], None, "--register 'a/b'"),
        (["--tracking-uri", "sqlite:///nowhere/mlflow.db"], None, "nowhere/mlflow.db does not exist"),
        (["--tracking-uri", "http://127.0.0.1:9"], None, "http://127.0.0.1:9 does not answer"),
    ],
    ids=[
        "unknown-study",
        "foreign-folder",
        "other-study",
        "extra-file",
        "bad-model-name",
        "missing-store",
        "unreachable-server",
    ],
)
def test_bad_input_exits_2_with_one_message_and_writes_nothing(project, capsys, request, argv, prepare, says):
    out = project["root"] / "refused" / request.node.callspec.id / "out"
    if prepare:
        prepare(out)
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir()) if out.exists() else None
    models = [r.name for r in MlflowClient(project["tracking_uri"]).search_registered_models()]
    capsys.readouterr()
    assert _export(project, out, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and len(err.strip().splitlines()) == 1, err
    after = sorted((p.name, p.read_bytes()) for p in out.iterdir()) if out.exists() else None
    assert after == before
    assert not out.parent.exists() or [p.name for p in out.parent.iterdir()] == ["out"]  # no temporaries
    assert [r.name for r in MlflowClient(project["tracking_uri"]).search_registered_models()] == models
    assert not (project["root"] / "nowhere").exists()  # a missing SQLite store is not created


def test_the_card_gives_the_seed_spread_when_a_trial_trained_replicates(project):
    top = copy.deepcopy(project["top"])
    top.user_attrs = {**top.user_attrs, "replicates": 3, "test_error": 0.2, "test_error_std": 0.01}
    metrics = _report(project, "metrics.json")
    state = torch.load(_any_export(project) / "model.pt", weights_only=True)
    model, _ = _network(_any_export(project) / "config.toml", state)
    card = model_card(
        project["cfg"], top, project["study"], project["storage"], metrics, model, project["root"], None
    )
    assert "replicate 0 of 3" in card and "0.2000 ± 0.0100 (sd), mean over 3 seeds" in card
    assert f"{metrics['test_error']:.4f} ({metrics['test_k']} of" in card  # the network's own number


def _any_export(project):
    out = project["root"] / "exported" / "card"
    if not out.exists():
        assert _export(project, out) == 0
    return out


@pytest.mark.parametrize("value", [1e-05, 0.1, 3.0, math.inf, -math.inf, 7, True, 'a"b\\c é', [64, 32], []])
def test_toml_values_read_back_as_written(value):
    """Oracle: the standard library's TOML reader."""
    assert tomllib.loads(f"v = {toml_value(value)}")["v"] == value
    assert np.isnan(tomllib.loads(f"v = {toml_value(math.nan)}")["v"])
