"""Screenshots of a `charlm viz` page in headless Chromium (for docs/img/): one per view asked for.

    python benchmarks/viz_screens.py PAGE.html OUT_PREFIX [--view LABEL_SUBSTRING ...] [--hover CHAR_INDEX]
        [--width 1100] [--height 700] [--section text|gates|page] [--colours 64]

Each --view selects the first option of the page's "colour by" list containing the text, hovers
character --hover (the prediction box), and saves OUT_PREFIX-<n>.png. Needs chromium and
chromium-driver (apt) and selenium (the dev extra).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("page", type=Path)
    ap.add_argument("out", help="prefix of the PNG files")
    ap.add_argument("--view", action="append", default=[])
    ap.add_argument("--hover", type=int)
    ap.add_argument("--width", type=int, default=1100)
    ap.add_argument("--height", type=int, default=700)
    ap.add_argument("--section", default="text", choices=["text", "gates", "page"])
    ap.add_argument("--colours", type=int, default=0, help="reduce each PNG to this many colours (Pillow), for docs/img")
    a = ap.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={a.width},{a.height}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(a.page.resolve().as_uri())
        for n, label in enumerate(a.view or [""]):
            select = Select(driver.find_element(By.ID, "view"))
            if label:
                select.select_by_visible_text(next(o.text for o in select.options if label in o.text))
            if a.hover is not None:
                span = driver.find_elements(By.CSS_SELECTOR, "#text span.c")[a.hover]
                driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", span)
                ActionChains(driver).move_to_element(span).perform()
            out = Path(f"{a.out}-{n}.png") if a.view else Path(f"{a.out}.png")
            if a.section == "page":
                driver.save_screenshot(str(out))
            else:
                driver.find_element(By.ID, "text" if a.section == "text" else "gatesec").screenshot(str(out))
            if a.colours:
                from PIL import Image

                Image.open(out).convert("RGB").quantize(a.colours).save(out, optimize=True)
            print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
