"""Scheduled reruns: one crontab entry per study (install, list, remove), or a systemd timer.

Each entry ends with the marker comment ``# pipeline-rerun:<study>``, so installing again replaces
that study's entry instead of adding a second one, and every other crontab line is left as it
was. The crontab program is ``crontab`` (Debian's ``cron`` package), or the command line in
$PIPELINE_CRONTAB (e.g. ``crontab -u someone``; the tests point it at a throwaway user).

Cron expressions are checked here, field by field, before anything is written: cron itself
would refuse some mistakes only at install time and silently accept others (``5-1``, ``*/61``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline import files
from pipeline.config import StudyConfig
from pipeline.urls import redact

MARKER = "pipeline-rerun"
CRONTAB_ENV = "PIPELINE_CRONTAB"
CRON_LOG = "cron.log"
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
SYSTEMD_DAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")
# (name, lowest, highest, names for the values from `lowest` on)
FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 7, DAYS),  # 0 and 7 are both Sunday
)
SPECIAL = {  # cron's @-shortcuts and the five fields they stand for
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
EXAMPLE = 'fields are: minute hour day-of-month month day-of-week, e.g. "0 3 * * *" (03:00 every day)'
_MARKER_RE = re.compile(rf"\s#\s*{MARKER}:([a-z0-9][a-z0-9_-]*)\s*$")


class ScheduleError(ValueError):
    """A schedule that cannot be installed as asked; the message says why and how to fix it."""


class CrontabError(RuntimeError):
    """The crontab program failed or is missing."""


# ----------------------------------------------------------------------------------------------
# Cron expressions


@dataclass(frozen=True)
class CronSchedule:
    """A checked cron schedule: the text to install and the values each field matches."""

    text: str  # normalized: single spaces, or the @-shortcut as given
    fields: tuple[str, str, str, str, str]  # the five fields (a shortcut expanded)
    values: tuple[frozenset[int], ...]  # matched values per field; Sunday is 0 in day of week

    @property
    def day_restricted(self) -> tuple[bool, bool]:
        """Whether day of month / day of week are restricted (cron: the field does not start with *)."""
        return (not self.fields[2].startswith("*"), not self.fields[4].startswith("*"))


def parse_cron(expr: str) -> CronSchedule:
    """Check a 5-field cron expression (ranges, lists, steps, month/day names) or an @-shortcut."""
    words = expr.split()
    if len(words) == 1 and words[0].startswith("@"):
        key = words[0].lower()
        if key not in SPECIAL:
            raise ScheduleError(
                f"cron expression {expr!r}: unknown shortcut; use one of {', '.join(SPECIAL)} "
                f"or five fields ({EXAMPLE})"
            )
        fields = tuple(SPECIAL[key].split())
        text = key
    elif len(words) != 5:
        raise ScheduleError(f"cron expression {expr!r}: {len(words)} fields, expected 5; {EXAMPLE}")
    else:
        fields, text = tuple(words), " ".join(words)
    values = tuple(_parse_field(expr, f, spec) for f, spec in zip(fields, FIELDS, strict=True))
    return CronSchedule(text, fields, values)  # type: ignore[arg-type]


def _parse_field(expr: str, text: str, spec: tuple) -> frozenset[int]:
    name, low, high, names = spec

    def bad(why: str) -> ScheduleError:
        return ScheduleError(f"cron expression {expr!r}: {name} field {text!r}: {why}; {EXAMPLE}")

    def number(word: str) -> int:
        if word.isdigit():
            value = int(word)
        elif word.lower() in names:
            value = names.index(word.lower()) + low
        else:
            allowed = f"{low}-{high}" + (f" or a name ({', '.join(names)})" if names else "")
            raise bad(f"{word!r} is not a number {allowed}")
        if not low <= value <= high:
            raise bad(f"{value} is out of range {low}-{high}")
        return value

    result: set[int] = set()
    for item in text.split(","):
        if not item:
            raise bad("empty item in the list")
        base, sep, step_text = item.partition("/")
        if base == "*":
            first, last = low, high if name != "day of week" else 6
        elif "-" in base:
            a, _, b = base.partition("-")
            first, last = number(a), number(b)
            if first > last:
                raise bad(f"range {base} runs backwards; write it as a list, e.g. {b}-{high},{low}-{a}")
        else:
            first = last = number(base)
            if sep:
                raise bad(f"a step needs a range or *: write {base}-{high}/{step_text} or */{step_text}")
        step = 1
        if sep:
            if not step_text.isdigit() or int(step_text) < 1:
                raise bad(f"step {step_text!r} must be a whole number >= 1")
            step = int(step_text)
            if step > last - first:
                raise bad(f"step {step} leaves only the value {first} in {first}-{last}; write {first}")
        result.update(range(first, last + 1, step))
    if name == "day of week" and 7 in result:
        result = (result - {7}) | {0}
    return frozenset(result)


# ----------------------------------------------------------------------------------------------
# systemd


def on_calendar(expr: str) -> str:
    """The systemd ``OnCalendar=`` expression that fires exactly when the cron expression does."""
    sched = parse_cron(expr)
    minute, hour, dom, month, dow = sched.fields
    if all(sched.day_restricted):
        raise ScheduleError(
            f"cron expression {expr!r}: with both day of month and day of week restricted, cron runs "
            "when either matches, but systemd needs both; give the timer with --on-calendar "
            "(e.g. --on-calendar 'Mon *-*-01 03:00:00') or two schedules"
        )
    minute, hour, dom, month = (
        _calendar_field(f, spec, vals)
        for f, spec, vals in zip(sched.fields[:4], FIELDS[:4], sched.values[:4], strict=True)
    )
    days = "" if dow == "*" else _calendar_days(sched.values[4]) + " "
    return f"{days}*-{month}-{dom} {hour}:{minute}:00"


def _calendar_field(text: str, spec: tuple, values: frozenset[int]) -> str:
    _, low, high, _ = spec
    if text == "*":
        return "*"
    items = []
    for item in text.split(","):
        base, sep, step = item.partition("/")
        if base == "*" and sep:  # */s: every s-th value from the lowest, like systemd's low/s
            items.append(f"{low:02d}/{step}")
        elif sep or not all(w.isdigit() for w in base.split("-")):  # a-b/s or names: list the values
            first, _, last = base.partition("-")
            items.extend(f"{v:02d}" for v in sorted(values) if _within(v, first, last or first, spec))
        elif "-" in base:
            a, b = base.split("-")
            items.append(f"{int(a):02d}..{int(b):02d}")
        else:
            items.append(f"{int(base):02d}")
    return ",".join(dict.fromkeys(items))


def _within(value: int, first: str, last: str, spec: tuple) -> bool:
    _, low, high, names = spec

    def num(word: str) -> int:
        return int(word) if word.isdigit() else names.index(word.lower()) + low

    return first == "*" or num(first) <= value <= num(last)


def _calendar_days(days: frozenset[int]) -> str:
    """Weekdays as systemd names, runs written Mon..Fri (systemd's week starts on Monday)."""
    week = (1, 2, 3, 4, 5, 6, 0)
    runs: list[list[int]] = []
    for pos, d in enumerate(week):
        if d not in days:
            continue
        if runs and week.index(runs[-1][-1]) == pos - 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    names = [
        SYSTEMD_DAYS[r[0]] if len(r) == 1 else f"{SYSTEMD_DAYS[r[0]]}..{SYSTEMD_DAYS[r[-1]]}" for r in runs
    ]
    return ",".join(names)


def systemd_units(
    name: str, command: list[str], project_dir: Path, calendar: str, env_file: Path | None = None
) -> dict[str, str]:
    """A oneshot ``.service`` running the rerun and the ``.timer`` that starts it, by file name.

    ``env_file``: the 0600 file holding the URLs with passwords (``EnvironmentFile=``).
    """
    unit = f"{MARKER}-{name}"
    exec_start = " ".join(_systemd_quote(w) for w in command)
    environment = f"EnvironmentFile={_systemd_quote(str(env_file))}\n" if env_file is not None else ""
    service = f"""[Unit]
Description=Rerun of study {name} (pipeline rerun; exit 3 = drift, see reports/{name}/rerun.log)

[Service]
Type=oneshot
WorkingDirectory={_systemd_quote(str(project_dir))}
{environment}ExecStart={exec_start}
# 4 = another rerun of this study holds its lock: skipped, not failed
SuccessExitStatus=4
Nice=10
"""
    timer = f"""[Unit]
Description=Schedule of {unit}.service

[Timer]
OnCalendar={calendar}
Persistent=true
Unit={unit}.service

[Install]
WantedBy=timers.target
"""
    return {f"{unit}.service": service, f"{unit}.timer": timer}


def _systemd_quote(word: str) -> str:
    """One ExecStart= argument: % and $ escaped (specifiers, variables), quoted when it has spaces."""
    word = word.replace("%", "%%").replace("$", "$$")
    if re.search(r"[\s\"'\\;]", word):
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


# ----------------------------------------------------------------------------------------------
# The rerun command a schedule runs


ENV_VARS = {"storage": "OPTUNA_STORAGE", "tracking_uri": "MLFLOW_TRACKING_URI"}


def secret_options(options: dict[str, object]) -> dict[str, str]:
    """The URL options that carry a password, as the environment variables that replace them."""
    return {
        ENV_VARS[key]: str(value)
        for key, value in options.items()
        if key in ENV_VARS and value is not None and redact(str(value)) != str(value)
    }


def write_env_file(path: Path, values: dict[str, str]) -> Path:
    """``KEY='value'`` lines, readable by the owner only (0600): what cron and systemd load."""
    for key, value in values.items():
        if "\n" in value or "'" in value:
            raise ScheduleError(f"{key}: a URL with a newline or a quote cannot go into {path}; encode it")
    text = "".join(f"{key}='{value}'\n" for key, value in values.items())
    return files.write_text(path, text, mode=0o600)


def rerun_command(study_file: Path, options: dict[str, object]) -> list[str]:
    """The venv's ``pipeline rerun STUDY.toml`` with the given command-line options."""
    exe = Path(sys.executable).absolute()  # not resolved: a venv's python is a symlink
    script = exe.parent / "pipeline"
    command = [str(script)] if script.is_file() else [str(exe), "-m", "pipeline"]
    command += ["rerun", str(study_file)]
    for key, value in options.items():
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    return command


def cron_line(
    schedule: CronSchedule, name: str, command: list[str], project_dir: Path, env_file: Path | None = None
) -> str:
    """One crontab line: cd into the project, run the rerun, append its output to cron.log.

    ``env_file``: the 0600 file holding the URLs with passwords, read into the environment first.
    """
    folder = Path("reports") / name
    load = f"set -a && . {shlex.quote(str(env_file))} && set +a && " if env_file is not None else ""
    shell = (
        f"cd {shlex.quote(str(project_dir))} && mkdir -p {shlex.quote(str(folder))} && {load}"
        f"{shlex.join(command)} >> {shlex.quote(str(folder / CRON_LOG))} 2>&1"
    )
    shell = shell.replace("%", "\\%")  # cron turns an unescaped % into a newline
    return f"{schedule.text} {shell} # {MARKER}:{name}"


# ----------------------------------------------------------------------------------------------
# The crontab


def crontab_program() -> list[str]:
    return shlex.split(os.environ.get(CRONTAB_ENV, "crontab"))


def read_crontab() -> str:
    """The current user's crontab ('' when there is none)."""
    cmd = crontab_program()
    proc = _crontab([*cmd, "-l"])
    if proc.returncode != 0:
        if "no crontab for" in proc.stderr.lower():
            return ""
        raise CrontabError(f"`{shlex.join(cmd)} -l` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def write_crontab(text: str) -> None:
    cmd = crontab_program()
    proc = _crontab([*cmd, "-"], text)
    if proc.returncode != 0:
        raise CrontabError(
            f"`{shlex.join(cmd)} -` refused the new crontab (exit {proc.returncode}): {proc.stderr.strip()}"
        )


def _crontab(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        raise CrontabError(
            f"{argv[0]} not found: install cron (Debian/Ubuntu: sudo apt-get install cron), "
            f"set ${CRONTAB_ENV}, or use --systemd for a systemd timer"
        ) from None


@dataclass(frozen=True)
class Entry:
    """A rerun entry found in the crontab."""

    name: str  # study name, from the marker
    schedule: str
    command: str
    line: str


def entries(text: str) -> list[Entry]:
    """The marked rerun entries of a crontab, in file order."""
    found = []
    for line in text.splitlines():
        match = _MARKER_RE.search(line)
        if not match or line.lstrip().startswith("#"):
            continue
        body = line[: match.start()].strip()
        words = body.split()
        n = 1 if words and words[0].startswith("@") else 5
        found.append(Entry(match.group(1), " ".join(words[:n]), " ".join(words[n:]), line))
    return found


def install(line: str, name: str) -> str:
    """Put ``line`` in the crontab as the study's only entry: 'installed', 'replaced' or 'unchanged'."""
    text = read_crontab()
    lines = text.splitlines()
    mine = [i for i, ln in enumerate(lines) if _is_entry(ln, name)]
    if len(mine) == 1 and lines[mine[0]] == line:
        return "unchanged"
    kept = [ln for i, ln in enumerate(lines) if i not in mine]
    at = mine[0] if mine else len(kept)
    kept.insert(at, line)
    write_crontab("\n".join(kept) + "\n")
    return "replaced" if mine else "installed"


def remove(name: str) -> int:
    """Remove the study's entries; returns how many there were."""
    lines = read_crontab().splitlines()
    kept = [ln for ln in lines if not _is_entry(ln, name)]
    if len(kept) != len(lines):
        write_crontab("\n".join(kept) + "\n" if kept else "")
    return len(lines) - len(kept)


def _is_entry(line: str, name: str) -> bool:
    match = _MARKER_RE.search(line)
    return bool(match) and match.group(1) == name and not line.lstrip().startswith("#")


# ----------------------------------------------------------------------------------------------
# Command edge


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_file", type=Path, nargs="?", metavar="STUDY.toml", help="the study to rerun")
    p.add_argument("--cron", metavar="EXPR", help='when: five cron fields, e.g. "0 3 * * *" (03:00 daily)')
    action = p.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="list the rerun entries in the crontab")
    action.add_argument("--remove", action="store_true", help="remove the study's rerun entry")
    action.add_argument("--systemd", action="store_true", help="print a systemd .service/.timer pair instead")
    p.add_argument("--on-calendar", metavar="SPEC", help="with --systemd: OnCalendar= instead of --cron")
    p.add_argument(
        "--unit-dir", type=Path, help="with --systemd: write the two units here instead of printing"
    )
    p.add_argument("--name", help="study name (overrides the file), passed on to the rerun")
    p.add_argument("--trials", type=int, help="trial target, passed on to the rerun")
    p.add_argument("--epochs", type=int, help="epochs per trial, passed on to the rerun")
    p.add_argument("--storage", help="Optuna storage, passed on to the rerun")
    p.add_argument("--tracking-uri", help="MLflow tracking URI, passed on to the rerun")


def schedule_main(args: argparse.Namespace, cfg: StudyConfig | None) -> int:
    """``pipeline schedule``: 0 done, 1 crontab failed, 2 bad input."""
    try:
        return _schedule(args, cfg)
    except ScheduleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CrontabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _schedule(args: argparse.Namespace, cfg: StudyConfig | None) -> int:
    if args.list:
        found = entries(read_crontab())
        for e in found:
            print(f"{e.name}\t{e.schedule}\t{e.command}")
        if not found:
            print("no scheduled reruns in the crontab", file=sys.stderr)
        return 0
    if cfg is None:
        raise ScheduleError(
            "give the study file, e.g. pipeline schedule studies/demo.toml --cron '0 3 * * *'"
        )
    if args.remove:
        n = remove(cfg.name)
        print(
            f"removed {n} entr{'y' if n == 1 else 'ies'} for {cfg.name}" if n else f"no entry for {cfg.name}"
        )
        return 0
    project = Path.cwd()
    options = {
        "name": args.name,
        "trials": args.trials,
        "epochs": args.epochs,
        "storage": args.storage,
        "tracking_uri": args.tracking_uri,
    }
    secrets = secret_options(options)  # never on a command line, in the crontab or in a unit file
    env_file = None
    if secrets:
        env_file = write_env_file(project / "storage" / f"{cfg.name}.schedule.env", secrets)
        options = {k: v for k, v in options.items() if ENV_VARS.get(k) not in secrets}
        print(f"wrote {env_file} (mode 0600): {', '.join(secrets)} for the scheduled rerun", file=sys.stderr)
    command = rerun_command(args.study_file, options)  # relative to the project
    for var, given in (("OPTUNA_STORAGE", args.storage), ("MLFLOW_TRACKING_URI", args.tracking_uri)):
        if os.environ.get(var) and not given:
            print(
                f"note: ${var} is set here but cron/systemd will not see it; pass "
                f"--{'storage' if var == 'OPTUNA_STORAGE' else 'tracking-uri'} to schedule it",
                file=sys.stderr,
            )
    if args.systemd:
        if (args.cron is None) == (args.on_calendar is None):
            raise ScheduleError("with --systemd give exactly one of --cron EXPR or --on-calendar SPEC")
        calendar = args.on_calendar if args.cron is None else on_calendar(args.cron)
        units = systemd_units(cfg.name, command, project, calendar, env_file)
        if args.unit_dir:
            args.unit_dir.mkdir(parents=True, exist_ok=True)
            for fname, body in units.items():
                files.write_text(args.unit_dir / fname, body)
            unit = f"{MARKER}-{cfg.name}"
            print(f"wrote {unit}.service and {unit}.timer to {args.unit_dir}")
            print(f"enable: systemctl --user daemon-reload && systemctl --user enable --now {unit}.timer")
        else:
            for fname, body in units.items():
                print(f"# ---- {fname} ----\n{body}")
        return 0
    if args.cron is None:
        raise ScheduleError("give --cron EXPR (e.g. --cron '0 3 * * *'), or --list / --remove / --systemd")
    line = cron_line(parse_cron(args.cron), cfg.name, command, project, env_file)
    status = install(line, cfg.name)
    print(f"{status}: {line}")
    return 0
