"""The report ``run`` writes, in a real browser (split from tests/cli/test_report.py, whose finished run it uses)."""

from __future__ import annotations

import shutil

import pytest

from test_report import finished  # noqa: F401  (fixture: a finished run on the real BreastMNIST, with its report)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_the_page_renders_in_a_real_headless_browser(finished, tmp_path):
    """Chromium (Debian's package; ``.ci/run`` installs it) through Playwright: the page loads from the file with no
    console error and no failed request, and a laptop-sized screenshot is not blank."""
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium installed (apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    from PIL import Image
    import numpy as np

    errors, failed = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: failed.append(r.url))
        page.goto((finished / "out" / "report.html").as_uri())
        page.wait_for_load_state("load")
        widths = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        page.screenshot(path=str(tmp_path / "shot.png"), full_page=True)
        browser.close()
    assert errors == [] and failed == []
    assert len(widths) == 2 and min(widths) > 0  # every embedded figure decoded (curves, reliability; one dataset: no CD)
    assert overflow <= 0  # no horizontal scrolling of the page on a laptop screen (wide tables scroll in their box)
    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("L"))
    assert shot.std() > 10 and (shot < 128).mean() > 0.005  # text and figures drawn, not a blank page
