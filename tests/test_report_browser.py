"""report.html rendered by a real headless Chromium: the tables and the thumbnails are there."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from uniret.cli import main

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((b for b in map(shutil.which, BROWSERS) if b), None)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(BROWSER is None, reason="no headless Chromium installed (apt-get install chromium)"),
]


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", *args],
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def report_html(demo_root, tmp_path_factory):
    import torch

    from uniret.embed.model import build_model

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("browser")
    build_model("timm:test_vit", dim=16, image_size=32).save(base / "model")
    assert main(["eval", "--model", str(base / "model"), "--data", str(demo_root), "--out", str(base / "report"),
                 "--samples", "3"]) == 0
    return base / "report" / "report.html"


def test_table_and_thumbnails_render(report_html, tmp_path):
    done = chromium(tmp_path, "--dump-dom", report_html.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    table = re.search(r"<table class=\"metrics\" id=\"metrics-merged\">(.*?)</table>", dom, re.S)
    assert table, dom[:2000]
    rows = re.findall(r"<tr[^>]*><td>([^<]+)</td>", table.group(1))
    assert rows == ["flags", "glyphs", "shapes", "textures", "mean (unweighted)"]
    # Every thumbnail (4 domains x 3 queries x (query + top 5)) was decoded by the browser.
    assert re.search(r"<body data-decoded-images=\"(\d+)\"", dom).group(1) == str(4 * 3 * 6)
    assert dom.count("class=\"row sample\"") == 12
    assert dom.count("class=\"hit\"") + dom.count("class=\"miss\"") == 4 * 3 * 5


def test_screenshot_shows_the_page(report_html, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    done = chromium(tmp_path, "--window-size=1000,1400", f"--screenshot={shot}", report_html.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    import numpy as np

    pixels = np.asarray(Image.open(shot).convert("RGB").resize((250, 350)), dtype=np.int16)
    # The thumbnails put colour on the page: count clearly non-grey pixels.
    colourful = int(((pixels.max(axis=2) - pixels.min(axis=2)) > 60).sum())
    assert colourful > 500
