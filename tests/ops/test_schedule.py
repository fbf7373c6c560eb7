"""Scheduling reruns: cron expressions, the crontab entry, systemd units.

Oracles: the real ``crontab`` from Debian's cron package (run as root for a throwaway user, so
the machine's own crontab is never touched) for what cron accepts and what the crontab holds;
``systemd-analyze calendar`` for when a systemd timer fires and ``systemd-analyze verify`` for the
units. Where a tool is missing its tests are skipped; the crontab tests then still run against
the stand-in script below (a crontab that is one file: ``-l`` prints it, ``-`` replaces it).
"""

import datetime as dt
import itertools
import os
import re
import shutil
import subprocess

import pytest

from pipeline import cli
from pipeline.ops.schedule import (
    CRONTAB_ENV,
    ScheduleError,
    entries,
    on_calendar,
    parse_cron,
)
from tests.ops.test_rerun import write_tiny_toml

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
HAVE_CRON = IS_ROOT and shutil.which("crontab") and shutil.which("useradd") and shutil.which("userdel")
HAVE_SYSTEMD_ANALYZE = shutil.which("systemd-analyze") is not None
_users = itertools.count()

STAND_IN = """#!/bin/sh
# a one-file crontab with the real program's interface: -l lists, - installs stdin
case "$1" in
  -l) if [ -f '{file}' ]; then cat '{file}'; else echo "no crontab for $(id -un)" >&2; exit 1; fi ;;
  -) cat > '{file}' ;;
  *) echo "usage: crontab [-l | -]" >&2; exit 2 ;;
esac
"""


@pytest.fixture(params=["cron", "stand-in"])
def crontab(request, tmp_path, monkeypatch):
    """A crontab of its own: a throwaway user's real crontab, or the stand-in. Yields argv."""
    if request.param == "cron":
        if not HAVE_CRON:
            pytest.skip("needs root and Debian's cron package (crontab) to test the real crontab")
        user = f"pltest{os.getpid() % 100000}x{next(_users)}"
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user], check=True
        )
        argv = ["crontab", "-u", user]
    else:
        script = tmp_path / "crontab-stand-in"
        script.write_text(STAND_IN.format(file=tmp_path / "crontab.txt"))
        script.chmod(0o755)
        argv = [str(script)]
    monkeypatch.setenv(CRONTAB_ENV, " ".join(argv))
    yield argv
    if request.param == "cron":
        subprocess.run([*argv, "-r"], capture_output=True, check=False)
        subprocess.run(["userdel", user], capture_output=True, check=False)


def listed(argv) -> str:
    proc = subprocess.run([*argv, "-l"], capture_output=True, text=True, check=False)
    return proc.stdout if proc.returncode == 0 else ""


def install_text(argv, text: str) -> None:
    subprocess.run([*argv, "-"], input=text, text=True, check=True, capture_output=True)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_tiny_toml(tmp_path / "tiny.toml")
    write_tiny_toml(tmp_path / "other.toml", name="other")
    return tmp_path


def schedule(*args) -> int:
    return cli.main(["schedule", *args])


# ----------------------------------------------------------------------------------------------
# The crontab entry


