"""The study page and a trial report, rendered by Debian's headless chromium.

Oracles: the browser itself (each <img> must decode: naturalWidth > 0 after the load event, read
back with ``--dump-dom``), the files on disk (every src is a data: PNG or an existing file), and
the screenshot, which must not be blank.
"""

import base64
import io
import re
import shutil
import subprocess

import pytest
from PIL import Image

from tests.conftest import tiny_study

CHROMIUM = shutil.which("chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]
# After the load event every image has decoded or failed; mark each so --dump-dom shows which.
PROBE = (
    "<script>window.addEventListener('load', () => { for (const img of document.images) "
    "img.setAttribute('data-decoded', String(img.complete && img.naturalWidth > 0)); });</script>"
)
IMG_SRC = re.compile(r"<img\b[^>]*\bsrc=\"([^\"]*)\"")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"  # a fresh one per run
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        check=True,
    )


@pytest.fixture
def pages(workspace, monkeypatch):
    monkeypatch.setattr(
        "pipeline.report.trial.TRUE_ERROR_SAMPLE", 100_000
    )  # the true error is not checked here
    outcome = workspace.run(tiny_study(trials=2))
    return [outcome.page, outcome.reports / "trial-0000" / "report.html"]


@pytest.mark.slow
def test_chromium_renders_the_study_page_and_a_trial_report_with_every_image(pages, tmp_path):
    for page in pages:
        source = page.read_text(encoding="utf-8")
        sources = IMG_SRC.findall(source)
        assert len(sources) >= 3, page
        for src in sources:  # each picture is embedded, or a file beside the page
            if src.startswith("data:image/png;base64,"):
                Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
            else:
                assert (page.parent / src).is_file(), src

        probe = page.with_name(f".probe-{page.name}")  # beside the page, so relative paths resolve
        probe.write_text(source.replace("</body>", PROBE + "</body>"), encoding="utf-8")
        try:
            dom = _chromium(tmp_path, "--dump-dom", probe.as_uri()).stdout
        finally:
            probe.unlink()
        decoded = re.findall(r"data-decoded=\"(true|false)\"", dom)
        assert decoded == ["true"] * len(sources), f"{page}: {decoded.count('false')} images did not load"

        shot = tmp_path / f"{page.parent.name}-{page.stem}.png"
        _chromium(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri())
        image = Image.open(shot).convert("L")
        assert image.size == (1200, 2400)
        inked = sum(count for value, count in enumerate(image.histogram()) if value < 200)
        assert inked / (image.width * image.height) > 0.02, f"{page} rendered (almost) blank"


# After the load event: how far right the last trial's report link ends, against the viewport and
# against the right edge of the Trials table's scroll box; whether that box or the page must scroll.
WIDTH_PROBE = (
    "<script>window.addEventListener('load', () => { const links = [...document.querySelectorAll("
    "'table.dataframe a')]; const r = links[links.length - 1].getBoundingClientRect(); "
    "const box = document.querySelector('table.dataframe').parentElement; "
    "const page = document.documentElement; "
    "document.body.setAttribute('data-link-right', String(r.right)); "
    "document.body.setAttribute('data-box-right', String(box.getBoundingClientRect().right)); "
    "document.body.setAttribute('data-box-overflow', String(box.scrollWidth - box.clientWidth)); "
    "document.body.setAttribute('data-page-overflow', String(page.scrollWidth - page.clientWidth)); "
    "document.body.setAttribute('data-viewport', String(window.innerWidth)); });</script>"
)


@pytest.mark.slow
def test_at_1280_px_every_trials_column_and_the_last_report_link_are_in_view(
    workspace, tmp_path, monkeypatch
):
    monkeypatch.setattr("pipeline.report.trial.TRUE_ERROR_SAMPLE", 100_000)
    # the demo's three searched params, so the table has the real set of columns
    cfg = tiny_study(trials=3, search__weight_decay={"choices": [0.0, 1e-4, 1e-3, 1e-2]})
    real = __import__("pipeline.study.trial", fromlist=["build_models"]).build_models
    calls = {"n": 0}

    def first_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("the data loader gave up after reading a corrupted batch " * 4)
        return real(*args, **kwargs)

    monkeypatch.setattr("pipeline.study.trial.build_models", first_fails)
    with pytest.raises(RuntimeError):
        workspace.run(cfg)
    outcome = workspace.run(cfg)
    page = outcome.page
    source = page.read_text(encoding="utf-8")
    assert "the data loader gave up" in source  # the failed trial's reason is on the page
    probe = page.with_name(".probe-width.html")
    probe.write_text(source.replace("</body>", WIDTH_PROBE + "</body>"), encoding="utf-8")
    try:
        dom = _chromium(tmp_path, "--window-size=1280,900", "--dump-dom", probe.as_uri()).stdout
    finally:
        probe.unlink()
    right = float(re.search(r'data-link-right="([0-9.]+)"', dom).group(1))
    viewport = float(re.search(r'data-viewport="([0-9.]+)"', dom).group(1))
    assert viewport == 1280 and 0 < right <= viewport
    # in view without scrolling: the link inside the table's box, neither the box nor the page wider
    assert right <= float(re.search(r'data-box-right="([0-9.]+)"', dom).group(1))
    assert int(re.search(r'data-box-overflow="(-?[0-9]+)"', dom).group(1)) <= 0
    assert int(re.search(r'data-page-overflow="(-?[0-9]+)"', dom).group(1)) <= 0
