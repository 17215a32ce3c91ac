"""A real headless Chromium for the page tests (the system's chromium and chromedriver, driven by selenium).

Chromium comes from the system (Debian: chromium, chromium-driver, fonts-noto-cjk), which .ci/run installs
when missing; elsewhere a module that needs it is skipped with a note unless RGPT_REQUIRE_BROWSER=1 (set
by .ci/run). Import this module first in such a test module: the skip happens at its import."""

import base64
import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

if not (CHROMIUM and DRIVER):
    why = "needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver fonts-noto-cjk)"
    if os.environ.get("RGPT_REQUIRE_BROWSER") == "1":
        raise RuntimeError(why)
    pytest.skip(why, allow_module_level=True)

from selenium import webdriver  # noqa: E402  (only once the browser is known to be there)
from selenium.webdriver.chrome.service import Service  # noqa: E402

# The screenshot drawn on a canvas: distinct colours among a grid of pixels, and the share not white.
INK = """
const done = arguments[arguments.length - 1];
const img = new Image();
img.onload = () => {
  const c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const px = g.getImageData(0, 0, c.width, c.height).data, colours = new Set();
  let ink = 0, n = 0;
  for (let i = 0; i < px.length; i += 4 * 7) { n++; colours.add(px[i] << 16 | px[i + 1] << 8 | px[i + 2]);
                                               if (px[i] + px[i + 1] + px[i + 2] < 600) ink++; }
  done([colours.size, ink / n, c.width, c.height]);
};
img.src = 'data:image/png;base64,' + arguments[0];
"""


def chrome(width=1000, height=720):
    """A headless Chromium of that window size; the caller quits it."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)  # --no-sandbox: CI containers run as root, where the sandbox cannot start
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    return driver


def ink(driver, png: bytes) -> tuple[int, float, int, int]:
    """(distinct colours, share of non-white pixels, width, height) of a screenshot."""
    return tuple(driver.execute_async_script(INK, base64.b64encode(png).decode()))