def test_install_replace_list_remove_and_never_duplicate(crontab, project, capsys):
    keep = 'MAILTO=""\n15 * * * * echo keep-me\n'
    install_text(crontab, keep)

    assert schedule("tiny.toml", "--cron", "0 3 * * *") == 0
    assert capsys.readouterr().out.startswith("installed: 0 3 * * * cd ")
    text = listed(crontab)
    assert text.startswith(keep)  # other lines untouched
    (entry,) = entries(text)
    assert entry.name == "tiny" and entry.schedule == "0 3 * * *"
    assert entry.command.startswith(f"cd {project} && mkdir -p reports/tiny && ")
    assert " rerun tiny.toml >> reports/tiny/cron.log 2>&1" in entry.command
    assert entry.line.endswith(" # pipeline-rerun:tiny")

    assert schedule("tiny.toml", "--cron", "0 3 * * *") == 0  # the same again: nothing changes
    assert capsys.readouterr().out.startswith("unchanged: ")
    assert listed(crontab) == text

    assert schedule("tiny.toml", "--cron", "30 4 * * mon-fri") == 0  # a new time replaces the entry
    assert capsys.readouterr().out.startswith("replaced: ")
    assert [(e.name, e.schedule) for e in entries(listed(crontab))] == [("tiny", "30 4 * * mon-fri")]

    assert schedule("other.toml", "--cron", "@daily", "--name", "other-nightly", "--epochs", "2") == 0
    assert schedule("--list") == 0
    out = capsys.readouterr().out
    assert re.search(r"^tiny\t30 4 \* \* mon-fri\tcd ", out, re.M)
    assert re.search(
        r"^other-nightly\t@daily\tcd .* rerun other.toml --name other-nightly --epochs 2 ", out, re.M
    )

    assert schedule("tiny.toml", "--remove") == 0
    assert capsys.readouterr().out.strip() == "removed 1 entry for tiny"
    text = listed(crontab)
    assert text.startswith(keep) and [e.name for e in entries(text)] == ["other-nightly"]
    assert schedule("tiny.toml", "--remove") == 0
    assert capsys.readouterr().out.strip() == "no entry for tiny"


def test_a_hand_made_duplicate_is_collapsed_to_one_entry(crontab, project, capsys):
    assert schedule("tiny.toml", "--cron", "0 3 * * *") == 0
    (line,) = [e.line for e in entries(listed(crontab))]
    capsys.readouterr()
    install_text(crontab, f"{line}\n# a comment\n{line.replace('0 3', '0 5', 1)}\n")
    assert schedule("tiny.toml", "--cron", "0 3 * * *") == 0
    assert capsys.readouterr().out.startswith("replaced: ")
    text = listed(crontab)
    assert [e.schedule for e in entries(text)] == ["0 3 * * *"] and "# a comment" in text


def test_percent_in_a_path_is_escaped_for_cron(crontab, tmp_path, monkeypatch, capsys):
    odd = tmp_path / "100% done"
    odd.mkdir()
    monkeypatch.chdir(odd)
    write_tiny_toml(odd / "tiny.toml")
    assert schedule("tiny.toml", "--cron", "0 3 * * *") == 0
    (entry,) = entries(listed(crontab))
    assert "'" + str(odd).replace("%", "\\%") + "'" in entry.command  # quoted, % escaped


def test_storage_in_the_environment_is_pointed_out(crontab, project, monkeypatch, capsys):
    monkeypatch.setenv("OPTUNA_STORAGE", "postgresql+psycopg://u:secret@h/db")
    assert schedule("tiny.toml", "--cron", "0 3 * * *") == 0
    assert "$OPTUNA_STORAGE is set here but cron/systemd will not see it" in capsys.readouterr().err
    assert "secret" not in listed(crontab)


# ----------------------------------------------------------------------------------------------
# Cron expressions

VALID = [
    ("0 3 * * *", [{0}, {3}, set(range(1, 32)), set(range(1, 13)), set(range(7))]),
    ("*/15 9-17 * * mon-fri", [{0, 15, 30, 45}, set(range(9, 18)), None, None, {1, 2, 3, 4, 5}]),
    ("1,2-9/3 0 1,15 jan,JUL 7", [{1, 2, 5, 8}, {0}, {1, 15}, {1, 7}, {0}]),
    ("0 0 * * 0,7", [None, None, None, None, {0}]),
    (
        "0-59/30 */6 */10 */3 sun-sat",
        [{0, 30}, {0, 6, 12, 18}, {1, 11, 21, 31}, {1, 4, 7, 10}, set(range(7))],
    ),
    ("@weekly", [{0}, {0}, None, None, {0}]),
    ("@DAILY", [{0}, {0}, None, None, None]),
]


