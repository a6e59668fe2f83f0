"""The viz page in a real browser: headless Chromium (Debian's chromium + chromium-driver) loads the
file from disk, and the test looks at it as a user would: a screenshot, coloured characters, the
prediction box on hover, other colours after switching the cell. Driven through Selenium against
the system Chromium; nothing is downloaded. Skipped without Chromium, except under CI (CI=true),
where .ci/run installs it and its absence is a failure."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import make_text, run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
MISSING = [p for p in (CHROMIUM, DRIVER) if not Path(p).exists()]
try:
    import selenium  # noqa: F401
except ImportError:
    MISSING.append("the selenium package (pip install -e '.[dev]')")

if MISSING and os.environ.get("CI", "").lower() != "true":
    pytest.skip(
        f"no browser to drive: missing {', '.join(MISSING)} (apt-get install chromium chromium-driver)", allow_module_level=True
    )


def browser():
    """Headless Chromium at a fixed window size."""
    assert not MISSING, f"CI=true but missing {', '.join(MISSING)}: .ci/run installs chromium and chromium-driver"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900", "--disable-gpu"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def backgrounds(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#text span.c')).map(s => getComputedStyle(s).backgroundColor)"
    )


@pytest.fixture
def page(trained, tmp_path) -> Path:
    text = tmp_path / "words.txt"
    text.write_text(make_text(1500, seed=3))
    out = tmp_path / "page.html"
    r = run(
        "viz", trained / "best.safetensors", "--text", text, "-o", out, "--cell", "0", "--cell", "1", "--find", "line-position"
    )
    assert r.exit_code == 0, r.output
    return out


def test_page_in_chromium(page, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser()
    try:
        driver.get(page.resolve().as_uri())
        shot = tmp_path / "page.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 5000
        assert driver.execute_script("return document.querySelectorAll('script[src], link[href], img[src]').length") == 0
        spans = driver.find_elements(By.CSS_SELECTOR, "#text span.c")
        text = page.parent.joinpath("words.txt").read_text()
        assert "".join(s.get_attribute("textContent") for s in spans) == text
        before = backgrounds(driver)
        assert sum(b not in ("rgba(0, 0, 0, 0)", "transparent") for b in before) > len(before) // 2  # coloured

        target = spans[20]
        ActionChains(driver).move_to_element(target).perform()
        box = driver.find_element(By.ID, "pred")
        assert box.is_displayed()
        rows = box.find_elements(By.CSS_SELECTOR, "#predtable tr")
        assert len(rows) == 5
        probs = [float(r.find_elements(By.TAG_NAME, "td")[1].text.rstrip("%")) for r in rows]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.5
        assert "bits" in box.text and "char 20" in box.text

        select = Select(driver.find_element(By.ID, "view"))
        labels = [o.text for o in select.options]
        assert (
            any("cell 1" in s for s in labels) and any("line-position" in s for s in labels) and labels[-1].startswith("surprise")
        )
        select.select_by_index(1)
        after = backgrounds(driver)
        cell = labels[1].split("cell ")[1].split(":")[0]  # "layer K, cell C: name (why)"
        assert box.is_displayed() and f"#{cell}:" in box.text  # the box under the pointer follows the new view
        assert after != before and len(after) == len(before)
        select.select_by_visible_text("surprise: bits per character")
        assert backgrounds(driver) not in (before, after)
        assert driver.find_elements(By.CSS_SELECTOR, "#gates svg circle")  # the gate scatter is drawn
        assert len(driver.find_elements(By.CSS_SELECTOR, "#spans li")) > 0
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
