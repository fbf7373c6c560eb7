"""Watching a study without a terminal: one line per finished trial, and a plain word when there
is nothing left to run. Oracle: the Optuna storage the lines describe."""

import re

import optuna
import pytest

from pipeline import cli
from pipeline.storage import open_storage
from tests.ops.test_rerun import write_tiny_toml


@pytest.fixture
def project(workspace, monkeypatch):
    monkeypatch.chdir(workspace["root"])
    write_tiny_toml(workspace["root"] / "tiny.toml", trials=3)
    return workspace


def _study(project):
    return optuna.load_study(study_name="tiny", storage=open_storage(project["storage"]))


def test_one_line_per_finished_trial_with_best_so_far_and_eta(project, capsys):
    args = ["study", "tiny.toml", "--storage", project["storage"], "--tracking-uri", project["tracking_uri"]]
    assert cli.main(args) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trial ")]
    trials = _study(project).trials
    assert len(lines) == len(trials) == 3
    best = None
    for done, (line, trial) in enumerate(zip(lines, trials, strict=True), start=1):
        if best is None or trial.value > best.value:
            best = trial
        assert line.startswith(f"trial {trial.number} COMPLETE lr={trial.params['lr']:.4g} ")
        assert f" val_acc={trial.value:.4f} " in line
        assert f"| best {best.value:.4f} (trial {best.number}) |" in line
        assert f"| {done}/3 done | elapsed " in line
        assert re.search(r"eta \d+:\d\d:\d\d$", line)
    assert lines[-1].endswith("eta 0:00:00")

    assert cli.main(args) == 0  # resuming a finished study: one plain sentence, no bar, no trial
    out, err = capsys.readouterr()
    assert out.strip() == "study tiny is complete: 3/3 trials; raise --trials to continue"
    assert "it/s" not in err and not [line for line in err.splitlines() if line.startswith("trial ")]
    assert len(_study(project).trials) == 3


def test_a_trial_line_gives_the_spread_over_its_seeds():
    import statistics

    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from pipeline.study.progress import Watch

    study = optuna.create_study(direction="maximize")
    seeds = [0.86, 0.88, 0.9]
    study.add_trial(
        create_trial(
            value=statistics.mean(seeds),
            params={"lr": 0.1},
            distributions={"lr": FloatDistribution(0.01, 1.0)},
            user_attrs={"objective_seeds": seeds},
        )
    )
    line = Watch(study, "val_acc", 1, 1, terminal=False).line(study.trials[0])
    assert f" val_acc={statistics.mean(seeds):.4f} ±{statistics.stdev(seeds):.4f} (3 seeds) |" in line
