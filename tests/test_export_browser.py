"""The exported page in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven
through Selenium) opens it from a local HTTP server on 127.0.0.1, with onnxruntime-web from a local
copy of the npm package (nothing is downloaded), generates, and the text is `charlm sample`'s.

Skipped without Chromium or without the local onnxruntime-web, except under CI (CI=true), where
.ci/run installs both and their absence is a failure. The copy is looked for in $CHARLM_ORT_DIST, else
.cache/npm/node_modules/onnxruntime-web/dist (the npm command: charlm.export.web.NPM_HINT).
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason="charlm export needs onnx, onnxscript and onnxruntime: pip install -e '.[export]'")
pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript: pip install -e '.[export]'")

from conftest import make_text, run, train_small  # noqa: E402

import charlm.cli.export  # noqa: E402,F401  (registers the command)
from charlm.data import PreparedData  # noqa: E402
from charlm.data import prepare as prep  # noqa: E402
from charlm.export.web import NPM_HINT, ORT_FILES  # noqa: E402

CI = os.environ.get("CI", "").lower() == "true"
ROOT = Path(__file__).resolve().parent.parent
ORT_DIST = Path(os.environ.get("CHARLM_ORT_DIST", ROOT / ".cache/npm/node_modules/onnxruntime-web/dist"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
MISSING = [p for p in (CHROMIUM, DRIVER) if not Path(p).exists()]
try:
    import selenium  # noqa: F401
except ImportError:
    MISSING.append("the selenium package (pip install -e '.[dev]')")
if not all((ORT_DIST / f).is_file() for f in ORT_FILES):
    MISSING.append(f"onnxruntime-web at {ORT_DIST} ({NPM_HINT})")

if MISSING and not CI:
    pytest.skip(f"cannot run the page: missing {'; '.join(MISSING)}", allow_module_level=True)

GREEDY_CHARS = 200
PRIME = "The quick"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the test's output stays the test's
        pass

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A tiny LSTM exported with --web and --ort-dist, served on 127.0.0.1 (an OS-chosen port): (URL, checkpoint)."""
    assert not MISSING, f"CI=true but missing {'; '.join(MISSING)}: .ci/run installs them"
    root = tmp_path_factory.mktemp("web")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARLM_CORPORA_DIR", str(root))
        (root / "tiny.txt").write_text(make_text())
        prep.prepare([root / "tiny.txt"], root / "prepared")
        train_small(PreparedData(root / "prepared"), root / "run", max_steps=150, lr=1e-2, batch_size=8, seq_length=32)
    ckpt = root / "run" / "best.safetensors"
    r = run("export", ckpt, "--web", root / "site", "--ort-dist", ORT_DIST)
    assert r.exit_code == 0, r.output
    assert "works offline" in r.stderr
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root / "site")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", ckpt
    finally:
        server.shutdown()
        server.server_close()


def browser(webgpu: bool = False):
    """Headless Chromium at a fixed window size; webgpu: with SwiftShader's software adapter."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    args = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"]
    args += (
        ["--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--enable-features=Vulkan"]
        if webgpu
        else ["--disable-gpu"]
    )
    for arg in args:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def wait_state(driver, timeout: float = 120) -> str:
    """Wait until the page says ready, done or error (body[data-state]), and return which."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = driver.execute_script("return document.body.dataset.state || ''")
        if state:
            return state
        time.sleep(0.1)
    raise AssertionError(f"the page did not finish in {timeout} s: {driver.find_element('id', 'status').text}")


def generate(
    driver, *, prime: str, length: int, greedy: bool, seed: str = "", temperature: str = "0.8", backend: str = "wasm"
) -> str:
    """Fill the form as a user would, press Generate, wait, and return the generated text (without the prime)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    for field, value in (("prime", prime), ("length", str(length)), ("seed", seed), ("temperature", temperature)):
        element = driver.find_element(By.ID, field)
        element.clear()
        if value:
            element.send_keys(value)
    if driver.find_element(By.ID, "greedy").is_selected() != greedy:
        driver.find_element(By.ID, "greedy").click()
    Select(driver.find_element(By.ID, "backend")).select_by_value(backend)
    driver.execute_script("document.body.dataset.state = ''")
    driver.find_element(By.ID, "generate").click()
    state = wait_state(driver, timeout=300)
    assert state == "done", driver.find_element(By.ID, "status").text
    return driver.execute_script("return document.getElementById('output').dataset.generated")


def sample(ckpt: Path, *flags) -> str:
    r = run("sample", ckpt, "--prime", PRIME, *flags)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(PRIME) and r.stdout.endswith("\n")
    return r.stdout[len(PRIME) : -1]


def test_page_generates_charlm_sample_greedy_text(site, tmp_path):
    url, ckpt = site
    driver = browser()
    try:
        driver.get(url)
        assert wait_state(driver) == "ready", driver.find_element("id", "status").text
        assert "lstm 2x32" in driver.find_element("id", "about").text
        text = generate(driver, prime=PRIME, length=GREEDY_CHARS, greedy=True)
        assert text == sample(ckpt, "--greedy", "--length", GREEDY_CHARS)
        assert len(text) == GREEDY_CHARS and len(set(text)) > 3  # words, not one symbol repeated
        speed = float(driver.find_element("id", "speed").get_attribute("data-chars-per-s"))
        assert speed > 0 and "characters/s" in driver.find_element("id", "speed").text
        assert driver.find_element("id", "output").text == PRIME + text
        shot = tmp_path / "page.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 5000
        # everything came from the local server: nothing from the CDN
        sources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert sources and all(s.startswith(url) for s in sources), sources
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()


def test_page_sampling_with_a_seed_equals_charlm_sample(site):
    """The page's Mersenne Twister is Python's random.Random: the same seed draws the same text
    (on this machine; a draw within ~1e-7 of a boundary between two symbols could differ elsewhere)."""
    url, ckpt = site
    driver = browser()
    try:
        driver.get(url)
        assert wait_state(driver) == "ready"
        for seed in ("7", str(2**40 + 3)):
            text = generate(driver, prime=PRIME, length=150, greedy=False, seed=seed, temperature="0.8")
            assert text == sample(ckpt, "--length", 150, "--seed", seed, "--temperature", 0.8), seed
    finally:
        driver.quit()


def test_page_on_webgpu_gives_the_same_greedy_text(site):
    """WebGPU where the browser has an adapter (here SwiftShader's, in software); skipped where it has none."""
    url, ckpt = site
    driver = browser(webgpu=True)
    try:
        driver.get(url)
        assert wait_state(driver) == "ready"
        if not driver.execute_script("return !document.querySelector('#backend option[value=webgpu]').disabled"):
            pytest.skip("this Chromium offers no WebGPU adapter, even SwiftShader's")
        text = generate(driver, prime=PRIME, length=60, greedy=True, backend="webgpu")
        assert text == sample(ckpt, "--greedy", "--length", 60)
        assert "on webgpu" in driver.find_element("id", "status").text
    finally:
        driver.quit()
