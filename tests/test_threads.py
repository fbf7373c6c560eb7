"""The thread policy: settings parsed and refused, free cores counted from /proc/stat ticks, the
environment override, workers sharing the cores, and torch's thread count actually set.

Oracles: tick deltas chosen by hand with their free-core counts worked out on paper; torch's own
``get_num_threads``; proc(5)'s field order for /proc/stat.
"""

import os
import subprocess
import sys

import pytest
import torch

from pipeline import threads
from pipeline.cli import main
from pipeline.config import load_study
from pipeline.errors import UsageError
from pipeline.threads import (
    AUTO,
    ENV_VAR,
    POLICIES,
    ThreadsError,
    apply_threads,
    free_cores,
    omp_environment,
    parse_cpu_ticks,
    parse_threads,
    resolve_threads,
    setting_in_force,
)


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture
def four_cores(monkeypatch):
    """A process allowed on CPUs 0-3, with no time spent waiting for /proc/stat's window."""
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: None)


def fake_ticks(monkeypatch, deltas, other_cpus=None):
    """/proc/stat read twice: every CPU starts at (idle 1000, total 5000), then moves by its
    (idle, total) delta."""
    cpus = {i: (1000, 5000) for i in range(len(deltas))} | (other_cpus or {})
    later = {i: (1000 + d_idle, 5000 + d_total) for i, (d_idle, d_total) in enumerate(deltas)}
    later |= {i: (idle + 100, total + 100) for i, (idle, total) in (other_cpus or {}).items()}
    readings = iter([cpus, later])
    monkeypatch.setattr(threads, "read_cpu_ticks", lambda: next(readings))


@pytest.mark.parametrize(
    "value, expected",
    [("auto", "auto"), ("cores", "cores"), ("free", "free"), (1, 1), (4, 4), ("3", 3), (" 2 ", 2)],
)
def test_good_settings_parse(value, expected):
    assert parse_threads(value, "studies/x.toml") == expected
    assert set(POLICIES) == {"auto", "cores", "free"}


@pytest.mark.parametrize("value", [0, -1, "0", "many", "Auto", 1.5, True, None, "", [2]], ids=repr)
def test_bad_settings_name_the_file_key_value_and_fix(value):
    with pytest.raises(ThreadsError) as err:
        parse_threads(value, "studies/x.toml")
    message = str(err.value)
    assert message.startswith(f"studies/x.toml: training.threads = {value!r}: ")
    assert "'auto', 'cores', 'free' or a positive integer" in message and "threads = 1" in message
    assert isinstance(err.value, UsageError) and isinstance(err.value, ValueError)  # exit 2, like ConfigError


def test_the_environment_overrides_the_setting(monkeypatch, four_cores):
    monkeypatch.setenv(ENV_VAR, "3")
    assert setting_in_force("cores") == 3
    assert resolve_threads("cores") == 3
    monkeypatch.setenv(ENV_VAR, "cores")
    assert resolve_threads(1) == 4
    monkeypatch.setenv(ENV_VAR, "")  # empty: not set
    assert resolve_threads(2) == 2
    monkeypatch.setenv(ENV_VAR, "lots")
    with pytest.raises(ThreadsError, match=r"environment: PIPELINE_THREADS = 'lots': .*PIPELINE_THREADS=1"):
        resolve_threads("auto")


@pytest.mark.parametrize(
    "deltas, free",
    [
        ([(100, 100)] * 4, 4),  # all idle
        ([(0, 100), (100, 100), (100, 100), (100, 100)], 3),  # one core held by another process
        ([(50, 100), (50, 100), (100, 100), (100, 100)], 3),  # one process hopping between two cores
        ([(0, 100), (0, 100), (10, 100), (0, 100)], 1),  # all busy: still one thread
        ([(50, 100), (100, 100), (100, 100), (0, 100)], 3),  # 2.5 idle cores round half up
        ([(40, 100), (100, 100), (100, 100), (0, 100)], 2),  # 2.4 round down
        ([(0, 0), (0, 100), (0, 100), (0, 100)], 1),  # no tick counted on cpu0: taken as idle
    ],
)
def test_free_cores_from_tick_deltas(monkeypatch, four_cores, deltas, free):
    fake_ticks(monkeypatch, deltas)
    assert free_cores() == free


def test_free_cores_count_only_this_process_cpus(monkeypatch, four_cores):
    busy_two = [(100, 100), (100, 100), (0, 100), (0, 100)]
    fake_ticks(monkeypatch, busy_two, other_cpus={4: (0, 0), 5: (0, 0)})  # idle, but not ours
    assert free_cores() == 2


def test_free_falls_back_to_load_average_then_cores(monkeypatch, four_cores):
    def missing():
        raise FileNotFoundError("/proc/stat")

    monkeypatch.setattr(threads, "read_cpu_ticks", missing)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert free_cores() == 3  # 4 - 1.2 = 2.8
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert free_cores() == 1

    def no_load_average():
        raise OSError("no load average")

    monkeypatch.setattr(threads.os, "getloadavg", no_load_average)
    assert free_cores() == 4


