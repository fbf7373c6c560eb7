"""Study configuration: one TOML file parsed with the standard library into frozen dataclasses.

Every default lives in the dataclasses below with a one-line comment; a study file is a small
diff against them. Unknown keys, wrong types and out-of-range values raise ``ConfigError``
naming the file, the key and the value, before anything is written to disk.
"""

from __future__ import annotations

import contextlib
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
from pipeline.threads import ThreadsError, parse_threads

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_CLASSES = tuple(
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
)
GMM_CLASSES = ("class 0", "class 1")
CLASSES = {"cifar2": CIFAR10_CLASSES, "fashion2": FASHION_CLASSES, "gmm": GMM_CLASSES}
DEFAULT_CLASSES = {"cifar2": ("airplane", "bird"), "fashion2": ("T-shirt/top", "Shirt"), "gmm": GMM_CLASSES}
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*")
OBJECTIVES = {"val_acc": "maximize", "val_loss": "minimize"}
SEARCHABLE = ("lr", "momentum", "weight_decay", "hidden", "activation")
SEED_MAX = 2**32 - 1  # numpy's RandomState (Optuna's samplers) takes seeds below 2**32; one rule for all
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")  # [training] device; pipeline.device resolves it


class ConfigError(UsageError, ValueError):
    """A study file that cannot be run as written; the message says where and how to fix it."""


