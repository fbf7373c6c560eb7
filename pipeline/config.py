"""Study configuration: one TOML file parsed with the standard library into frozen dataclasses.

Every default lives in the dataclasses below with a one-line comment; a study file is a small
diff against them. Unknown keys, wrong types and out-of-range values raise ``ConfigError``
naming the file, the key and the value, before anything is written to disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
GMM_CLASSES = ("class 0", "class 1")
CLASSES = {"cifar2": CIFAR10_CLASSES, "fashion2": FASHION_CLASSES, "gmm": GMM_CLASSES}
DEFAULT_CLASSES = {"cifar2": ("airplane", "bird"), "fashion2": ("T-shirt/top", "Shirt"), "gmm": GMM_CLASSES}
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*")
OBJECTIVES = {"val_acc": "maximize", "val_loss": "minimize"}
SEARCHABLE = ("lr", "momentum", "weight_decay", "hidden", "activation")


class ConfigError(UsageError, ValueError):
    """A study file that cannot be run as written; the message says where and how to fix it."""


@dataclass(frozen=True)
class DatasetConfig:
    source: str = "gmm"  # cifar2 | fashion2 | gmm (synthetic 2-D ground truth)
    classes: tuple[str, ...] = ()  # the two classes, as named by the dataset; () = source default
    val_fraction: float = 0.2  # share of the training pool held out for validation
    seed: int = 0  # seeds the train/validation split (and the gmm draw)
    n_train: int = 1000  # gmm only: size of the training pool (train + validation)
    n_test: int = 2000  # gmm only: size of the test set
    download: bool = True  # allow fetching CIFAR-10 / Fashion-MNIST when missing
    root: str = "data"  # where datasets are read from / downloaded to


@dataclass(frozen=True)
class ModelConfig:
    hidden: tuple[int, ...] = (32, 32)  # hidden layer widths, input to output
    activation: str = "relu"  # relu | tanh


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 30  # passes over the training split
    batch_size: int = 256  # examples per step; 0 = the whole split (full-batch gradient descent)
    shuffle: bool = True  # reshuffle the batch order every epoch (seeded)
    seed: int = 0  # seeds weight init and batch order
    loss: str = "ce"  # ce (cross-entropy) | mse (squared error on one-hot targets)
    backward: str = "autograd"  # autograd | manual (pipeline.backprop)
    dtype: str = "float32"  # float32 | float64
    precision: str = "full"  # full (every op in dtype) | bf16 (forward under bfloat16 autocast; float32 only)
    population: int = 1  # trials trained at once as one batched computation (pipeline.population)


@dataclass(frozen=True)
class ParamSpec:
    """One searched hyperparameter: a fixed value, a float range (optionally log), or choices."""

    value: Any = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    @property
    def kind(self) -> str:
        if self.choices is not None:
            return "choices"
        return "value" if self.value is not None else "range"

    def values(self) -> tuple[Any, ...]:
        """Every value this spec can produce, where finite (for range checks and the grid)."""
        if self.kind == "choices":
            return self.choices  # type: ignore[return-value]
        if self.kind == "value":
            return (self.value,)
        return (self.low, self.high)


@dataclass(frozen=True)
class SamplerConfig:
    kind: str = "tpe"  # tpe | random | grid
    seed: int = 0  # seeds the sampler


@dataclass(frozen=True)
class PrunerConfig:
    kind: str = "none"  # none | median | hyperband
    warmup_epochs: int = 5  # median: epochs before a trial may be pruned


@dataclass(frozen=True)
class BoundsConfig:
    confidence: float = 0.9  # confidence level of every interval on the test error
    fresh_sets: int = 10_000  # gmm only: fresh test sets drawn for the true error distribution


@dataclass(frozen=True)
class GradcheckConfig:
    enabled: bool = False  # run the gradient check once before the trials
    tolerance: float = 1e-7  # float64 error at eps = 1e-5 above this fails the study
    max_examples: int = 2000  # cap on training examples used for the check


@dataclass(frozen=True)
class RerunConfig:
    seeds: int = 5  # training seeds the selected configuration is retrained with per rerun (>= 2)
    first_seed: int = 1  # seeds are first_seed, first_seed + 1, ...: fixed, so an unchanged rerun repeats
    trials: int = 0  # trial target a rerun continues the study to; 0 = the study's own `trials`


@dataclass(frozen=True)
class StudyConfig:
    name: str  # Optuna study, MLflow experiment and reports/ folder name
    path: str = ""  # the TOML file this came from
    trials: int = 10  # total trials (complete + pruned) across runs and workers
    objective: str = "val_acc"  # val_acc (maximize) | val_loss (minimize)
    description: str = ""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    search: dict[str, ParamSpec] = field(default_factory=dict)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    bounds: BoundsConfig = field(default_factory=BoundsConfig)
    gradcheck: GradcheckConfig = field(default_factory=GradcheckConfig)
    rerun: RerunConfig = field(default_factory=RerunConfig)

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]

    @property
    def classes(self) -> tuple[str, str]:
        return self.dataset.classes  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("path")
        data["search"] = {k: _spec_dict(v) for k, v in self.search.items()}
        return data

    def config_hash(self) -> str:
        """Hash of everything that defines the study's results (not its file path)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def search_space_signature(self) -> str:
        """Canonical JSON of the search space and objective: a resumed study must match it."""
        return json.dumps({"search": self.to_dict()["search"], "objective": self.objective}, sort_keys=True)

    def with_overrides(self, **changes: Any) -> StudyConfig:
        """A copy with command-line overrides (``trials``, ``epochs``, ``name``) applied."""
        cfg = self
        if changes.get("trials") is not None:
            cfg = dataclasses.replace(cfg, trials=_check_positive(cfg.path, "trials", changes["trials"]))
        if changes.get("epochs") is not None:
            epochs = _check_positive(cfg.path, "training.epochs", changes["epochs"])
            cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, epochs=epochs))
        if changes.get("name") is not None:
            cfg = dataclasses.replace(cfg, name=_check_name(cfg.path, changes["name"]))
        return cfg


