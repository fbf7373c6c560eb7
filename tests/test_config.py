"""Study files: every shipped study parses; each bad value is one error naming file, key and value."""

import tomllib
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_study, parse_study
from tests.conftest import with_changes

STUDIES = sorted(Path("studies").glob("*.toml"))
BASE = {
    "name": "t",
    "dataset": {"source": "gmm"},
    "training": {"epochs": 2},
    "search": {"lr": {"low": 0.01, "high": 0.1, "log": True}},
}


def _with(**changes):
    return with_changes(BASE, **changes)


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_studies_parse(path):
    cfg = load_study(path)
    assert cfg.name == tomllib.loads(path.read_text())["name"]
    assert set(cfg.search) >= {"lr", "momentum", "weight_decay"}
    assert len(cfg.dataset.classes) == 2


def test_student_grid_is_the_reports_grid():
    cfg = load_study("studies/cifar2-seed-grid.toml")
    assert cfg.search["lr"].value == 0.01
    assert cfg.search["momentum"].choices == (0.0, 0.8, 0.9)
    assert cfg.search["weight_decay"].choices == (0.0, 0.001, 0.01)
    assert cfg.sampler.kind == "grid" and cfg.trials == 9
    assert cfg.model.hidden == (512, 128, 32) and cfg.dataset.classes == ("airplane", "bird")


def test_defaults_fill_in_and_hash_is_stable():
    cfg = parse_study(_with())
    assert cfg.search["momentum"].value == 0.0 and cfg.search["weight_decay"].value == 0.0
    assert cfg.dataset.classes == ("class 0", "class 1")
    assert cfg.config_hash() == parse_study(_with()).config_hash()
    assert cfg.config_hash() != parse_study(_with(training__epochs=3)).config_hash()


@pytest.mark.parametrize(
    ("changes", "key", "value"),
    [
        ({"search__lr": {"value": 0.0}}, "search.lr", "0.0"),
        ({"search__lr": {"value": -1.0}}, "search.lr", "-1.0"),
        ({"search__lr": {"low": -0.1, "high": 0.1}}, "search.lr", "-0.1"),
        ({"search__momentum": {"value": 1.0}}, "search.momentum", "1.0"),
        ({"search__momentum": {"choices": [0.5, -0.1]}}, "search.momentum", "-0.1"),
        ({"search__momentum": {"low": 0.0, "high": 1.0}}, "search.momentum", "1.0"),
        ({"search__weight_decay": {"value": -0.001}}, "search.weight_decay", "-0.001"),
        ({"search__lr": {"low": 0.1, "high": 0.1}}, "search.lr", "empty range"),
        ({"search__lr": {"low": 0.2, "high": 0.1}}, "search.lr", "empty range"),
        ({"search__momentum": {"choices": []}}, "search.momentum.choices", "[]"),
        ({"training__epochs": 0}, "training.epochs", "0"),
        ({"training__epochs": 2.5}, "training.epochs", "2.5"),
        ({"training__epochs": "10"}, "training.epochs", "'10'"),
        ({"training__batch_size": -1}, "training.batch_size", "-1"),
        ({"dataset__source": "mnist"}, "dataset.source", "mnist"),
        (
            {"dataset__source": "cifar2", "dataset__classes": ["airplane", "dragon"]},
            "dataset.classes",
            "dragon",
        ),
        ({"dataset__source": "fashion2", "dataset__classes": ["Shirt"]}, "dataset.classes", "Shirt"),
        ({"dataset__val_fraction": 1.0}, "dataset.val_fraction", "1.0"),
        ({"trials": 0}, "trials", "0"),
        ({"objective": "test_acc"}, "objective", "test_acc"),
        ({"sampler__kind": "cmaes"}, "sampler.kind", "cmaes"),
        ({"model__activation": "gelu"}, "model.activation", "gelu"),
        ({"model__hidden": [16, 0]}, "model.hidden", "0"),
        ({"name": "../escape"}, "name", "../escape"),
        ({"name": "Upper"}, "name", "Upper"),
        ({"sampler__kind": "grid"}, "search.lr", "grid sampler"),
        ({"bounds__confidence": 1.5}, "bounds.confidence", "1.5"),
    ],
)
def test_bad_values_name_file_key_and_value(changes, key, value):
    with pytest.raises(ConfigError) as info:
        parse_study(_with(**changes), "studies/bad.toml")
    message = str(info.value)
    assert message.startswith("studies/bad.toml: ")
    assert key in message and value in message


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"trainig__epochs": 3}, "trainig"),
        ({"training__epoch": 3}, "training.epoch"),
        ({"search__learning_rate": {"value": 0.1}}, "search.learning_rate"),
        ({"search__lr": {"low": 0.1, "hi": 0.2}}, "search.lr.hi"),
    ],
)
def test_unknown_keys_are_errors(changes, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_study(_with(**changes), "studies/bad.toml")


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="no such study file"):
        load_study(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_study(bad)


def test_overrides_are_validated():
    cfg = parse_study(_with(), "studies/x.toml")
    assert cfg.with_overrides(trials=3, epochs=5, name="other").training.epochs == 5
    with pytest.raises(ConfigError, match="trials"):
        cfg.with_overrides(trials=0)
    with pytest.raises(ConfigError, match="name"):
        cfg.with_overrides(name="../../etc")
