"""The MLflow UI itself (a React single-page app), rendered by Debian's headless chromium against a
real ``mlflow server`` on 127.0.0.1 over a small demo-like study's store.

Chromium is driven over the DevTools protocol on ``--remote-debugging-pipe`` (file descriptors 3
and 4), so nothing but the ``chromium`` package is needed: no chromedriver, no Python package.
Every check reads the rendered DOM, polling until the app has drawn it. Oracle: ``MlflowClient``
against the same server (run ids, names, params and metrics as logged).
"""

import fcntl
import json
import os
import select
import subprocess
import time
import tomllib
import urllib.parse
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import parse_study
from tests.conftest import TINY, with_changes
from tests.report.test_browser import CHROMIUM
from tests.report.test_browser import FLAGS as BROWSER_FLAGS
from tests.test_mlflow_server import mlflow_server, stop_group

FLAGS = [*BROWSER_FLAGS, "--window-size=1600,1000"]
WAIT = 90  # seconds for the app to draw what a check waits for (a few seconds on an idle machine)
SEARCHED = ("lr", "momentum", "weight_decay")  # the demo's search space
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)


class PageError(Exception):
    """A DevTools command the page refused, or JavaScript that threw (e.g. no document.body yet)."""


class Chromium:
    """Headless chromium with one page, driven over the DevTools protocol on a pipe.

    Messages are JSON, each ended by a NUL byte: chromium reads commands on its fd 3 and writes
    replies and events on its fd 4.
    """

    def __init__(self, profile: Path, log: Path):
        to_child, self._to_chromium = os.pipe()
        self._from_chromium, from_child = os.pipe()
        # copies above the low numbers, so that placing them on 3 and 4 in the child clobbers neither
        child_in = fcntl.fcntl(to_child, fcntl.F_DUPFD_CLOEXEC, 100)
        child_out = fcntl.fcntl(from_child, fcntl.F_DUPFD_CLOEXEC, 100)
        os.close(to_child)
        os.close(from_child)

        def onto_3_and_4():  # runs in the child between fork and exec; dup2 makes them inheritable
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self._log = open(log, "w")  # noqa: SIM115  (closed in close())
        try:
            self.proc = subprocess.Popen(
                [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env={"HOME": str(profile.parent), "PATH": "/usr/bin:/bin"},
                close_fds=False,  # every other fd of this process is close-on-exec (PEP 446)
                preexec_fn=onto_3_and_4,
                start_new_session=True,  # stop_group ends its renderer and helper processes too
            )
        finally:
            os.close(child_in)
            os.close(child_out)
        self._buffer = b""
        self._id = 0
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to_chromium, data) :]
        deadline = time.monotonic() + WAIT
        while True:  # events (no "id") and late replies are skipped
            reply = self._next(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise PageError(f"{method}: {reply['error']}")
                return reply["result"]

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chromium], [], [], left)[0]:
                raise TimeoutError("chromium did not answer over the DevTools pipe")
            chunk = os.read(self._from_chromium, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium exited with {self.proc.poll()}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def go(self, url: str) -> None:
        """A fresh document for ``url`` (through about:blank: no stale DOM of the last page)."""
        self.send("Page.navigate", {"url": "about:blank"}, self._session)
        self.send("Page.navigate", {"url": url}, self._session)

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-serialisable)."""
        params = {"expression": expression, "returnByValue": True}
        result = self.send("Runtime.evaluate", params, self._session)
        if "exceptionDetails" in result:
            raise PageError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str):
        """Poll ``expression`` until it is truthy; fail with what the page shows after WAIT s."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                value = self.js(expression)
            except PageError:  # e.g. no document.body yet, right after a navigation
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                shown = self.js("location.href + '\\n' + (document.body?.innerText ?? '').slice(0, 3000)")
                pytest.fail(f"after {WAIT} s the MLflow UI shows no {what}:\n{shown}")
            time.sleep(0.25)

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=20)
        except (OSError, PageError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            pass
        stop_group(self.proc)
        os.close(self._to_chromium)
        os.close(self._from_chromium)
        self._log.close()


def demo_like():
    """The tiny study (2 trials) with the demo's search space: lr, momentum, weight_decay."""
    with open(ROOT / "studies" / "demo.toml", "rb") as f:
        search = tomllib.load(f)["search"]
    assert set(search) == set(SEARCHED)
    return parse_study(with_changes(TINY, trials=2, search=search), "studies/tiny.toml")


@pytest.fixture
def ui(workspace, tmp_path, monkeypatch):
    """A demo-like study, ``mlflow server`` over its sqlite store, and chromium; both stopped after."""
    monkeypatch.setattr(
        "pipeline.report.trial.TRUE_ERROR_SAMPLE", 100_000
    )  # the true error is not checked here
    workspace.run(demo_like())
    # no job runner: its 8 huey consumers only slow a 2-core machine, and no page here needs one
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with mlflow_server(workspace["tracking_uri"], tmp_path, env) as url:
        browser = Chromium(tmp_path / "chromium-profile", tmp_path / "chromium.log")
        try:
            yield {"url": url, "browser": browser, "client": MlflowClient(url)}
        finally:
            browser.close()


def _link(run_id: str) -> str:
    """JS: the run-name link of a run in the runs table."""
    return f"document.querySelector('a[href$=\"/runs/{run_id}\"]')"


# JS: the two cells of every key/value row on a run page (its Metrics and Parameters tables)
RUN_PAGE_ROWS = (
    "Object.fromEntries([...document.querySelectorAll('[role=row]')].map(r => "
    "[...r.querySelectorAll(':scope > [role=cell]')].map(c => c.innerText.trim()))"
    ".filter(cells => cells.length === 2))"
)


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_nested_trials_a_trial_run_and_the_compare_page(ui):
    browser, client, url = ui["browser"], ui["client"], ui["url"]
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("pipeline_role") == "study"]
    trials = sorted(
        (r for r in runs if r.data.tags.get("pipeline_role") == "trial"), key=lambda r: r.info.run_name
    )
    assert [t.info.run_name for t in trials] == ["trial-0000", "trial-0001"]
    parent_id, exp_id = parent.info.run_id, exp.experiment_id

    # (1) The experiment's runs table ("Model training" in the sidebar's switch; a fresh browser
    # starts on "GenAI", whose Overview has no runs table): the parent run, its trials nested under it.
    browser.go(f"{url}/#/experiments/{exp_id}?workflowType=machine_learning")
    browser.wait_for(f"{_link(parent_id)} !== null", "runs table with the parent run")
    assert browser.js(f"{_link(parent_id)}.innerText") == "tiny"
    everyone = " && ".join(f"{_link(t.info.run_id)} !== null" for t in trials)
    if not browser.js(everyone):  # collapsed: press the + in the parent's Run Name cell
        browser.js(f"{_link(parent_id)}.closest('[role=gridcell]').querySelector('button').click()")
    browser.wait_for(everyone, "trial runs under the expanded parent run")
    indent = {
        r.info.run_id: browser.js(f"{_link(r.info.run_id)}.getBoundingClientRect().left")
        for r in [parent, *trials]
    }
    for trial in trials:
        assert browser.js(f"{_link(trial.info.run_id)}.innerText") == trial.info.run_name
        assert indent[trial.info.run_id] > indent[parent_id]  # drawn one level in: nested

    # ... tick two trials and press Compare (README, step 4): the compare page's URL
    ticks = [
        f"document.querySelector('[row-id=\"{t.info.run_id}\"] .ag-selection-checkbox input')" for t in trials
    ]
    for tick in ticks:
        browser.js(f"{tick}.click()")
    browser.wait_for(" && ".join(f"{tick}.checked" for tick in ticks), "ticks in the two runs' checkboxes")
    compare_button = "[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Compare')"
    browser.wait_for(f"{compare_button} !== undefined", "Compare button after ticking two runs")
    browser.js(f"{compare_button}.click()")
    href = browser.wait_for("location.href.includes('/compare-runs?') && location.href", "compare page")
    base, query = urllib.parse.unquote(href).split("?", 1)
    assert base == f"{url}/#/compare-runs"
    fields = dict(field.split("=", 1) for field in query.split("&"))
    assert sorted(json.loads(fields["runs"])) == sorted(t.info.run_id for t in trials)
    assert json.loads(fields["experiments"]) == [exp_id]

    # (2) A trial run's page: val_acc and the searched params, as logged.
    trial = trials[0]
    browser.go(f"{url}/#/experiments/{exp_id}/runs/{trial.info.run_id}")
    shown = browser.wait_for(
        f"(rows => 'val_acc' in rows && {json.dumps(list(SEARCHED))}.every(p => p in rows) && rows)"
        f"({RUN_PAGE_ROWS})",
        "Metrics and Parameters tables on the trial's run page",
    )
    assert float(shown["val_acc"]) == trial.data.metrics["val_acc"]
    for name in SEARCHED:
        assert shown[name] == trial.data.params[name], name
    assert trial.info.run_name in browser.js("document.body.innerText")

    # (3) The compare page for two trial runs, opened by its URL: both runs, ids, names and params.
    runs_json = json.dumps([t.info.run_id for t in trials], separators=(",", ":"))
    browser.go(f"{url}/#/compare-runs?runs={runs_json}&experiments={json.dumps([exp_id])}")
    text = browser.wait_for(
        f"(t => {json.dumps([t.info.run_id for t in trials])}.every(id => t.includes(id)) && t)"
        "(document.body.innerText)",
        "compare page with both run ids",
    )
    assert "Comparing 2 Runs" in text
    for trial in trials:
        assert trial.info.run_id in text and trial.info.run_name in text
        assert trial.data.params["lr"] in text
