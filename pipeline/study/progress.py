"""Watching a study: a line per finished trial without a terminal, bars with one.

Without a terminal (cron, CI, ``| tee``, a notebook, a worker's log) every finished trial prints
one line: its number, state, params, objective, the best so far, the study's count, the elapsed
time and an ETA. In a terminal the study's bar carries the best value in its postfix and its ETA,
and each trial shows an epoch bar once it has run for a couple of seconds.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import statistics
import sys
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from tqdm.auto import tqdm

from pipeline.storage import ranked_trials

EPOCH_BAR_DELAY = 2.0  # seconds a trial runs before its epoch bar appears


def epoch_bar(total: int, desc: str, enabled: bool) -> Any:
    """A trial's epoch bar: shown only in a terminal, and only once the trial takes a while."""
    return tqdm(
        total=total, desc=desc, leave=False, disable=not enabled, delay=EPOCH_BAR_DELAY, file=sys.stderr
    )


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(dt.timedelta(seconds=round(seconds)))


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Watch:
    """The study's progress as trials finish (``trial_done``), to a bar or to one line each."""

    def __init__(
        self,
        study: optuna.Study,
        objective: str,
        target: int,
        done: int,
        terminal: bool,
        worker: int | None = None,
    ) -> None:
        self.study, self.objective, self.target, self.worker = study, objective, target, worker
        self.done, self.ran = done, 0
        self.started = time.monotonic()
        remaining = max(0, target - done)
        self.bar = (
            tqdm(total=remaining, desc=study.study_name, file=sys.stderr, dynamic_ncols=True)
            if terminal and remaining
            else None
        )

    def _best(self) -> FrozenTrial | None:
        ranked = ranked_trials(self.study)
        return ranked[0] if ranked else None

    def line(self, trial: FrozenTrial) -> str:
        """One line for a finished trial (the log format without a terminal)."""
        who = f"worker {self.worker} (pid {os.getpid()}): " if self.worker is not None else ""
        params = " ".join(f"{k}={_value(v)}" for k, v in trial.params.items())
        value = f" {self.objective}={trial.value:.4f}" if trial.value is not None else ""
        seeds = trial.user_attrs.get("objective_seeds") or ()
        if trial.value is not None and len(seeds) > 1:
            value += f" ±{statistics.stdev(seeds):.4f} ({len(seeds)} seeds)"
        reason = trial.user_attrs.get("reason")
        why = f" ({reason})" if reason and trial.value is None else ""
        best = self._best()
        best_text = f"best {best.value:.4f} (trial {best.number})" if best is not None else "no best yet"
        elapsed = time.monotonic() - self.started
        left = max(0, self.target - self.done)
        eta = elapsed / self.ran * left if self.ran else math.nan
        eta_text = _clock(eta) if left else "0:00:00"
        return (
            f"{who}trial {trial.number} {trial.state.name} {params}{value}{why} | {best_text} | "
            f"{self.done}/{self.target} done | elapsed {_clock(elapsed)}, eta {eta_text}"
        )

    def trial_done(self, trial: FrozenTrial, done: int) -> None:
        self.ran += 1
        self.done = done
        if self.bar is not None:
            best = self._best()
            if best is not None:
                self.bar.set_postfix_str(f"best {self.objective}={best.value:.4f} (trial {best.number})")
            self.bar.update(1)
        else:
            print(self.line(trial), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
