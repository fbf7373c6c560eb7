"""``scripts/gpu_check.py``'s study end to end, run on the CPU at a tiny size (the script runs it on
the GPU): the numbers it returns agree with each other and with the rows it writes.

Oracles: the requested trial count, ``trials / wall`` recomputed, the pipeline's own ``load_split``
(the random idx files' sizes and labels), and plain arithmetic for the budget.
"""

import importlib.util
from pathlib import Path

import pytest

from pipeline import files
from pipeline.bench.process import STAGE_KEYS, TRIAL_KEY
from pipeline.config import DatasetConfig
from pipeline.data import load_split

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load_script()


def test_random_fashion_files_load_as_a_balanced_fashion2_split(tmp_path):
    data = gpu_check.fashion_data(tmp_path, per_class=(30, 10))
    assert data == "random data (60 training-pool / 20 test images)"
    split = load_split(DatasetConfig(source="fashion2", root=str(tmp_path), download=False))
    assert split.sizes == {"train": 48, "val": 12, "test": 20}
    assert split.input_dim == 784
    assert int(split.y_test.sum()) == 10  # 10 Shirts, 10 T-shirts
    assert int(split.y_train.sum() + split.y_val.sum()) == 30


@pytest.mark.slow
def test_study_end_to_end_on_cpu_numbers_agree_with_the_rows(tmp_path, monkeypatch):
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = gpu_check.fashion_data(tmp_path / "data", per_class=(24, 8))
    results = [gpu_check.study_end_to_end("cpu", 3, 1, pop, tmp_path / "data") for pop in (1, 2)]
    for result, population in zip(results, (1, 2), strict=True):
        assert (result["device"], result["population"], result["epochs"]) == ("cpu", population, 1)
        assert result["complete"] == result["trials"] == 3
        assert result["wall_s"] > 0
        assert result["trials_per_s"] == pytest.approx(3 / result["wall_s"], rel=1e-12)
        stages = result["stages"]
        assert tuple(stages) == gpu_check.STUDY_KEYS == (*STAGE_KEYS, TRIAL_KEY)
        assert all(seconds >= 0 for seconds in stages.values()), stages
        assert stages["time_train_s"] > 0
        assert stages["time_trial_s"] >= stages["time_train_s"]

    out = tmp_path / "reports" / "bench" / "gpu.md"
    scaled = " (scaled down from 30 to fit 5 s)"
    files.write_text(out, "\n".join(gpu_check.study_lines(results, data, scaled)))
    text = out.read_text()
    assert "Study end to end: 3 trials of a Fashion-2 study (" in text
    assert "1 epochs (scaled down from 30 to fit 5 s), on " + data + ', `[training] device = "cpu"`' in text
    for result in results:
        row = next(line for line in text.splitlines() if line.startswith(f"| {result['population']} | "))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1:4] == ["3/3", f"{result['wall_s']:.2f}", f"{result['trials_per_s']:.3f}"]
        assert cells[4:] == [f"{result['stages'][k]:.3f}" for k in gpu_check.STUDY_KEYS]


def test_study_cost_and_fit_epochs():
    warm = {"wall_s": 10.0, "complete": 2, "stages": {"time_trial_s": 3.0, "time_train_s": 1.0}}
    # outside the trials 10 - 2 * 3 = 4 s, then 2 s per trial besides training; 0.5 s per trial-epoch
    assert gpu_check.study_cost(warm, 16, 0.5) == (4.0 + 16 * 2.0, 8.0)
    costs = [(0.0, 2.0), (36.0, 8.0)]  # the timings, one study: 36 + 10 * epochs
    assert gpu_check.fit_epochs(240, 30, costs) == 20  # 36 + 200 = 236 <= 240
    assert gpu_check.fit_epochs(1000, 30, costs) == 30  # never more than asked
    assert gpu_check.fit_epochs(10, 30, costs) == 1  # at least one


def test_study_lines_without_a_study_say_why():
    why = "Population 1, 8 not run: over 5 s even at 1 epoch."
    assert gpu_check.study_lines([], "random data", skipped=why)[0] == f"Study end to end: not run. {why}"