@pytest.mark.parametrize(("expr", "expected"), VALID, ids=[v[0] for v in VALID])
def test_valid_cron_expressions_expand_to_the_right_values(expr, expected):
    sched = parse_cron(expr)
    for values, want in zip(sched.values, expected, strict=True):
        if want is not None:
            assert values == want


# refused by cron itself (checked below against the real crontab) and by us, with the reason
REFUSED_BY_CRON = [
    ("0 3 * *", "4 fields, expected 5"),
    ("0 3 * * * *", "6 fields, expected 5"),
    ("60 3 * * *", "60 is out of range 0-59"),
    ("0 24 * * *", "24 is out of range 0-23"),
    ("0 0 0 * *", "0 is out of range 1-31"),
    ("0 0 32 * *", "32 is out of range 1-31"),
    ("* * * 13 *", "13 is out of range 1-12"),
    ("* * * * 8", "8 is out of range 0-7"),
    ("*/0 * * * *", "step '0' must be a whole number >= 1"),
    ("5/10 * * * *", "a step needs a range or *"),
    ("a * * * *", "'a' is not a number 0-59"),
    ("-1 * * * *", "'' is not a number"),
    ("1- * * * *", "'' is not a number"),
    ("1,,2 * * * *", "empty item in the list"),
    ("0 3 * * fry", "'fry' is not a number 0-7 or a name"),
]
# cron would take these, but they are almost surely mistakes: refused, saying what to write
REFUSED_BY_US = [
    ("5-1 * * * *", "range 5-1 runs backwards"),
    ("*/60 * * * *", "step 60 leaves only the value 0"),
    ("@reboot", "unknown shortcut"),
    ("", "0 fields, expected 5"),
]


@pytest.mark.parametrize(("expr", "why"), REFUSED_BY_CRON + REFUSED_BY_US)
def test_malformed_cron_is_refused_with_a_clear_message(crontab, project, capsys, expr, why):
    install_text(crontab, "15 * * * * echo keep-me\n")
    assert schedule("tiny.toml", "--cron", expr) == 2
    err = capsys.readouterr().err
    assert why in err and f"cron expression {expr!r}" in err and "minute hour day-of-month" in err
    assert listed(crontab) == "15 * * * * echo keep-me\n"  # nothing written


@pytest.mark.skipif(not HAVE_CRON, reason="needs root and Debian's cron package")
def test_cron_itself_agrees_with_the_validation(crontab):
    if crontab[0] != "crontab":
        pytest.skip("the stand-in does not check syntax")
    for expr, _ in VALID:  # as installed: shortcuts lower-cased (cron's are case-sensitive)
        text = parse_cron(expr).text
        proc = subprocess.run([*crontab, "-"], input=f"{text} true\n", text=True, capture_output=True)
        assert proc.returncode == 0, (expr, proc.stderr)
    for expr, _ in REFUSED_BY_CRON:
        proc = subprocess.run([*crontab, "-"], input=f"{expr} true\n", text=True, capture_output=True)
        assert proc.returncode != 0, expr


# ----------------------------------------------------------------------------------------------
# systemd

CALENDARS = [
    ("0 3 * * *", "*-*-* 03:00:00"),
    ("*/15 9-17 * * mon-fri", "Mon..Fri *-*-* 09..17:00/15:00"),
    ("30 6 1,15 * *", "*-*-01,15 06:30:00"),
    ("0 0 * jan,jul sun", "Sun *-01,07-* 00:00:00"),
    ("5 4 * * 7", "Sun *-*-* 04:05:00"),
    ("0 */6 */2 * *", "*-*-01/2 00/6:00:00"),
    ("0 12 1-10/3 * *", "*-*-01,04,07,10 12:00:00"),
    ("0 12 * */3 *", "*-01/3-* 12:00:00"),
    ("0 0 * * 5-7", "Fri..Sun *-*-* 00:00:00"),
    ("0 0 * * 0,1,3", "Mon,Wed,Sun *-*-* 00:00:00"),
    ("@weekly", "Sun *-*-* 00:00:00"),
    ("@monthly", "*-*-01 00:00:00"),
]


