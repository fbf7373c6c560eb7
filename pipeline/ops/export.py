"""Take the winner out: ``pipeline export`` writes the selected trial to a folder of its own.

The folder holds ``config.toml`` (a study file that retrains exactly this configuration: the
study's resolved settings with every searched key fixed to the trial's value, ``trials = 1``),
``model.pt`` (the trained state dict, CPU tensors only), ``metrics.json`` (the trial's own report
numbers, copied) and ``MODEL.md`` (a model card). It is written atomically: the whole folder
appears at once or not at all. The exported trial is ``ranked_trials(study)[0]``, the one
selection rule (validation only); nothing here selects again.

By default the export also logs the network to the trial's MLflow run with
``mlflow.pytorch.log_model`` (MLflow 3: ``name=``; saved as a ``torch.export`` program, no pickle),
registers it as a new version of ``<study>-best`` (``--register NAME``: of NAME) and moves the
alias ``best`` to it (aliases replace the deprecated stages). ``--no-register``: MLflow is only read.
The tracking store is checked first: one that does not answer, or a SQLite store that does not
exist, stops the export before anything is written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial

from pipeline import files, tracking
from pipeline.config import StudyConfig
from pipeline.model import load_weights, network_from_state
from pipeline.ops.manage import load
from pipeline.storage import StudyError, ranked_trials, redact, trial_counts
from pipeline.train import trial_setup

FILES = ("config.toml", "model.pt", "metrics.json", "MODEL.md")  # what an export folder holds
ALIAS = "best"  # the registered model alias moved to each exported version
MODEL_SUFFIX = "-best"  # the default registered model name is the study's name + this
MARKER = re.compile(r'# pipeline export of study "([^"]+)", trial (\d+)')  # config.toml's first line
NOTHING = "nothing was written"


@dataclass(frozen=True)
class Export:
    """What ``export`` wrote: the folder, the trial, whether it replaced an earlier export of the
    same study (its trial number), and the registered name and version (None with ``--no-register``)."""

    out: Path
    study: str
    trial: int
    run_id: str
    replaced: int | None
    registered: str | None
    version: str | None


# --------------------------------------------------------------------------------------------
# Checks made before anything is written


def previous_export(out: Path, study: str) -> int | None:
    """``None`` if ``out`` is absent or empty; the trial number of the earlier export of ``study``
    it holds (to be replaced); else StudyError saying what is there."""
    if not out.exists() and not out.is_symlink():
        return None
    if not out.is_dir():
        raise StudyError(f"--out {out}: is a file, not a folder; give a new or empty folder ({NOTHING})")
    held = sorted(p.name for p in out.iterdir())
    if not held:
        return None
    head = (
        (out / "config.toml").read_text(errors="replace").split("\n", 1)[0]
        if (out / "config.toml").is_file()
        else ""
    )
    found = MARKER.match(head)
    if found is None:
        shown = ", ".join(held[:5]) + (", …" if len(held) > 5 else "")
        raise StudyError(
            f"--out {out}: not empty and not a pipeline export (it holds {shown}); "
            f"choose a new or empty folder ({NOTHING})"
        )
    if found.group(1) != study:
        raise StudyError(
            f"--out {out}: holds the export of study {found.group(1)!r} (trial {found.group(2)}), "
            f"not of {study!r}; choose another folder, or remove it first ({NOTHING})"
        )
    extra = [name for name in held if name not in FILES]
    if extra:
        raise StudyError(
            f"--out {out}: the earlier export of study {study!r} there also holds {', '.join(extra)}, "
            f"which replacing it would delete; move them out or choose another folder ({NOTHING})"
        )
    return int(found.group(2))


def model_name(cfg: StudyConfig, register_as: str | None = None) -> str:
    """The registered model name: ``register_as``, else ``<study>-best``; MLflow's rule checked."""
    return check_model_name(register_as if register_as is not None else f"{cfg.name}{MODEL_SUFFIX}")


