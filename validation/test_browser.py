"""A real run's index.html seen in a real browser: headless Chromium draws a non-blank page whose DOM holds each
stage and each failing gate (skipped, with the reason, where no chromium binary is installed)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from validation.stages import STAGE_NAMES
from validation.test_html_report import report_run  # noqa: F401 (fixture)

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH: scripts/setup.sh installs Debian's "
                                                "`chromium` (apt-get install -y chromium) where it can"),
]


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with a throw-away profile, no sandbox (CI containers run as root) and no GPU."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def pixel_spread(png: Path) -> tuple[float, int]:
    """(standard deviation of the grey levels, number of distinct colours) of a screenshot."""
    from PIL import Image, ImageStat

    with Image.open(png) as img:
        rgb = img.convert("RGB")
        return ImageStat.Stat(rgb.convert("L")).stddev[0], len(rgb.getcolors(maxcolors=1 << 24) or [])


def screenshot(tmp_path: Path, url: str, name: str) -> Path:
    """A 1400 × 1600 screenshot of `url`."""
    png = tmp_path / name
    out = chromium(tmp_path, "--window-size=1400,1600", f"--screenshot={png}", url)
    assert png.is_file() and png.stat().st_size > 0, out.stderr[-2000:]
    return png


def test_the_report_renders_in_headless_chromium(report_run, tmp_path):
    page = report_run / "index.html"
    spread, colours = pixel_spread(screenshot(tmp_path, page.as_uri(), "report.png"))
    assert spread > 20 and colours > 50, (spread, colours)
    # the check can fail: a blank page is caught by the same measure
    (tmp_path / "blank.html").write_text("<!doctype html><html><body></body></html>")
    blank_spread, blank_colours = pixel_spread(screenshot(tmp_path, (tmp_path / "blank.html").as_uri(), "blank.png"))
    assert blank_spread < 1 and blank_colours <= 2, (blank_spread, blank_colours)

    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0 and "</html>" in dom.stdout, dom.stderr[-2000:]
    for stage in STAGE_NAMES:
        assert f'id="stage-{stage}"' in dom.stdout, stage
    failing = [ln for ln in dom.stdout.split("<tr")[1:] if ln.startswith(" class=\"failed fail-row\"")]
    assert len(failing) == 1 and "max_abs" in failing[0] and "0.25" in failing[0] and "FAIL" in failing[0]
    failures = dom.stdout[dom.stdout.index('id="failures"'):dom.stdout.index('id="stages"')]
    assert "max_abs = 0.25 (must be &lt;= 0.0001)" in failures and "planted assertion" in failures