@pytest.mark.parametrize(("expr", "calendar"), CALENDARS, ids=[c[0] for c in CALENDARS])
def test_cron_maps_to_on_calendar(expr, calendar):
    assert on_calendar(expr) == calendar


def _cron_fires(expr: str, after: dt.datetime, n: int) -> list[dt.datetime]:
    """The next n minutes cron runs ``expr`` (its rule: with both day fields restricted, either)."""
    sched = parse_cron(expr)
    minute, hour, dom, month, dow = sched.values
    dom_set, dow_set = sched.day_restricted
    t, found = after.replace(second=0) + dt.timedelta(minutes=1), []
    while len(found) < n:
        day_dom, day_dow = t.day in dom, (t.isoweekday() % 7) in dow
        day = (day_dom or day_dow) if (dom_set and dow_set) else (day_dom and day_dow)
        if not (t.month in month and day):
            t = (t + dt.timedelta(days=1)).replace(hour=0, minute=0)
            continue
        if t.hour in hour and t.minute in minute:
            found.append(t)
        t += dt.timedelta(minutes=1)
    return found


def _systemd_fires(calendar: str, after: dt.datetime, n: int) -> list[dt.datetime]:
    proc = subprocess.run(
        [
            "systemd-analyze",
            "calendar",
            f"--iterations={n}",
            f"--base-time={after:%Y-%m-%d %H:%M:%S} UTC",
            calendar,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TZ": "UTC", "SYSTEMD_COLORS": "0"},
        check=True,
    )
    stamps = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", proc.stdout)
    return [dt.datetime.strptime(s, "%Y-%m-%d %H:%M:%S") for s in stamps]


@pytest.mark.skipif(not HAVE_SYSTEMD_ANALYZE, reason="needs systemd-analyze")
@pytest.mark.parametrize(("expr", "calendar"), CALENDARS, ids=[c[0] for c in CALENDARS])
def test_the_systemd_timer_fires_when_cron_would(expr, calendar):
    after = dt.datetime(2026, 1, 30, 22, 50)
    assert _systemd_fires(on_calendar(expr), after, 12) == _cron_fires(expr, after, 12)


def test_both_day_fields_cannot_map_to_systemd(project, capsys):
    with pytest.raises(ScheduleError, match="either matches"):
        on_calendar("0 3 1 * mon")
    assert schedule("tiny.toml", "--systemd", "--cron", "0 3 1 * mon") == 2
    assert "--on-calendar" in capsys.readouterr().err


def test_systemd_units_are_valid(project, tmp_path, capsys):
    assert schedule("tiny.toml", "--systemd", "--cron", "*/15 9-17 * * mon-fri") == 0
    out = capsys.readouterr().out
    assert "# ---- pipeline-rerun-tiny.service ----" in out and "# ---- pipeline-rerun-tiny.timer ----" in out
    assert "OnCalendar=Mon..Fri *-*-* 09..17:00/15:00" in out
    assert f"WorkingDirectory={project}" in out and " rerun tiny.toml" in out
    units = tmp_path / "units"
    assert schedule("tiny.toml", "--systemd", "--on-calendar", "daily", "--unit-dir", str(units)) == 0
    files = sorted(p.name for p in units.iterdir())
    assert files == ["pipeline-rerun-tiny.service", "pipeline-rerun-tiny.timer"]
    assert "OnCalendar=daily" in (units / "pipeline-rerun-tiny.timer").read_text()
    if HAVE_SYSTEMD_ANALYZE:
        proc = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", *(str(units / f) for f in files)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr


def test_schedule_needs_a_study_and_a_time(project, capsys):
    assert schedule("--cron", "0 3 * * *") == 2
    assert "give the study file" in capsys.readouterr().err
    assert schedule("tiny.toml") == 2
    assert "give --cron EXPR" in capsys.readouterr().err
    assert schedule("tiny.toml", "--systemd") == 2
    assert "exactly one of --cron EXPR or --on-calendar" in capsys.readouterr().err