def _spec_dict(spec: ParamSpec) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(spec).items() if v is not None and v is not False}


# --------------------------------------------------------------------------------------------
# Parsing


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study TOML file."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: no such study file; see studies/ for examples")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    return parse_study(raw, where)


def parse_study(raw: dict[str, Any], where: str = "<study>") -> StudyConfig:
    """Validate a TOML document (already parsed) into a ``StudyConfig``."""
    raw = dict(raw)
    sections = {
        "dataset": DatasetConfig,
        "model": ModelConfig,
        "training": TrainingConfig,
        "sampler": SamplerConfig,
        "pruner": PrunerConfig,
        "bounds": BoundsConfig,
        "gradcheck": GradcheckConfig,
        "rerun": RerunConfig,
    }
    top_level = {"name", "trials", "objective", "description", "search", *sections}
    for key in raw:
        if key not in top_level:
            raise ConfigError(f"{where}: unknown key {key!r}; expected one of {sorted(top_level)}")
    if "name" not in raw:
        raise ConfigError(f"{where}: missing key 'name' (the study's name, e.g. name = \"demo\")")
    name = _check_name(where, _typed(where, "name", raw["name"], str))
    parsed: dict[str, Any] = {
        key: _section(where, key, raw.get(key, {}), cls) for key, cls in sections.items()
    }
    cfg = StudyConfig(
        name=name,
        path=where,
        trials=_typed(where, "trials", raw.get("trials", 10), int),
        objective=_typed(where, "objective", raw.get("objective", "val_acc"), str),
        description=_typed(where, "description", raw.get("description", ""), str),
        search=_search(where, raw.get("search", {})),
        **parsed,
    )
    return _validate(cfg, where)


def _check_name(where: str, name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"{where}: name = {name!r}: use lower-case letters, digits, '-' and '_' only, "
            "starting with a letter or digit (it names folders under reports/)"
        )
    return name


