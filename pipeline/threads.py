"""How many intra-op threads a training process uses: ``[training] threads``, or ``$PIPELINE_THREADS``.

A setting is one of ``POLICIES`` or a positive integer (threads per process, as written):

- ``"cores"``: the cores this process may run on (its CPU affinity, else ``os.cpu_count()``);
- ``"free"``: the cores not busy right now, from two readings of /proc/stat ``FREE_WINDOW`` apart
  (the 1-minute load average where /proc/stat is missing, else every core); at least 1;
- ``"auto"`` (the default): ``AUTO``, chosen from ``pipeline.bench.threads``' table, quiet and
  beside one competing CPU-bound process.

``$PIPELINE_THREADS`` (same values) wins over the study file's setting. With ``workers`` processes
sharing the machine (``make workers N=4``) the cores (or free cores) are divided among them.

OpenMP reads ``OMP_WAIT_POLICY`` once, when torch loads its runtime: ``omp_environment`` gives the
variables to put in ``os.environ`` before the first ``import torch`` (``"cores"`` only);
``apply_threads`` sets the thread count afterwards. This module imports torch only inside
``apply_threads``, so a command can call everything else first.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping

from pipeline.errors import UsageError

POLICIES = ("auto", "cores", "free")  # the named settings; a positive int is accepted as well
AUTO = "free"  # what "auto" stands for (see pipeline.bench.threads for the measurements)
ENV_VAR = "PIPELINE_THREADS"  # overrides [training] threads, same values
FREE_WINDOW = 0.15  # seconds between the two /proc/stat readings of "free"
PROC_STAT = "/proc/stat"
# Spinning OpenMP threads hold their core between parallel regions; beside another busy process
# they steal its time slice and wait on each other (libgomp: PASSIVE sets the spin count to 0).
WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}


class ThreadsError(UsageError, ValueError):
    """A threads setting that is neither one of ``POLICIES`` nor a positive integer."""


def parse_threads(value: object, where: str, key: str = "training.threads") -> int | str:
    """``value`` as a setting: a name from ``POLICIES`` or an int >= 1 (a string of digits counts,
    for the environment). Anything else raises ``ThreadsError`` naming ``where``, ``key`` and the fix."""
    number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
    if isinstance(number, str) and number in POLICIES:
        return number
    if isinstance(number, int) and not isinstance(number, bool) and number >= 1:
        return number
    example = "PIPELINE_THREADS=1" if key == ENV_VAR else "threads = 1"
    raise ThreadsError(
        f"{where}: {key} = {value!r}: must be 'auto', 'cores', 'free' or a positive integer "
        f"(threads per process), e.g. {example}"
    )


def setting_in_force(setting: object, environ: Mapping[str, str] | None = None) -> int | str:
    """The setting that applies: ``$PIPELINE_THREADS`` when set (and not empty), else ``setting``."""
    environ = os.environ if environ is None else environ
    override = environ.get(ENV_VAR, "").strip()
    if override:
        return parse_threads(override, "environment", ENV_VAR)
    return parse_threads(setting, "threads setting")


def cpu_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS reports one."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def parse_cpu_ticks(text: str) -> dict[int, tuple[int, int]]:
    """Per-CPU (idle, total) tick counters from /proc/stat's ``cpuN`` lines.

    Idle = idle + iowait; total = user + nice + system + idle + iowait + irq + softirq + steal
    (guest time is already inside user and nice; see proc(5)).
    """
    ticks = {}
    for line in text.splitlines():
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        counts = [int(f) for f in fields[:8]]
        ticks[int(name[3:])] = (sum(counts[3:5]), sum(counts))
    return ticks


def read_cpu_ticks() -> dict[int, tuple[int, int]]:
    """/proc/stat's per-CPU (idle, total) ticks now; OSError where there is no /proc/stat."""
    with open(PROC_STAT) as f:
        return parse_cpu_ticks(f.read())


def free_cores(window: float = FREE_WINDOW) -> int:
    """Cores of this process's affinity that were idle over the next ``window`` seconds, at least 1.

    The idle share of each allowed CPU is summed (a process hopping between two cores leaves one
    free core, not none) and rounded half up. Without /proc/stat: cores minus the 1-minute load
    average; without that either: every core.
    """
    cores = cpu_cores()
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        before = read_cpu_ticks()
        time.sleep(window)
        after = read_cpu_ticks()
    except OSError:
        return _free_from_load_average(cores)
    cpus = [c for c in after if c in before and (allowed is None or c in allowed)]
    if not cpus:
        return _free_from_load_average(cores)
    idle = 0.0
    for c in cpus:
        d_idle, d_total = after[c][0] - before[c][0], after[c][1] - before[c][1]
        idle += d_idle / d_total if d_total > 0 else 1.0  # no tick counted: no sign of work
    return max(1, min(cores, math.floor(idle + 0.5)))


def _free_from_load_average(cores: int) -> int:
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return cores
    return max(1, min(cores, math.floor(cores - load + 0.5)))


def resolve_threads(setting: object, *, workers: int = 1, environ: Mapping[str, str] | None = None) -> int:
    """The intra-op thread count for one of ``workers`` processes sharing this machine.

    An integer is taken as written (per process); ``"cores"`` and ``"free"`` are divided among the
    workers (at least 1 each); ``"auto"`` is ``AUTO``. ``$PIPELINE_THREADS`` wins over ``setting``.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers = {workers!r}: must be an integer >= 1")
    chosen = setting_in_force(setting, environ)
    if isinstance(chosen, int):
        return chosen
    if chosen == "auto":
        chosen = AUTO
    available = free_cores() if chosen == "free" else cpu_cores()
    return max(1, available // workers)


def apply_threads(setting: object, *, workers: int = 1) -> int:
    """``torch.set_num_threads(resolve_threads(setting, workers=workers))``; returns the count."""
    import torch  # lazy: the rest of this module runs before torch is imported (omp_environment)

    n = resolve_threads(setting, workers=workers)
    torch.set_num_threads(n)
    return n


def omp_environment(setting: object, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """OpenMP variables to add to ``os.environ`` before the first ``import torch`` (no effect after).

    ``OMP_WAIT_POLICY=PASSIVE`` for ``"cores"`` only: it runs every core whatever the load, and
    beside a busy process its spinning threads cost 1.7x (pipeline.bench.threads), while PASSIVE
    costs about 15 % on a quiet machine. ``"free"`` (and so ``"auto"``) avoids the busy cores
    instead and keeps OpenMP's default, as does a count the user wrote. A variable already in
    ``environ`` (the user's) is left out: ``os.environ.update(omp_environment(s))`` never overrides it.
    """
    environ = os.environ if environ is None else environ
    if setting_in_force(setting, environ) != "cores":
        return {}
    return {k: v for k, v in WAIT_POLICY.items() if k not in environ}
