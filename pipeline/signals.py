"""The one stop-on-signal policy, used by every command (study, worker, rerun, report).

- SIGTERM and SIGHUP raise ``Terminated``, an ordinary ``Exception``, so Optuna marks the running
  trial FAIL (the default action would leave it RUNNING) and every ``finally`` closes its MLflow run.
- SIGINT (Ctrl-C) raises ``KeyboardInterrupt`` as usual. A process started with SIGINT ignored
  (a background job of a non-interactive shell, ``nohup``-like launchers) would never see Ctrl-C:
  the policy restores Python's handler, and ``sigint_note`` says that it did.
- A second signal while cleaning up gets the default action: the process dies at once.
- ``signal_in`` finds the signal behind an exception (a signal that lands inside a library's
  cleanup can make that cleanup fail in turn: the signal, not the failure, is what happened), and
  ``exit_code`` / ``stop_reason`` give the shell's code (143, 129, 130) and the trial's reason.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

STOPPING = (signal.SIGTERM, signal.SIGHUP)


class Terminated(Exception):
    """SIGTERM or SIGHUP arrived: an ``Exception``, so Optuna fails the trial rather than leave it RUNNING."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.trial: int | str | None = None  # set by the driver: the trial(s) it interrupted
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state = {"sigint_was_ignored": False}


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block: SIGTERM and SIGHUP raise ``Terminated``; SIGINT raises KeyboardInterrupt.

    SIGHUP stays ignored where it was ignored (``nohup``). Outside the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise Terminated(signum)

    def interrupt(signum: int, frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise KeyboardInterrupt

    previous = {}
    for signum in STOPPING:
        current = signal.getsignal(signum)
        if signum == signal.SIGHUP and current == signal.SIG_IGN:
            continue
        previous[signum] = current
        signal.signal(signum, handler)
    current = signal.getsignal(signal.SIGINT)
    _state["sigint_was_ignored"] = current == signal.SIG_IGN
    previous[signal.SIGINT] = current
    signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def sigint_note() -> str | None:
    """Why Ctrl-C works here although the parent had it ignored (None when it was not ignored)."""
    if not _state["sigint_was_ignored"]:
        return None
    return (
        "SIGINT was ignored when this process started (a background job of a non-interactive "
        "shell); it was restored, so Ctrl-C or kill -INT stops this process like SIGTERM"
    )


def signal_in(exc: BaseException | None) -> BaseException | None:
    """The ``Terminated`` or ``KeyboardInterrupt`` that ``exc`` is, or arose while handling, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (Terminated, KeyboardInterrupt)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def stop_name(stop: BaseException) -> str:
    """``SIGTERM``, ``SIGHUP`` or ``Ctrl-C``."""
    return "Ctrl-C" if isinstance(stop, KeyboardInterrupt) else str(stop)


def stop_reason(stop: BaseException) -> str:
    """The reason a stopped trial records: ``stopped by SIGTERM`` / ``stopped by Ctrl-C``."""
    return f"stopped by {stop_name(stop)}"


def exit_code(stop: BaseException) -> int:
    """The shell's code for a process ended by this signal: 128 + signal number (Ctrl-C: 130)."""
    return stop.exit_code if isinstance(stop, Terminated) else 128 + signal.SIGINT