def check_tracking(uri: str) -> None:
    """The tracking store answers (its weights are read from it): StudyError before anything is
    written otherwise. A SQLite store that does not exist is not created."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise StudyError(
            f"MLflow tracking store {redact(uri)} does not exist; the trial's weights are read from it: "
            f"give the study's --tracking-uri or $MLFLOW_TRACKING_URI ({NOTHING})"
        )
    tracking.check_reachable(uri)


def check_model_name(name: str) -> str:
    """MLflow's rule for registered model names, checked before anything is written."""
    if not name.strip() or "/" in name or ":" in name:
        raise StudyError(
            f"--register {name!r}: a registered model name must be non-empty, without '/' or ':' "
            f"(e.g. --register demo-mlp; {NOTHING})"
        )
    return name


# --------------------------------------------------------------------------------------------
# The four files


def toml_value(value: Any) -> str:
    """One TOML value: the types a study file uses (strings as JSON escapes, which TOML reads too)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else f"{value:+}")
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def retrain_config(cfg: StudyConfig, trial: FrozenTrial, run_id: str) -> str:
    """``config.toml``: the study's resolved settings, each searched key fixed to the trial's value,
    one trial, under a study name of its own (so it never resumes the original study)."""
    if set(trial.params) != set(cfg.search):
        raise StudyError(
            f"{cfg.path}: the study file searches {sorted(cfg.search)} but trial {trial.number} "
            f"has params {sorted(trial.params)}; export with the study file the study ran with ({NOTHING})"
        )
    data = cfg.to_dict()
    data["name"] = f"{cfg.name}-trial-{trial.number}"
    data["trials"] = 1
    data["description"] = f"Retrains trial {trial.number} of study {cfg.name} (pipeline export)."
    data["search"] = {key: trial.params[key] for key in cfg.search}
    lines = [
        f'# pipeline export of study "{cfg.name}", trial {trial.number} (MLflow run {run_id}).',
        f"# Retrains exactly that configuration as study {data['name']}: `pipeline study` this file.",
        "# Every setting is written out, defaults included; [search] holds the trial's values.",
        "",
    ]
    lines += [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    for table, values in data.items():
        if isinstance(values, dict):
            lines.append(f"\n[{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def trial_weights(client, run_id: str) -> dict[str, torch.Tensor]:
    """The trial's ``model.pt`` from its MLflow run, as CPU tensors (pickles other than tensors refused)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(client, run_id, "model.pt", tmp)
        if path is None:
            raise StudyError(
                f"MLflow run {run_id} has no model.pt artifact (run or artifacts deleted?); "
                f"check --tracking-uri ({NOTHING})"
            )
        state = load_weights(path)
    return {key: tensor.detach().to("cpu").contiguous() for key, tensor in state.items()}


def trial_metrics(client, trial: FrozenTrial, run_id: str) -> tuple[str, dict[str, Any]]:
    """The trial's ``metrics.json`` (its text, to copy, and its numbers): its report folder's copy
    if it is this run's, else the copy logged to its MLflow run."""
    report = trial.user_attrs.get("report")
    if report:
        path = Path(report).with_name("metrics.json")
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text(encoding="utf-8")
            found = json.loads(text)
            if found.get("trial") == trial.number and found.get("provenance", {}).get("run_id") == run_id:
                return text, found
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(client, run_id, "metrics.json", tmp)
        if path is None:
            raise StudyError(
                f"trial {trial.number}: no metrics.json in its report folder ({report or 'none recorded'}) "
                f"nor in MLflow run {run_id}; rebuild it with `pipeline study` ({NOTHING})"
            )
        text = path.read_text(encoding="utf-8")
    try:
        return text, json.loads(text)
    except ValueError:
        raise StudyError(f"MLflow run {run_id}: its metrics.json is not JSON ({NOTHING})") from None