def test_proc_stat_text_parses_per_cpu_idle_and_total():
    text = (
        "cpu  10 1 5 100 4 0 2 0 0 0\n"
        "cpu0 4 1 2 60 3 0 1 0 7 0\n"  # guest (7) is already counted in user: not added again
        "cpu1 6 0 3 40 1 0 1 2 0 0\n"
        "intr 12345 0 0\nctxt 999\nbtime 1700000000\n"
    )
    assert parse_cpu_ticks(text) == {0: (63, 71), 1: (41, 53)}


def test_the_real_proc_stat_when_there_is_one():
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat")
    ticks = threads.read_cpu_ticks()
    assert set(os.sched_getaffinity(0)) <= set(ticks)
    assert all(0 <= idle <= total for idle, total in ticks.values())
    assert 1 <= free_cores(0.05) <= threads.cpu_cores()


@pytest.mark.parametrize(
    "setting, workers, expected",
    [("cores", 1, 4), ("cores", 2, 2), ("cores", 3, 1), ("cores", 8, 1), (3, 2, 3), ("free", 2, 1)],
)
def test_workers_share_the_cores(monkeypatch, four_cores, setting, workers, expected):
    fake_ticks(monkeypatch, [(0, 100), (100, 100), (100, 100), (100, 100)])  # 3 free cores
    assert resolve_threads(setting, workers=workers) == expected


def test_auto_is_its_policy_and_workers_must_be_positive(monkeypatch, four_cores):
    fake_ticks(monkeypatch, [(0, 100), (100, 100), (100, 100), (100, 100)])
    expected = resolve_threads(AUTO)
    fake_ticks(monkeypatch, [(0, 100), (100, 100), (100, 100), (100, 100)])
    assert resolve_threads("auto") == expected
    for workers in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers"):
            resolve_threads("cores", workers=workers)


def test_apply_threads_sets_torchs_thread_count(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1
        assert apply_threads("cores") == 2 and torch.get_num_threads() == 2
        assert apply_threads("cores", workers=2) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv(ENV_VAR, "2")
        assert apply_threads(1) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_omp_environment_adds_passive_waiting_to_cores_only_without_overriding_the_user():
    assert omp_environment("cores", environ={}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert omp_environment("cores", environ={ENV_VAR: "cores"}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    for setting in ("auto", "free", 2, 1):  # free avoids busy cores instead; a count is the user's
        assert omp_environment(setting, environ={}) == {}
    assert omp_environment("auto", environ={ENV_VAR: "cores"}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert omp_environment("cores", environ={"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert omp_environment("cores", environ={ENV_VAR: "1"}) == {}  # the override decides
    with pytest.raises(ThreadsError):
        omp_environment("all", environ={})


# --------------------------------------------------------------------------------------------
# the study file's key and the commands that train


def study_text(threads_line: str) -> str:
    return f'name = "t"\n[training]\n{threads_line}\n[search]\nlr = {{ value = 0.1 }}\n'


@pytest.mark.parametrize(
    ("line", "expected"), [("", "auto"), ("threads = 3", 3), ('threads = "free"', "free")]
)
def test_the_study_files_threads_key(tmp_path, line, expected):
    path = tmp_path / "t.toml"
    path.write_text(study_text(line))
    cfg = load_study(path)
    assert cfg.training.threads == expected
    path.write_text(study_text(""))
    assert cfg.config_hash() == load_study(path).config_hash()  # where it runs, not what it computes


@pytest.mark.parametrize("value", ['"many"', "0", "2.5", "true"])
def test_a_bad_threads_key_is_exit_2_naming_file_key_value_and_fix(tmp_path, capsys, value):
    path = tmp_path / "t.toml"
    path.write_text(study_text(f"threads = {value}"))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "training.threads" in err[0]
    assert "expected int or str" in err[0] or "'auto', 'cores', 'free' or a positive integer" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.toml"]  # nothing written


@pytest.mark.parametrize(
    ("setting", "env", "threads", "wait"),
    [("cores", {}, "CORES", "PASSIVE"), ("auto", {ENV_VAR: "1"}, 1, None), (2, {}, 2, None)],
)
def test_a_training_command_applies_the_policy_before_torch_loads(tmp_path, setting, env, threads, wait):
    """In a fresh interpreter, as ``pipeline study`` does: the OpenMP variable is in the environment
    before torch is imported, and torch runs the resolved number of threads."""
    code = (
        "import os, sys\nfrom pipeline.cli import _threads\nfrom pipeline.config import load_study\n"
        "cfg = load_study(sys.argv[1])\nassert 'torch' not in sys.modules\n_threads(cfg)\nimport torch\n"
        "print(torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    path = tmp_path / "t.toml"
    path.write_text(study_text(f"threads = {setting!r}".replace("'", '"')))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", ENV_VAR, "OMP_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    expected = threads if threads != "CORES" else threads_module_cores()
    assert out == [str(expected), str(wait)]


def threads_module_cores() -> int:
    return threads.cpu_cores()


def test_a_bad_pipeline_threads_stops_a_study_with_exit_2_before_anything_is_written(
    tmp_path, monkeypatch, capsys
):
    path = tmp_path / "t.toml"
    path.write_text(study_text(""))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENV_VAR, "lots")
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: environment: PIPELINE_THREADS = 'lots': must be 'auto', 'cores', 'free' or a positive "
        "integer (threads per process), e.g. PIPELINE_THREADS=1"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.toml"]  # no storage, mlruns or reports
