"""The web editor's screenshot in the README, from a command anyone can rerun:

    python docs/screenshot.py --out docs/editor.png      # the bundled model; needs chromium, chromedriver, selenium

It serves the model on 127.0.0.1 (as `muse serve` does), drives the page at `/` in headless Chromium: a few
generations for the history strip, a mask stroke painted with pointer actions, an inpaint with a second prompt; and
saves the window as PNG, with the mask still showing over the inpainted image.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def chrome(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        raise SystemExit("screenshot: needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                 "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))


def until(driver, script: str, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script))


def run(driver, prompt: str, seed: int | None, button: str, count: int) -> None:
    """Type the prompt (and seed), press a task's button, wait for the page's `count`-th request to finish."""
    from selenium.webdriver.common.by import By

    for field, value in (("prompt", prompt), ("seed", "" if seed is None else str(seed))):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    driver.find_element(By.ID, button).click()
    until(driver, f"const e = document.getElementById('editor').dataset; "
                  f"return e.busy === '0' && Number(e.requests) >= {count}")
    error = driver.find_element(By.ID, "error")
    if error.is_displayed():
        raise SystemExit(f"screenshot: the page shows an error: {error.text}")


def stroke(driver, points: list[tuple[float, float]]) -> None:
    """A pointer stroke through `points` in image pixels, on the mask canvas."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "mask")
    width, height, image_width, image_height = driver.execute_script(
        "const c = document.getElementById('mask'), r = c.getBoundingClientRect();"
        "return [r.width, r.height, c.width, c.height];")

    def offset(x: float, y: float) -> tuple[int, int]:  # selenium offsets are from the element's centre
        return round(x * width / image_width - width / 2), round(y * height / image_height - height / 2)

    actions = ActionChains(driver).move_to_element_with_offset(canvas, *offset(*points[0])).click_and_hold()
    previous = offset(*points[0])
    for point in points[1:]:
        here = offset(*point)
        actions.move_by_offset(here[0] - previous[0], here[1] - previous[1])
        previous = here
    actions.release().perform()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="pipeline directory (default: the bundled model)")
    parser.add_argument("--out", type=Path, default=DOCS / "editor.png")
    parser.add_argument("--size", default="1280x800", help="window size, WIDTHxHEIGHT (default: 1280x800)")
    parser.add_argument("--prompt", default="red apple, noto style")
    parser.add_argument("--inpaint-prompt", default="green apple, noto style")
    parser.add_argument("--seeds", default="0,1,2", help="generations for the history strip; the last is inpainted")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from muse.pipeline import MusePipeline
    from muse.server import ServerSettings, ServerThread, create_app

    pipe = MusePipeline.from_pretrained(args.model)
    settings = ServerSettings()
    with ServerThread(create_app(pipe, settings, model_name="screenshot"), settings) as url:
        driver = chrome(width, height)
        try:
            driver.get(url + "/")
            # --window-size is the window's; grow it by the browser's own frame so the page gets width x height.
            inner = driver.execute_script("return [innerWidth, innerHeight]")
            driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])
            until(driver, "return document.getElementById('editor').dataset.ready === '1'")
            seeds = [int(s) for s in args.seeds.split(",")]
            for count, seed in enumerate(seeds, start=1):
                run(driver, args.prompt, seed, "generate", count)
            # Regenerate the lower half of the fruit (the page's brush is in image pixels).
            resolution = driver.execute_script("return window.museEditor.state.config.resolution")
            r = resolution
            stroke(driver, [(0.3 * r, 0.62 * r), (0.7 * r, 0.62 * r), (0.7 * r, 0.72 * r), (0.3 * r, 0.72 * r)])
            run(driver, args.inpaint_prompt, seeds[-1], "inpaint", len(seeds) + 1)
            # No focus ring and no hover in the picture.
            driver.execute_script("document.activeElement.blur()")
            ActionChains(driver).move_to_element(driver.find_element(By.ID, "model-info")).perform()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    print(f"screenshot: wrote {args.out}")


if __name__ == "__main__":
    main()