def network(cfg: StudyConfig, params: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The trial's MLP (shape from its params, widths from the weights) holding ``state``."""
    shape, _ = trial_setup(cfg.model, params)
    return network_from_state(shape.hidden, shape.activation, state)


def _interval(metrics: dict[str, Any], method: str) -> tuple[float, float] | None:
    for iv in metrics.get("intervals", ()):
        if iv.get("method") == method and iv.get("low") is not None and iv.get("high") is not None:
            return iv["low"], iv["high"]
    return None


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def model_card(
    cfg: StudyConfig,
    trial: FrozenTrial,
    study: optuna.Study,
    spec: str,
    metrics: dict[str, Any],
    model: torch.nn.Module,
    out: Path,
    registered: tuple[str, str] | None,
) -> str:
    """``MODEL.md``: what the network is, its data, its test error and what that means, how it was
    chosen, where it came from, how to load it."""
    attrs, run_id = trial.user_attrs, attrs_run(trial)
    confidence = metrics.get("confidence", cfg.bounds.confidence)
    shape, _ = trial_setup(cfg.model, trial.params)
    classes = list(cfg.dataset.classes)
    counts = trial_counts(study)
    k, m = metrics.get("test_k"), metrics.get("test_m")
    error = metrics.get("test_error", attrs.get("test_error", math.nan))
    cp = _interval(metrics, "clopper_pearson") or (
        attrs.get("test_error_clopper_pearson_low", math.nan),
        attrs.get("test_error_clopper_pearson_high", math.nan),
    )
    width = model.linears[0].in_features
    dtype = next(model.parameters()).dtype
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    prov = metrics.get("provenance", {})
    lines = [
        f"# Model card: study `{cfg.name}`, trial {trial.number}",
        "",
        f"Exported by `pipeline export` on {stamp} from the Optuna study `{cfg.name}` in "
        f"`{redact(spec)}` (study file `{cfg.path}`).",
        "",
        "## The network",
        "",
        f"A multilayer perceptron: {width} input features, hidden widths {list(shape.hidden)}, "
        f"`{shape.activation}` between layers, 2 logits out (class 0 = `{classes[0]}`, class 1 = "
        f"`{classes[1]}`), {str(dtype).removeprefix('torch.')} weights. Trained for "
        f"{metrics.get('epochs_run', attrs.get('epochs_run', '?'))} epochs with training seed "
        f"{cfg.training.seed} and these searched params:",
        "",
        "| param | value |",
        "|---|---|",
        *(f"| `{key}` | {_number(value)} |" for key, value in trial.params.items()),
        "",
        "## Data",
        "",
        f"- source: `{cfg.dataset.source}`, classes: `{classes[0]}` vs `{classes[1]}`",
        f"- split hash: `{metrics.get('split_hash', '?')}` (changes when the data or the split changes)",
        f"- test set: m = {m} points, never used for training or for choosing this trial",
        "",
        "## Test error",
        "",
        f"Test error {error:.4f} ({k} of {m} test points misclassified). "
        f"{confidence:.0%} Clopper–Pearson interval: **[{cp[0]:.4f}, {cp[1]:.4f}]** (guaranteed).",
        "",
        f"What it means: for this fixed network, the number of test errors k is exactly Binomial(m, R), "
        f"R being its true error rate on data drawn like the test set. The Clopper–Pearson interval "
        f"inverts that binomial exactly, so intervals built this way contain R at least "
        f"{confidence:.0%} of the time, whatever R is. It is about this network on data like this test "
        "set: not about a retrain with another seed, nor about data from elsewhere.",
    ]
    truth = metrics.get("ground_truth", {}).get("true_error")
    if truth is not None:
        inside = "inside" if cp[0] <= truth <= cp[1] else "outside"
        lines += ["", f"The synthetic ground truth knows R: {truth:.4f} ({inside} the interval)."]
    replicates = attrs.get("replicates", 1)
    if isinstance(replicates, (int, float)) and replicates > 1:
        replicates = int(replicates)
        spread = attrs.get("test_error_std")
        sd = f" ± {spread:.4f} (sd)" if isinstance(spread, float) else ""
        lines += [
            "",
            f"These weights are replicate 0 of {replicates}: the trial trained {replicates} networks "
            f"with different seeds. Test error over the seeds: {attrs.get('test_error', float('nan')):.4f}"
            f"{sd}, mean over {replicates} seeds. The interval above is this network's own; the seed "
            "spread is what to expect from retraining.",
        ]
    lines += [
        "",
        "## How it was selected",
        "",
        f"Trial {trial.number} is the best of the study's {counts.complete} complete trials by "
        f"`{cfg.objective}` on the validation split ({cfg.objective} = {trial.value:.4f}; ties go to "
        f"the lower validation loss, then the earlier trial). {counts.total} trials were looked at in "
        f"all: {counts.complete} complete, {counts.pruned} pruned, {counts.fail} failed. Every trial "
        "was also tested, but no test number chose anything, so the test error above is not inflated "
        f"by the selection. The winner's {cfg.objective}, by contrast, is optimistic: it is the best of "
        f"{counts.complete}.",
        "",
        "## Provenance",
        "",
        f"- MLflow run: `{run_id}` (experiment `{cfg.name}`)",
        f"- config hash: `{metrics.get('config_hash', '?')}`, git commit: `{prov.get('git_commit', '?')}`",
        "- " + ", ".join(f"{lib} {prov.get(lib, '?')}" for lib in ("torch", "mlflow", "optuna")),
    ]
    if registered is not None:
        name, version = registered
        lines.append(
            f"- registered model `{name}` version {version}, alias `{ALIAS}`: `models:/{name}@{ALIAS}`"
        )
    dtype_arg = "" if dtype == torch.float32 else f", dtype=torch.{str(dtype).removeprefix('torch.')}"
    lines += [
        "",
        "## How to load it",
        "",
        "```python",
        "import torch",
        "from pipeline.model import build_mlp",
        f'model = build_mlp({width}, {list(shape.hidden)}, "{shape.activation}", seed=0{dtype_arg})'
        "  # shape from config.toml",
        f'model.load_state_dict(torch.load("{out / "model.pt"}", weights_only=True))',
        f"predicted = model(x).argmax(1)  # x: [n, {width}] preprocessed as pipeline.data.load_split does",
        "```",
        "",
        f'Inputs come from `pipeline.data.load_split(pipeline.config.load_study("{out / "config.toml"}")'
        ".dataset)`. `config.toml` retrains this configuration: "
        f"`pipeline study {out / 'config.toml'}` (a new study, `{cfg.name}-trial-{trial.number}`, one "
        "trial). `metrics.json` is the trial's report: every interval, the confusion matrix, the curves.",
    ]
    return "\n".join(lines) + "\n"


def attrs_run(trial: FrozenTrial) -> str:
    """The trial's MLflow run id, or StudyError."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        raise StudyError(f"trial {trial.number} recorded no MLflow run; nothing to export ({NOTHING})")
    return run_id


# --------------------------------------------------------------------------------------------
# MLflow registry


@contextlib.contextmanager
def fluent_tracking(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``start_run``, ``log_model``) on ``uri``; the previous URI restored after."""
    before = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri keeps the env var in step with it
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def register(
    client, uri: str, run_id: str, model: torch.nn.Module, name: str, cfg: StudyConfig, trial: FrozenTrial
) -> str:
    """Log ``model`` to the trial's run (``name="model"``), register it as ``name``, move the alias
    ``best`` to it; returns the version. The run keeps the status it had. A store failing on the way
    is one line (StudyError); the folder is then not written."""
    try:
        return _register(client, uri, run_id, model, name, cfg, trial)
    except Exception as exc:
        line = tracking.store_error(exc)
        if line is None:
            raise
        raise StudyError(
            f"registering {name!r}: {line}; the export folder was not written (MLflow may hold a "
            f"logged model without the alias): fix the store and export again, or pass --no-register"
        ) from exc


def _register(
    client, uri: str, run_id: str, model: torch.nn.Module, name: str, cfg: StudyConfig, trial: FrozenTrial
) -> str:
    status = client.get_run(run_id).info.status
    width = model.linears[0].in_features
    dtype = next(model.parameters()).dtype
    example = np.zeros((2, width), dtype=torch.empty(0, dtype=dtype).numpy().dtype)  # shape and dtype only
    with fluent_tracking(uri):
        mlflow.start_run(run_id=run_id)
        try:
            # MLflow 3's default format here is torch.export's pt2 (no pickle); it needs an input example
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                input_example=example,
                registered_model_name=name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                params={k: str(v) for k, v in trial.params.items()},
                tags={"optuna_study": cfg.name, "optuna_trial": str(trial.number)},
            )
        finally:
            mlflow.end_run(status=status)  # a failure here must not mark the trial's run FAILED
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, ALIAS, version)
    for key, value in (("optuna_study", cfg.name), ("optuna_trial", trial.number), ("mlflow_run_id", run_id)):
        client.set_model_version_tag(name, version, key, str(value))
    return version