@dataclass(frozen=True)
class Range:
    """The values one numeric key allows: ``low`` to ``high``, each end included unless marked open,
    never NaN or infinite; ``why`` is the message's fix."""

    low: float
    high: float = math.inf
    why: str = ""
    open_low: bool = False
    open_high: bool = False

    def admits(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return math.isfinite(value) and above and below


_SEED = Range(0, SEED_MAX, f"must be an integer in [0, {SEED_MAX}] (0 to 2**32 - 1)")
_PROBABILITY = Range(0, 1, "must be strictly between 0 and 1", open_low=True, open_high=True)

# Every numeric key of a study file (dotted, as written in it) and its range; search.<key> covers that
# parameter's value, choices and low/high. A list (model.hidden) is checked item by item.
RANGES: dict[str, Range] = {
    "trials": Range(1, why="must be >= 1"),
    "dataset.val_fraction": _PROBABILITY,
    "dataset.seed": _SEED,
    "dataset.n_train": Range(10, why="must be >= 10"),
    "dataset.n_test": Range(10, why="must be >= 10"),
    "model.hidden": Range(1, why="every width must be >= 1"),
    "training.epochs": Range(1, why="must be >= 1"),
    "training.batch_size": Range(0, why="must be >= 1, or 0 for full batch"),
    "training.seed": _SEED,
    "training.population": Range(1, why="must be >= 1 (1 = one trial at a time)"),
    "training.seeds": Range(1, why="must be >= 1 (1 = one training seed per trial; 3-5 show seed noise)"),
    "search.lr": Range(0, why="must be > 0", open_low=True),
    "search.momentum": Range(0, 1, "must be in [0, 1)", open_high=True),
    "search.weight_decay": Range(0, why="must be >= 0"),
    "search.hidden": Range(1, why="must be >= 1"),
    "sampler.seed": _SEED,
    "pruner.warmup_epochs": Range(0, why="must be >= 0 (0 = the median pruner may prune from epoch 1)"),
    "bounds.confidence": _PROBABILITY,
    "bounds.fresh_sets": Range(100, why="must be >= 100"),
    "gradcheck.tolerance": Range(0, why="must be > 0, e.g. 1e-7", open_low=True),
    "gradcheck.max_examples": Range(1, why="must be >= 1 (training examples the check uses)"),
    "rerun.seeds": Range(2, why="must be >= 2 (a rerun reports the spread across seeds)"),
    "rerun.first_seed": _SEED,
    "rerun.trials": Range(0, why="must be >= 0"),
    "rerun.alpha": _PROBABILITY,
    "rerun.planned": Range(0, why="must be >= 0 (reruns planned against one baseline; 0 = not planned)"),
}
ALPHA_SPENDING = ("none", "bonferroni")

# The rerun's drift test (pipeline.ops.drift.permutation_p_values) enumerates every split of the
# baseline's and the rerun's replicates up to this many splits (C(20, 10) = 184 756: 10 seeds vs 10),
# and beyond draws this many seeded random splits.
PERMUTATION_EXACT_LIMIT = 200_000
PERMUTATION_RESAMPLES = 199_999


def smallest_p_value(seeds: int) -> float:
    """The smallest two-sided p-value the drift test can return for ``seeds`` replicates against as
    many: 2 / C(2K, K) when it enumerates the splits (one extreme split in each tail), else
    2 / (resamples + 1). A per-rerun alpha below it can never flag drift."""
    splits = math.comb(2 * seeds, seeds)
    return 2 / splits if splits <= PERMUTATION_EXACT_LIMIT else 2 / (PERMUTATION_RESAMPLES + 1)


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
    seeds: int = 1  # training seeds per trial (replicates); the objective is their mean
    device: str = "auto"  # auto (CUDA when available, else CPU) | cpu | cuda | cuda:N (pipeline.device)
    threads: int | str = "auto"  # auto | cores | free | N: CPU threads per process (pipeline.threads)


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
    fresh_sets: int = 10_000  # gmm only: fresh test sets drawn for the selected trial on the study page


@dataclass(frozen=True)
class GradcheckConfig:
    enabled: bool = False  # run the gradient check once before the trials
    tolerance: float = 1e-7  # float64 error at eps = 1e-5 above this fails the study
    max_examples: int = 2000  # cap on training examples used for the check


@dataclass(frozen=True)
class RerunConfig:
    seeds: int = 10  # replicates per rerun and baseline; the test reaches alpha 0.01 from 5, 0.01/365 from 10
    first_seed: int = 1  # seeds are first_seed, first_seed + 1, ...; the baseline freezes the list
    trials: int = 0  # trial target a rerun continues the study to; 0 = the study's own `trials`
    alpha: float = 0.01  # drift test's false-alarm rate (two-sided permutation test vs the baseline)
    alpha_spending: str = "none"  # none: each rerun tests at alpha | bonferroni: at alpha / planned
    planned: int = 0  # reruns planned against one baseline (bonferroni's N, e.g. 365); 0 = not planned

    @property
    def alpha_per_rerun(self) -> float:
        """The level each rerun's test is run at: alpha, or alpha / planned under Bonferroni (which
        keeps the chance of any false alarm over the planned reruns at most alpha)."""
        return self.alpha / self.planned if self.alpha_spending == "bonferroni" else self.alpha


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
        data = self.to_dict()
        if self.training.seeds == 1:  # the default leaves the hash of a study written before the key
            del data["training"]["seeds"]
        for key in ("device", "threads"):  # where it runs, not what: the provenance says where it ran
            del data["training"][key]
        del data["rerun"]  # how reruns test the selection, not what a trial computes
        blob = json.dumps(data, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def search_space_signature(self) -> str:
        """Canonical JSON of the search space and objective: a resumed study must match it."""
        signature: dict[str, Any] = {"search": self.to_dict()["search"], "objective": self.objective}
        if self.training.seeds != 1:  # a mean over K seeds is another objective than one seed's value
            signature["seeds"] = self.training.seeds
        return json.dumps(signature, sort_keys=True)

    def budget_signature(self) -> str:
        """Canonical JSON of a trial's budget (epochs, training seeds): a resumed study must match it,
        or trials trained for 10 epochs would be ranked against trials trained for 3."""
        return json.dumps({"epochs": self.training.epochs, "seeds": self.training.seeds}, sort_keys=True)

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
    if path.is_dir():
        raise ConfigError(
            f"{where}: is a folder, not a study file; give a .toml file, e.g. studies/demo.toml"
        )
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


def _check_range(where: str, key: str, value: Any) -> None:
    """Raise unless ``value`` (or every item of a tuple) lies in ``RANGES[key]``."""
    allowed = RANGES[key]
    for item in value if isinstance(value, tuple) else (value,):
        if not allowed.admits(item):
            why = allowed.why if math.isfinite(item) else f"not a finite number; {allowed.why}"
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(f"{where}: {key} = {shown!r}: {why}")


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
        for option in options:  # the first option the value has (int | str: 4 or "auto")
            with contextlib.suppress(ConfigError):
                return _typed(where, key, value, option)
        names = " or ".join(t.__name__ for t in options)
        raise ConfigError(f"{where}: {key} = {value!r}: expected {names}, got {type(value).__name__}")
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
            for bound in (low, high):
                _check_range(where, full, bound)
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
            for value in values if item is not str else ():
                _check_range(where, full, value)
            if len(set(values)) != len(values):
                raise ConfigError(f"{where}: {full}.choices = {choices!r}: repeated value")
            specs[key] = ParamSpec(choices=values)
        else:
            if "log" in entry:
                raise ConfigError(f"{where}: {full}.log only applies to a low/high range")
            value = _typed(where, f"{full}.value", entry["value"], item)
            if item is not str:
                _check_range(where, full, value)
            specs[key] = ParamSpec(value=value)
    if "lr" not in specs:
        raise ConfigError(f"{where}: missing search.lr; e.g. lr = {{ low = 1e-3, high = 0.3, log = true }}")
    specs.setdefault("momentum", ParamSpec(value=0.0))
    specs.setdefault("weight_decay", ParamSpec(value=0.0))
    return specs


def _validate_rerun(rerun: RerunConfig, bad: typing.Callable[[str, Any, str], ConfigError]) -> None:
    """The drift test's alpha policy: a known spending rule, and an alpha the test can reach."""
    if rerun.alpha_spending not in ALPHA_SPENDING:
        raise bad(
            "rerun.alpha_spending",
            rerun.alpha_spending,
            "must be 'none' (each rerun tests at alpha) or 'bonferroni' (each at alpha / planned)",
        )
    if rerun.alpha_spending == "none":
        if rerun.planned:
            raise bad(
                "rerun.planned",
                rerun.planned,
                "is only used with alpha_spending = 'bonferroni'; set that, or remove planned",
            )
        return
    if not rerun.planned:
        raise bad(
            "rerun.planned",
            rerun.planned,
            "alpha_spending = 'bonferroni' tests each rerun at alpha / planned; set planned to the "
            "number of reruns the schedule makes against one baseline (e.g. 365: a year of daily reruns)",
        )
    floor = smallest_p_value(rerun.seeds)
    if floor > rerun.alpha_per_rerun:
        enough = next((k for k in range(rerun.seeds, 12) if smallest_p_value(k) <= rerun.alpha_per_rerun), 0)
        raise bad(
            "rerun.seeds",
            rerun.seeds,
            f"with alpha_spending = 'bonferroni' each rerun tests at alpha / planned = "
            f"{rerun.alpha:g} / {rerun.planned} = {rerun.alpha_per_rerun:.3g}, but {rerun.seeds} "
            f"replicates against {rerun.seeds} give no p-value below {floor:.3g}, so drift could never "
            f"be flagged; " + (f"use seeds >= {enough}, or " if enough else "use ") + "a larger alpha "
            "or a smaller planned",
        )


def _validate(cfg: StudyConfig, where: str) -> StudyConfig:
    """Range checks across sections; fills in the dataset's default classes."""

    def bad(key: str, value: Any, why: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r}: {why}")

    ds, tr = cfg.dataset, cfg.training
    for key in RANGES:  # every numeric key outside [search] (whose numbers _search checked as it read them)
        section, _, name = key.rpartition(".")
        if section != "search":
            _check_range(where, key, getattr(getattr(cfg, section) if section else cfg, name))
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
    if not DEVICE_PATTERN.fullmatch(tr.device):
        raise bad(
            "training.device",
            tr.device,
            "must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N = the GPU's index), e.g. device = 'cuda:0'",
        )
    try:
        parse_threads(tr.threads, where)
    except ThreadsError as exc:
        raise ConfigError(str(exc)) from None
    if tr.population > 1 and tr.backward != "autograd":
        raise bad(
            "training.population",
            tr.population,
            "population training differentiates the batched models with autograd; "
            "use backward = 'autograd' or population = 1",
        )
    if cfg.model.activation not in ("relu", "tanh"):
        raise bad("model.activation", cfg.model.activation, "must be 'relu' or 'tanh'")
    if cfg.sampler.kind not in ("tpe", "random", "grid"):
        raise bad("sampler.kind", cfg.sampler.kind, "must be one of ['tpe', 'random', 'grid']")
    if cfg.pruner.kind not in ("none", "median", "hyperband"):
        raise bad("pruner.kind", cfg.pruner.kind, "must be one of ['none', 'median', 'hyperband']")
    last_seed = cfg.rerun.first_seed + cfg.rerun.seeds - 1
    if last_seed > SEED_MAX:
        raise bad(
            "rerun.first_seed",
            cfg.rerun.first_seed,
            f"the rerun's training seeds run to first_seed + seeds - 1 = {last_seed}; "
            f"keep that <= {SEED_MAX} (2**32 - 1)",
        )
    _validate_rerun(cfg.rerun, bad)

    for key, spec in cfg.search.items():
        if key == "activation":
            for value in spec.values():
                if value not in ("relu", "tanh"):
                    raise bad("search.activation", value, "must be 'relu' or 'tanh'")
        if key == "momentum" and spec.kind == "range" and spec.high >= 1:  # type: ignore[operator]
            raise bad("search.momentum.high", spec.high, "must be < 1")
        if cfg.sampler.kind == "grid" and spec.kind == "range":
            raise bad(
                f"search.{key}",
                _spec_dict(spec),
                "the grid sampler needs choices or a fixed value, not a range",
            )
    return dataclasses.replace(cfg, dataset=dataclasses.replace(ds, classes=tuple(classes)))