def _check_positive(where: str, key: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {key} = {value!r}: must be an integer >= 1")
    return value


def _typed(where: str, key: str, value: Any, expected: Any) -> Any:
    """Check ``value`` against a field annotation; ints are accepted where floats are."""
    origin = typing.get_origin(expected)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} = {value!r}: expected a list")
        (item_type, _) = typing.get_args(expected)
        return tuple(_typed(where, f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        options = [t for t in typing.get_args(expected) if t is not type(None)]
        return _typed(where, key, value, options[0])
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[expected]
    if not ok:
        raise ConfigError(
            f"{where}: {key} = {value!r}: expected {expected.__name__}, got {type(value).__name__}"
        )
    return float(value) if expected is float else value


def _section(where: str, name: str, table: Any, cls: type) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{name}] must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {name}.{key}; expected one of {sorted(fields)}")
        values[key] = _typed(where, f"{name}.{key}", value, hints[key])
    return cls(**values)


def _search(where: str, table: Any) -> dict[str, ParamSpec]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [search] must be a table")
    specs = {}
    for key, entry in table.items():
        if key not in SEARCHABLE:
            raise ConfigError(f"{where}: unknown key search.{key}; searchable: {', '.join(SEARCHABLE)}")
        full = f"search.{key}"
        if not isinstance(entry, dict):
            entry = {"value": entry}
        allowed = {"value", "low", "high", "log", "choices"}
        for sub in entry:
            if sub not in allowed:
                raise ConfigError(f"{where}: unknown key {full}.{sub}; use value, low/high (+log) or choices")
        kinds = [k for k in ("value", "choices") if k in entry] + (
            ["range"] if {"low", "high"} & entry.keys() else []
        )
        if len(kinds) != 1:
            raise ConfigError(f"{where}: {full} = {entry!r}: give exactly one of value, low+high, or choices")
        kind = kinds[0]
        item = str if key == "activation" else int if key == "hidden" else float
        if kind == "range":
            if item is not float or not {"low", "high"} <= entry.keys():
                raise ConfigError(
                    f"{where}: {full} = {entry!r}: a range needs both low and high "
                    "(and is only for lr, momentum, weight_decay)"
                )
            low = _typed(where, f"{full}.low", entry["low"], float)
            high = _typed(where, f"{full}.high", entry["high"], float)
            log = _typed(where, f"{full}.log", entry.get("log", False), bool)
            if not low < high:
                raise ConfigError(
                    f"{where}: {full}: empty range low = {low} >= high = {high}; make low < high"
                )
            if log and low <= 0:
                raise ConfigError(f"{where}: {full}.low = {low}: a log range needs low > 0")
            specs[key] = ParamSpec(low=low, high=high, log=log)
        elif kind == "choices":
            if "log" in entry:
                raise ConfigError(f"{where}: {full}.log only applies to a low/high range")
            choices = entry["choices"]
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: {full}.choices = {choices!r}: give a non-empty list")
            values = tuple(_typed(where, f"{full}.choices[{i}]", v, item) for i, v in enumerate(choices))
            if len(set(values)) != len(values):
                raise ConfigError(f"{where}: {full}.choices = {choices!r}: repeated value")
            specs[key] = ParamSpec(choices=values)
        else:
            if "log" in entry:
                raise ConfigError(f"{where}: {full}.log only applies to a low/high range")
            specs[key] = ParamSpec(value=_typed(where, f"{full}.value", entry["value"], item))
    if "lr" not in specs:
        raise ConfigError(f"{where}: missing search.lr; e.g. lr = {{ low = 1e-3, high = 0.3, log = true }}")
    specs.setdefault("momentum", ParamSpec(value=0.0))
    specs.setdefault("weight_decay", ParamSpec(value=0.0))
    return specs


def _validate(cfg: StudyConfig, where: str) -> StudyConfig:
    """Range checks across sections; fills in the dataset's default classes."""

    def bad(key: str, value: Any, why: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r}: {why}")

    ds, tr = cfg.dataset, cfg.training
    if cfg.trials < 1:
        raise bad("trials", cfg.trials, "must be >= 1")
    if cfg.objective not in OBJECTIVES:
        raise bad("objective", cfg.objective, f"must be one of {sorted(OBJECTIVES)}")
    if ds.source not in CLASSES:
        raise bad("dataset.source", ds.source, f"must be one of {sorted(CLASSES)}")
    known = CLASSES[ds.source]
    classes = ds.classes or DEFAULT_CLASSES[ds.source]
    if len(classes) != 2 or classes[0] == classes[1]:
        raise bad("dataset.classes", list(classes), "give exactly two different class names")
    for name in classes:
        if name not in known:
            raise bad(
                "dataset.classes",
                list(classes),
                f"{name!r} is not a {ds.source} class; choose from {list(known)}",
            )
    if not 0 < ds.val_fraction < 1:
        raise bad("dataset.val_fraction", ds.val_fraction, "must be strictly between 0 and 1")
    for key in ("n_train", "n_test"):
        if getattr(ds, key) < 10:
            raise bad(f"dataset.{key}", getattr(ds, key), "must be >= 10")
    if tr.epochs < 1:
        raise bad("training.epochs", tr.epochs, "must be >= 1")
    if tr.batch_size < 0:
        raise bad("training.batch_size", tr.batch_size, "must be >= 1, or 0 for full batch")
    for key, allowed in (
        ("loss", ("ce", "mse")),
        ("backward", ("autograd", "manual")),
        ("dtype", ("float32", "float64")),
        ("precision", ("full", "bf16")),
    ):
        if getattr(tr, key) not in allowed:
            raise bad(f"training.{key}", getattr(tr, key), f"must be one of {list(allowed)}")
    if tr.precision == "bf16" and (tr.dtype != "float32" or tr.backward != "autograd"):
        raise bad(
            "training.precision",
            tr.precision,
            "bf16 autocast needs dtype = 'float32' and backward = 'autograd'; use precision = 'full'",
        )
    if tr.population < 1:
        raise bad("training.population", tr.population, "must be >= 1 (1 = one trial at a time)")
    if tr.population > 1 and tr.backward != "autograd":
        raise bad(
            "training.population",
            tr.population,
            "population training differentiates the batched models with autograd; "
            "use backward = 'autograd' or population = 1",
        )
    if any(w < 1 for w in cfg.model.hidden):
        raise bad("model.hidden", list(cfg.model.hidden), "every width must be >= 1")
    if cfg.model.activation not in ("relu", "tanh"):
        raise bad("model.activation", cfg.model.activation, "must be 'relu' or 'tanh'")
    if cfg.sampler.kind not in ("tpe", "random", "grid"):
        raise bad("sampler.kind", cfg.sampler.kind, "must be one of ['tpe', 'random', 'grid']")
    if cfg.pruner.kind not in ("none", "median", "hyperband"):
        raise bad("pruner.kind", cfg.pruner.kind, "must be one of ['none', 'median', 'hyperband']")
    if not 0 < cfg.bounds.confidence < 1:
        raise bad("bounds.confidence", cfg.bounds.confidence, "must be strictly between 0 and 1")
    if cfg.bounds.fresh_sets < 100:
        raise bad("bounds.fresh_sets", cfg.bounds.fresh_sets, "must be >= 100")
    if cfg.rerun.seeds < 2:
        raise bad("rerun.seeds", cfg.rerun.seeds, "must be >= 2 (a rerun reports the spread across seeds)")
    for key in ("first_seed", "trials"):
        if getattr(cfg.rerun, key) < 0:
            raise bad(f"rerun.{key}", getattr(cfg.rerun, key), "must be >= 0")

    checks = {
        "lr": (lambda v: v > 0 and math.isfinite(v), "must be > 0"),
        "momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
        "weight_decay": (lambda v: v >= 0 and math.isfinite(v), "must be >= 0"),
        "hidden": (lambda v: v >= 1, "must be >= 1"),
        "activation": (lambda v: v in ("relu", "tanh"), "must be 'relu' or 'tanh'"),
    }
    for key, spec in cfg.search.items():
        ok, why = checks[key]
        for value in spec.values():
            if not ok(value):
                raise bad(f"search.{key}", value, why)
        if key == "momentum" and spec.kind == "range" and spec.high >= 1:  # type: ignore[operator]
            raise bad("search.momentum.high", spec.high, "must be < 1")
        if cfg.sampler.kind == "grid" and spec.kind == "range":
            raise bad(
                f"search.{key}",
                _spec_dict(spec),
                "the grid sampler needs choices or a fixed value, not a range",
            )
    return dataclasses.replace(cfg, dataset=dataclasses.replace(ds, classes=tuple(classes)))