# --------------------------------------------------------------------------------------------
# The command


def export(
    cfg: StudyConfig,
    out: Path,
    storage: str | None = None,
    tracking_uri: str | None = None,
    register_as: str | None = None,
    register_model: bool = True,
) -> Export:
    """Write the selected trial of ``cfg``'s study to ``out`` (atomically) and, unless
    ``register_model`` is false, register it as ``register_as`` (default ``<study>-best``)."""
    study, spec = load(cfg, storage)
    ranked = ranked_trials(study)
    if not ranked:
        raise StudyError(f"{cfg.path}: study {cfg.name!r} has no complete trial yet; nothing to export")
    top = ranked[0]
    replaced = previous_export(out, cfg.name)
    name = model_name(cfg, register_as) if register_model else None
    run_id = attrs_run(top)
    uri = tracking.tracking_uri(tracking_uri)
    check_tracking(uri)
    client = tracking.client(uri)
    config_text = retrain_config(cfg, top, run_id)
    state = trial_weights(client, run_id)
    metrics_text, metrics = trial_metrics(client, top, run_id)
    model = network(cfg, top.params, state)
    version = None
    with files.atomic_dir(out) as tmp:
        files.write_text(tmp / "config.toml", config_text)
        files.atomic_write(tmp / "model.pt", lambda handle: torch.save(state, handle))
        files.write_text(tmp / "metrics.json", metrics_text)
        if name is not None:  # last before the card: a failure leaves no folder behind
            version = register(client, uri, run_id, model, name, cfg, top)
        registered = (name, version) if version is not None else None
        card = model_card(cfg, top, study, spec, metrics, model, out, registered)
        files.write_text(tmp / "MODEL.md", card)
    return Export(out, cfg.name, top.number, run_id, replaced, name, version)


def export_main(
    cfg: StudyConfig,
    storage: str | None,
    tracking_uri: str | None,
    out: Path,
    register_as: str | None,
    register_model: bool = True,
) -> int:
    """``pipeline export``: the selected trial's folder and, unless ``--no-register``, its registry entry."""
    done = export(cfg, out, storage, tracking_uri, register_as, register_model)
    print(f"exported trial {done.trial} of study {done.study} (best {cfg.objective} on validation) to {out}/")
    if done.replaced is not None:
        print(f"  replaced the earlier export of study {done.study} (trial {done.replaced}) there")
    print(f"  config.toml   retrains it: pipeline study {out / 'config.toml'}")
    print("  model.pt      its weights: torch.load(..., weights_only=True) into pipeline.model.build_mlp")
    print("  metrics.json  its report's numbers: test error, intervals, confusion matrix, curves")
    print("  MODEL.md      its model card")
    if done.version is not None:
        print(
            f"registered model {done.registered!r} version {done.version} (alias {ALIAS}: "
            f"models:/{done.registered}@{ALIAS}), logged to MLflow run {done.run_id}"
        )
    else:
        print("not registered (--no-register): MLflow was only read")
    return 0
