"""``[training] device``: parsing, resolving, provenance, and CPU runs that match the default bit for bit.

Oracles: ``torch.cuda`` (monkeypatched to fake a machine with or without CUDA), the files on disk
(nothing written when the device is refused), a study run with the default device (``auto`` is the
CPU on this machine), and ``torch.load`` of the logged weights. Runs on the CPU only; the CUDA
paths are exercised by ``make gpu-check`` on a machine that has one.
"""

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient

from pipeline import device as devices
from pipeline import tracking
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.data import load_split
from pipeline.model import load_weights
from pipeline.storage import open_storage
from tests.conftest import Workspace, tiny_study

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:0", "cuda:7"])
def test_device_spellings_parse(spec):
    assert tiny_study(training__device=spec).training.device == spec


def test_device_defaults_to_auto():
    assert tiny_study().training.device == "auto"


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:", "cuda:-1", "cuda:x", "cuda0", " cpu", "mps"])
def test_bad_device_names_file_key_value_and_fix(spec):
    with pytest.raises(ConfigError) as err:
        tiny_study(training__device=spec)
    message = str(err.value)
    assert message.startswith("studies/tiny.toml: training.device = ")
    assert repr(spec) in message
    assert "'cuda:N'" in message and "'cpu'" in message


def test_device_must_be_a_string():
    with pytest.raises(ConfigError, match=r"training.device = 0: expected str, got int"):
        tiny_study(training__device=0)


def test_the_device_does_not_change_the_config_hash():
    """Where a study runs is provenance, not configuration: the default and "cpu" hash alike."""
    assert tiny_study(training__device="cpu").config_hash() == tiny_study().config_hash()


def test_resolve_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve("auto") == torch.device("cpu")
    assert devices.resolve("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(devices.DeviceError) as err:
            devices.resolve(spec)
        message = str(err.value)
        assert "\n" not in message
        assert f"training.device = {spec!r}, but this machine has no CUDA device" in message
        assert "nothing was run" in message


def test_resolve_with_a_fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve("auto") == torch.device("cuda", 0)
    assert devices.resolve("cuda") == torch.device("cuda", 0)
    assert devices.resolve("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(
        devices.DeviceError, match=r"'cuda:2', but this machine has 2 CUDA devices \(cuda:0 to"
    ):
        devices.resolve("cuda:2")


def test_resolve_refuses_a_bad_spelling():
    with pytest.raises(devices.DeviceError, match="must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        devices.resolve("gpu")


def test_tf32_is_off_unless_bf16():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32  # torch's switches are module properties: restore by hand
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = True, True
        devices.set_precision("bf16")
        assert matmul.allow_tf32 and cudnn.allow_tf32
        devices.set_precision("full")
        assert not matmul.allow_tf32 and not cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


def test_provenance_has_the_device_fields_and_keeps_its_old_call():
    cpu = tracking.provenance(torch.device("cpu"))
    assert cpu["device"] == "cpu" and cpu["device_name"]
    old = tracking.provenance()
    assert "device" not in old and old["torch"] == cpu["torch"]
    assert devices.describe(torch.device("cpu")).keys() == {"device", "device_name"}


def test_split_to_returns_a_moved_copy():
    split = load_split(tiny_study().dataset)
    moved = split.to("cpu")
    assert moved is not split and moved.device == torch.device("cpu")
    assert moved.split_hash == split.split_hash and moved.ground_truth is split.ground_truth
    assert torch.equal(moved.x_train, split.x_train) and torch.equal(moved.y_test, split.y_test)
    x, _ = moved.ground_truth.sample(5, torch.Generator().manual_seed(0))  # still samples on the CPU
    assert x.shape == (5, 2)


def test_cuda_on_a_machine_without_it_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "gpu.toml"
    study.write_text(
        'name = "gpu"\ntrials = 1\n[dataset]\nsource = "gmm"\nn_train = 100\nn_test = 100\n'
        '[training]\nepochs = 1\ndevice = "cuda"\n[search]\nlr = 0.1\n'
    )
    assert main(["study", str(study)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {study}: training.device = 'cuda', but this machine has no CUDA device "
        f"(torch {torch.__version__}"
        + (f", built for CUDA {torch.version.cuda}" if torch.version.cuda else "")
        + "); use device = 'cpu' or 'auto'; nothing was run"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.toml"]  # no storage/, reports/, mlruns/


def _trials(ws):
    study = optuna.load_study(study_name="tiny", storage=open_storage(ws["storage"]))
    client = MlflowClient(ws["tracking_uri"])
    exp = client.get_experiment_by_name("tiny")
    runs = {
        r.data.tags["optuna_trial"]: r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("pipeline_role") == "trial"
    }
    return study, client, runs


def _stable(metrics):
    """A run's metrics without the wall-clock ones."""
    return {k: v for k, v in metrics.items() if not k.startswith("time_") and k != "train_seconds"}


def test_device_cpu_matches_the_default_bit_for_bit(tmp_path, monkeypatch):
    """``auto`` is the CPU here: the same trials, metrics and weights, exactly; model.pt is CPU tensors."""
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    found = []
    for spec in ("auto", "cpu"):
        root = tmp_path / spec
        ws = Workspace(
            storage=str(root / "storage" / "study.journal"),
            tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
            reports_root=root / "reports",
            root=root,
        )
        root.mkdir()
        ws.run(tiny_study(training__device=spec, training__seeds=2))
        study, client, runs = _trials(ws)
        weights = {}
        for number, run in runs.items():
            path = client.download_artifacts(run.info.run_id, "model.pt", str(root))
            state = torch.load(path, weights_only=True)  # no map_location: each tensor where it was saved
            assert {t.device for t in state.values()} == {torch.device("cpu")}
            weights[number] = load_weights(path)
            assert run.data.tags["device"] == "cpu" and run.data.tags["device_name"]
        found.append(
            (
                [(t.number, t.state, t.value, t.params) for t in study.trials],
                {n: _stable(r.data.metrics) for n, r in runs.items()},
                weights,
            )
        )
    (trials_a, metrics_a, weights_a), (trials_b, metrics_b, weights_b) = found
    assert trials_a == trials_b
    assert metrics_a == metrics_b
    assert weights_a.keys() == weights_b.keys()
    for number in weights_a:
        for key, tensor in weights_a[number].items():
            assert torch.equal(tensor, weights_b[number][key]), (number, key)


def test_gpu_check_without_cuda_says_so_and_exits_0():
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no CUDA device: nothing to check"
