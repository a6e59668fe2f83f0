"""The page `charlm serve` serves at /, in a real browser: headless Chromium (Debian's chromium +
chromium-driver) types a prime, presses Generate, and sees the text appear and grow; a second tab generates
at the same time (both streams in the server's batch at once); Stop frees the rows; a pasted text is scored.
Driven through Selenium against the system Chromium; nothing is downloaded. Skipped without Chromium,
except under CI (CI=true), where .ci/run installs it and its absence is a failure."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import make_text

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
MISSING = [p for p in (CHROMIUM, DRIVER) if not Path(p).exists()]
for module in ("selenium", "httpx", "starlette", "uvicorn"):
    try:
        __import__(module)
    except ImportError:
        MISSING.append(f"the {module} package (pip install -e '.[dev]')")

if MISSING and os.environ.get("CI", "").lower() != "true":
    pytest.skip(
        f"no browser to drive: missing {', '.join(MISSING)} (apt-get install chromium chromium-driver)", allow_module_level=True
    )

from test_serve import Server, ckpt  # noqa: E402,F401  (the tiny model and the server process)

TIMEOUT = 30.0


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


def wait_for(condition, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def generated(driver) -> str:
    return driver.execute_script("return document.getElementById('generated').textContent")


def start(driver, url: str, prime: str, length: int) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    box = driver.find_element(By.ID, "prime")
    box.clear()
    box.send_keys(prime)
    for field, value in (("length", length), ("temperature", "0.9")):
        el = driver.find_element(By.ID, field)
        el.clear()
        el.send_keys(str(value))
    driver.find_element(By.ID, "generate").click()


@pytest.fixture
def server(ckpt):  # noqa: F811
    # A small flush interval and a long text: the page sees many pieces arrive, not one.
    s = Server(ckpt, "--max-length", "1000000", "--flush-interval", "0.05", key=None)
    yield s
    assert s.terminate() == 0, s.log


def test_page_generates_in_two_tabs(server, tmp_path):
    from selenium.webdriver.common.by import By

    driver = browser()
    try:
        start(driver, server.url + "/", "The quick ", 1_000_000)
        first_tab = driver.current_window_handle
        assert driver.execute_script("return document.getElementById('shown-prime').textContent") == "The quick "
        lengths = []
        for _ in range(200):  # the text appears, then grows while we watch
            lengths.append(len(generated(driver)))
            if len(set(x for x in lengths if x)) >= 3:
                break
            time.sleep(0.02)
        assert len(set(x for x in lengths if x)) >= 3, lengths
        assert lengths == sorted(lengths)
        assert (
            driver.execute_script(
                "return document.querySelectorAll('script[src], link[href]:not([href^=\"data:\"]), img[src]').length"
            )
            == 0
        )
        shot = tmp_path / "page.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 5000

        driver.switch_to.new_window("tab")  # a second tab generates while the first still does
        start(driver, server.url + "/", "A lazy dog ", 1_000_000)
        wait_for(lambda: len(generated(driver)) > 50, "text in the second tab")
        assert server.metric("charlm_active_streams") == 2  # both streams in the batch at once
        driver.find_element(By.ID, "stop").click()
        wait_for(lambda: "stopped" in driver.find_element(By.ID, "status").text, "the second tab to stop")

        driver.switch_to.window(first_tab)
        before = len(generated(driver))
        wait_for(lambda: len(generated(driver)) > before, "the first tab's text to keep growing")
        driver.find_element(By.ID, "stop").click()
        wait_for(lambda: server.metric("charlm_active_streams") == 0, "the rows to be freed")

        text = make_text(400, seed=5)
        driver.execute_script("document.getElementById('score-text').value = arguments[0]", text)
        driver.find_element(By.ID, "score").click()
        result = wait_for(
            lambda: (
                driver.find_element(By.ID, "score-result").text.strip()
                if "bits/char" in driver.find_element(By.ID, "score-result").text
                else ""
            ),
            "the score",
        )
        assert f"over {len(text) - 1} characters" in result
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "AbortError" not in e["message"]]
    finally:
        driver.quit()
