"""Every numeric key of a study file has a range (``pipeline.config.RANGES``): a value outside it, NaN,
an infinity or a boolean is one ``ConfigError`` naming the file, the dotted key, the value and the fix,
and ``pipeline check`` refuses it with exit 2 before writing anything.

The bad values are derived from the range table (just past each end, NaN and +-inf for floats, ``true``
for all), applied to every number in every shipped study file and to each key a file leaves at its
default; the oracle is the message the table implies, written out here."""

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest

from pipeline.config import RANGES, SEARCHABLE, SEED_MAX, ConfigError, StudyConfig, parse_study

ROOT = Path(__file__).resolve().parent.parent
STUDIES = sorted((ROOT / "studies").glob("*.toml"))
RAW = {p.stem: tomllib.loads(p.read_text(encoding="utf-8")) for p in STUDIES}
SEED_KEYS = ("dataset.seed", "training.seed", "sampler.seed", "rerun.first_seed")


def _number_type(hint):
    """``int`` or ``float`` for a numeric field annotation (a tuple of them too), else None."""
    if typing.get_origin(hint) is tuple:
        hint = typing.get_args(hint)[0]
    return hint if hint in (int, float) else None


def _numeric_keys() -> dict[str, type]:
    """Every numeric key a study file can set, read off the dataclasses: dotted key -> int | float."""
    keys = {}
    hints = typing.get_type_hints(StudyConfig)
    for f in dataclasses.fields(StudyConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            sub = typing.get_type_hints(hints[f.name])
            for g in dataclasses.fields(hints[f.name]):
                if _number_type(sub[g.name]):
                    keys[f"{f.name}.{g.name}"] = _number_type(sub[g.name])
        elif _number_type(hints[f.name]) and f.name != "path":
            keys[f.name] = _number_type(hints[f.name])
    for name in SEARCHABLE:
        if name != "activation":
            keys[f"search.{name}"] = int if name == "hidden" else float
    return keys


NUMERIC = _numeric_keys()


def _ends(key: str):
    """(end, is_open, direction pointing outside) for each finite end of the key's range."""
    allowed = RANGES[key]
    for end, is_open, outward in ((allowed.low, allowed.open_low, -1), (allowed.high, allowed.open_high, 1)):
        if math.isfinite(end):
            yield end, is_open, outward


def _step(key: str, value, direction: int):
    """The next value of the key's type from ``value`` in ``direction``."""
    return value + direction if NUMERIC[key] is int else math.nextafter(value, direction * math.inf)


def _bad_values(key: str) -> list:
    """Just past each finite end of the key's range (the end itself where it is open); NaN and
    infinities for a float key."""
    out = [end if is_open else _step(key, end, outward) for end, is_open, outward in _ends(key)]
    if NUMERIC[key] is int:
        return [int(v) for v in out]
    return [float(v) for v in out] + [math.nan, math.inf, -math.inf]


def _good_ends(key: str) -> list:
    """Each finite end where it is included, else the nearest value inside."""
    out = [_step(key, end, -outward) if is_open else end for end, is_open, outward in _ends(key)]
    return [NUMERIC[key](v) for v in out]


def _leaves(path: tuple, value):
    """The paths of the numbers in ``value`` (booleans and strings are not numbers)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves((*path, i), item)
    elif isinstance(value, dict):
        for sub, item in value.items():
            yield from _leaves((*path, sub), item)


NUMERIC_SECTIONS = {key.split(".")[0] for key in NUMERIC if "." in key}


def _range_key(path: tuple) -> str:
    """``("search", "lr", "low")`` -> ``search.lr``; ``("model", "hidden", 1)`` -> ``model.hidden``."""
    return ".".join(path[:2]) if path[0] in NUMERIC_SECTIONS else path[0]


def _set(raw: dict, path: tuple, value) -> dict:
    """A deep copy of a study document with the item at ``path`` set (tables created as needed)."""
    raw = copy.deepcopy(raw)
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    node[path[-1]] = value
    return raw


def _get(raw: dict, path: tuple):
    for part in path:
        raw = raw[part]
    return raw


def _expected(where: str, key: str, shown, value) -> str:
    why = RANGES[key].why if math.isfinite(value) else f"not a finite number; {RANGES[key].why}"
    return f"{where}: {key} = {shown!r}: {why}"


def _cases(stem: str, key: str):
    """(path, bad value, value the message shows) for ``key`` in study ``stem``: every number the file
    gives for the key, or the key written plainly where the file leaves it at its default."""
    paths = [p for p in _leaves((), RAW[stem]) if _range_key(p) == key]
    if not paths:
        paths = [(*key.split("."), 0) if key == "model.hidden" else tuple(key.split("."))]
    for path in paths:
        for bad in _bad_values(key):
            if key == "model.hidden":  # the message shows the whole list of widths
                raw = _set(RAW[stem], path, bad)
                yield raw, bad, list(_get(raw, path[:2]))
            else:
                yield _set(RAW[stem], path, bad), bad, bad


def test_every_numeric_key_has_a_range():
    assert set(RANGES) == set(NUMERIC)
    for stem, raw in RAW.items():  # and the shipped files hold no number outside those keys
        assert {_range_key(p) for p in _leaves((), raw)} <= set(RANGES), stem


def test_ranges_are_the_documented_ones():
    """The table, spelled out: a change to a range is a change to this list."""
    spelled = {key: (r.low, r.high, r.open_low, r.open_high) for key, r in RANGES.items()}
    inf = math.inf
    assert spelled == {
        "trials": (1, inf, False, False),
        "dataset.val_fraction": (0, 1, True, True),
        "dataset.seed": (0, 2**32 - 1, False, False),
        "dataset.n_train": (10, inf, False, False),
        "dataset.n_test": (10, inf, False, False),
        "model.hidden": (1, inf, False, False),
        "training.epochs": (1, inf, False, False),
        "training.batch_size": (0, inf, False, False),
        "training.seed": (0, 2**32 - 1, False, False),
        "training.population": (1, inf, False, False),
        "training.seeds": (1, inf, False, False),
        "search.lr": (0, inf, True, False),
        "search.momentum": (0, 1, False, True),
        "search.weight_decay": (0, inf, False, False),
        "search.hidden": (1, inf, False, False),
        "sampler.seed": (0, 2**32 - 1, False, False),
        "pruner.warmup_epochs": (0, inf, False, False),
        "bounds.confidence": (0, 1, True, True),
        "bounds.fresh_sets": (100, inf, False, False),
        "gradcheck.tolerance": (0, inf, True, False),
        "gradcheck.max_examples": (1, inf, False, False),
        "rerun.seeds": (2, inf, False, False),
        "rerun.first_seed": (0, 2**32 - 1, False, False),
        "rerun.trials": (0, inf, False, False),
        "rerun.alpha": (0, 1, True, True),
        "rerun.planned": (0, inf, False, False),
    }
    assert SEED_MAX == 2**32 - 1 and all(RANGES[k] == RANGES["sampler.seed"] for k in SEED_KEYS)


@pytest.mark.parametrize("key", sorted(RANGES))
@pytest.mark.parametrize("stem", sorted(RAW))
def test_each_bad_value_is_one_error_naming_file_key_value_and_range(stem, key):
    where = f"studies/{stem}.toml"
    cases = list(_cases(stem, key))
    assert cases
    for raw, bad, shown in cases:
        with pytest.raises(ConfigError) as info:
            parse_study(raw, where)
        assert str(info.value) == _expected(where, key, shown, bad)


@pytest.mark.parametrize("key", sorted(RANGES))
@pytest.mark.parametrize("stem", sorted(RAW))
def test_a_boolean_is_not_a_number(stem, key):
    where = f"studies/{stem}.toml"
    paths = [p for p in _leaves((), RAW[stem]) if _range_key(p) == key] or [tuple(key.split("."))]
    for path in paths:
        with pytest.raises(ConfigError) as info:
            parse_study(_set(RAW[stem], path, True), where)
        message = str(info.value)
        assert message.startswith(f"{where}: {key}")
        assert f" = True: expected {NUMERIC[key].__name__}, got bool" in message


@pytest.mark.parametrize("key", sorted(RANGES))
def test_the_ends_of_each_range_are_accepted(key):
    for good in _good_ends(key):
        if key == "rerun.first_seed" and good == SEED_MAX:
            continue  # the rerun's seeds run on from first_seed: test_rerun_seeds_stay_in_range
        value = [good] if key == "model.hidden" else good
        cfg = parse_study(_set(RAW["demo"], tuple(key.split(".")), value), "studies/demo.toml")
        section, _, name = key.rpartition(".")
        if section == "search":
            got = cfg.search[name].value
        else:
            got = getattr(getattr(cfg, section) if section else cfg, name)
        assert got == (tuple(value) if key == "model.hidden" else value)
        assert type(good) is NUMERIC[key]


def test_rerun_seeds_stay_in_range():
    last_ok = _set(_set(RAW["demo"], ("rerun", "seeds"), 5), ("rerun", "first_seed"), SEED_MAX - 4)
    assert parse_study(last_ok).rerun.first_seed == SEED_MAX - 4
    with pytest.raises(ConfigError, match=rf"rerun\.first_seed = {SEED_MAX - 3}: .*= {SEED_MAX + 1}"):
        parse_study(_set(last_ok, ("rerun", "first_seed"), SEED_MAX - 3), "studies/demo.toml")


def test_nan_in_a_search_range_is_named_as_not_finite():
    for sub in ("low", "high"):
        raw = _set(RAW["demo"], ("search", "lr", sub), math.nan)
        with pytest.raises(ConfigError) as info:
            parse_study(raw, "studies/demo.toml")
        assert str(info.value) == "studies/demo.toml: search.lr = nan: not a finite number; must be > 0"


# --------------------------------------------------------------------------------------------
# The command line: `pipeline check` on a file in an empty folder


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"


def dump_toml(raw: dict) -> str:
    """A study document as TOML: top-level keys, then one [table] per section."""
    lines = [f"{k} = {_toml(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for name, table in raw.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]", *(f"{k} = {_toml(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _check(folder: Path, text: str, command: str = "check", *extra: str) -> subprocess.CompletedProcess:
    """``pipeline COMMAND study.toml EXTRA...`` in ``folder``; asserts it wrote nothing there."""
    (folder / "study.toml").write_text(text, encoding="utf-8")
    before = _listing(folder)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    for name in ("OPTUNA_STORAGE", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", command, "study.toml", *extra],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert _listing(folder) == before == ["study.toml"]
    return done


@pytest.mark.parametrize("stem", sorted(RAW))
def test_dump_toml_round_trips_the_shipped_studies(stem):
    assert tomllib.loads(dump_toml(RAW[stem])) == RAW[stem]


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_studies_pass_check_unchanged(path, tmp_path):
    done = _check(tmp_path, path.read_text(encoding="utf-8"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == RAW[path.stem]["name"]


EXPLICIT = [  # the values of the bug report, and one per kind of range
    ("dataset.seed", -1),
    ("training.seed", -5),
    *((key, 2**63) for key in SEED_KEYS),
    ("sampler.seed", -1),
    ("pruner.warmup_epochs", -1),
    ("gradcheck.max_examples", 0),
    ("gradcheck.tolerance", math.nan),
    ("gradcheck.tolerance", 0.0),
    ("bounds.confidence", math.inf),
    ("dataset.val_fraction", 0.0),
]


@pytest.mark.parametrize(("key", "value"), EXPLICIT, ids=[f"{k}={v}" for k, v in EXPLICIT])
def test_check_refuses_the_reported_values(key, value, tmp_path):
    raw = _set(RAW["demo"], tuple(key.split(".")), value)
    with pytest.raises(ConfigError) as info:  # the same message in-process, from every shipped study
        parse_study(raw, "studies/demo.toml")
    assert str(info.value) == _expected("studies/demo.toml", key, value, value)
    for stem in RAW:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_study(_set(RAW[stem], tuple(key.split(".")), value), f"studies/{stem}.toml")
    done = _check(tmp_path, dump_toml(raw))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == f"error: {_expected('study.toml', key, value, value)}\n"


@pytest.mark.parametrize(("key", "value"), EXPLICIT, ids=[f"{k}={v}" for k, v in EXPLICIT])
def test_study_refuses_the_reported_values_before_writing_anything(key, value, tmp_path):
    """Where the bug bit: `pipeline study` used to create storage, runs and reports first."""
    done = _check(tmp_path, dump_toml(_set(RAW["demo"], tuple(key.split(".")), value)), "study")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"error: {_expected('study.toml', key, value, value)}\n"


@pytest.mark.parametrize(
    "command", [["worker"], ["rerun"], ["gradcheck"], ["export", "--out", "out"], ["report"], ["best"]]
)
def test_every_study_command_refuses_a_bad_value_before_writing_anything(command, tmp_path):
    done = _check(tmp_path, dump_toml(_set(RAW["demo"], ("sampler", "seed"), -1)), *command)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"error: {_expected('study.toml', 'sampler.seed', -1, -1)}\n"


def test_check_refuses_a_boolean_for_a_number(tmp_path):
    done = _check(tmp_path, dump_toml(_set(RAW["demo"], ("training", "epochs"), True)))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "error: study.toml: training.epochs = True: expected int, got bool\n"
