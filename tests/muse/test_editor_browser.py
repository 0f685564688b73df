"""The web editor at `/` in a real browser: headless Chromium driven by selenium against `muse serve` on the tiny
pipeline (16 px images, 4 px tokens). Generate with live previews, paint a mask with real pointer actions, inpaint,
and check through the page's own canvas that the pixels the server promises to keep are unchanged; undo and redo;
errors shown in the page.

Skipped when chromium, chromedriver or selenium is missing, unless MUSE_REQUIRE_BROWSER=1 (CI), where that fails."""

import os
import shutil

import numpy as np
import pytest

from muse.server import ServerSettings, ServerThread, create_app

REQUIRED = os.environ.get("MUSE_REQUIRE_BROWSER") == "1"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
TIMEOUT = 20  # seconds for any one thing the page does; the tiny model decodes a request in milliseconds


def browser_paths() -> tuple[str, str]:
    """(browser, chromedriver): skip naming what is missing, or fail where MUSE_REQUIRE_BROWSER=1 asks for them."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    browser = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if browser is None:
        missing.append("chromium (apt-get install chromium)")
    driver = shutil.which("chromedriver")
    if driver is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    if missing:
        message = "the browser test needs " + ", ".join(missing)
        if REQUIRED:
            pytest.fail(message + "; MUSE_REQUIRE_BROWSER=1 makes that a failure")
        pytest.skip(message)
    return browser, driver


def headless_chrome(*flags: str, log_browser: bool = False):
    """A headless Chromium driven by selenium (skipped or failed as `browser_paths` says), with extra `flags`."""
    browser, driver = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900", *flags):
        options.add_argument(flag)
    if log_browser:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


@pytest.fixture(scope="module")
def browser():
    chrome = headless_chrome()
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def server(tiny_pipe):
    settings = ServerSettings(preview_every=1)
    with ServerThread(create_app(tiny_pipe, settings), settings) as url:
        yield url


def open_editor(browser, server):
    browser.get(server + "/")
    wait(browser, "return document.getElementById('editor').dataset.ready === '1'")


def wait(browser, script: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, TIMEOUT).until(lambda b: b.execute_script(script))


def wait_for_request(browser, count: int) -> None:
    """Until the page has finished its `count`-th request (well or not)."""
    wait(browser, f"const e = document.getElementById('editor').dataset; "
                  f"return e.busy === '0' && Number(e.requests) >= {count}")


def canvas_pixels(browser) -> np.ndarray:
    """What the page's image canvas holds, (H, W, 4) uint8."""
    width, height, data = browser.execute_script(
        "const c = document.getElementById('image');"
        "return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];")
    return np.array(data, np.uint8).reshape(height, width, 4)


def page_mask(browser) -> np.ndarray:
    width, height, data = browser.execute_script(
        "const s = window.museEditor.state; return [s.maskWidth, s.maskHeight, Array.from(s.mask)];")
    return np.array(data, bool).reshape(height, width)


def grow(a: np.ndarray, n: int) -> np.ndarray:
    """A bool array grown by n cells in every direction (a (2n+1) x (2n+1) square), clipped at the border."""
    padded, out = np.pad(a, n), np.zeros_like(a)
    for dy in range(2 * n + 1):
        for dx in range(2 * n + 1):
            out |= padded[dy:dy + a.shape[0], dx:dx + a.shape[1]]
    return out


def kept_pixels(mask: np.ndarray, stride: int, dilation: int, seam: int) -> np.ndarray:
    """Where the server promises the input's pixels bit for bit: outside every token touching the mask, grown by
    `dilation` tokens, and then by `seam` pixels, as `MusePipeline.inpaint` documents."""
    h, w = mask.shape[0] // stride, mask.shape[1] // stride
    tokens = grow(mask.reshape(h, stride, w, stride).any(axis=(1, 3)), dilation)  # (h, w)
    return ~grow(tokens.repeat(stride, 0).repeat(stride, 1), seam)  # (H, W)


def test_kept_pixels_follow_the_composite_weights(tiny_pipe):
    """The test's own model of the promise agrees with the weights the pipeline composites with."""
    import torch

    from sampling.masks import feathered_composite_weights, pixel_to_token_mask

    mask = np.zeros((16, 16), bool)
    mask[1, 1:3] = True
    token_mask = pixel_to_token_mask(torch.from_numpy(mask)[None], 4, tiny_pipe.config.mask_dilation)
    weights = feathered_composite_weights(token_mask, 4, tiny_pipe.config.seam)[0, 0].numpy()
    assert np.array_equal(kept_pixels(mask, 4, tiny_pipe.config.mask_dilation, tiny_pipe.config.seam), weights == 0)


def test_generate_preview_paint_inpaint_undo(browser, server, tiny_pipe):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_editor(browser, server)
    # Nothing but the server: the page works offline.
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(r => r.name)")
    assert resources and all(name.startswith(server) for name in resources), resources

    # Generate: type a prompt and a seed, Enter in the prompt box.
    browser.find_element(By.ID, "seed").send_keys("3")
    browser.find_element(By.ID, "prompt").send_keys("a red apple", Keys.ENTER)
    wait_for_request(browser, 1)
    events = browser.execute_script("return window.museEditor.state.events")
    assert events[-1] == "final" and "preview" in events[:-1], events  # previews were drawn before the image
    assert int(browser.find_element(By.ID, "editor").get_attribute("data-previews")) >= 1
    assert browser.find_element(By.ID, "progress-text").text.startswith("step 4 / 4")
    generated = canvas_pixels(browser)
    expected = tiny_pipe("a red apple", seed=3, num_candidates=1).images[0]
    assert np.array_equal(generated[..., :3], np.asarray(expected))  # the server's PNG, exactly, on the canvas
    assert (generated[..., 3] == 255).all()

    # Paint a two-pixel stroke with a 1 px brush: pick the brush (out of the prompt box, where keys are text), then
    # "[" three times from the default of one token (4 px).
    browser.find_element(By.ID, "brush").click()
    canvas = browser.find_element(By.ID, "mask")
    actions = ActionChains(browser)
    for _ in range(3):
        actions.send_keys("[")
    actions.perform()
    assert browser.execute_script("return window.museEditor.state.brush") == 1
    width = browser.execute_script("return document.getElementById('mask').getBoundingClientRect().width")
    scale = width / 16

    def offset(x: float, y: float) -> tuple[int, int]:  # image pixel -> selenium's offset from the canvas centre
        return round(x * scale - width / 2), round(y * scale - width / 2)

    start, end = offset(1.5, 1.5), offset(2.5, 1.5)
    ActionChains(browser).move_to_element_with_offset(canvas, *start).click_and_hold() \
        .move_by_offset(end[0] - start[0], end[1] - start[1]).release().perform()
    mask = page_mask(browser)
    assert mask[1, 1] and mask[1, 2] and mask.sum() == 2, np.argwhere(mask)

    # Inpaint with the I key (the canvas has the focus after painting).
    ActionChains(browser).send_keys("i").perform()
    wait_for_request(browser, 2)
    assert browser.execute_script("return window.museEditor.state.events").count("final") == 1
    inpainted = canvas_pixels(browser)
    keep = kept_pixels(mask, tiny_pipe.stride(), tiny_pipe.config.mask_dilation, tiny_pipe.config.seam)
    assert keep.sum() > 100  # the check below covers most of the image
    assert np.array_equal(inpainted[keep], generated[keep])
    assert not np.array_equal(inpainted[~keep], generated[~keep])  # and the painted part was regenerated
    # The page sent exactly its image and its mask: the Python API on the same inputs gives the same pixels.
    want = tiny_pipe.inpaint("a red apple", image=generated[..., :3], mask=mask, seed=3)
    assert np.array_equal(inpainted[..., :3], np.asarray(want.images[0]))

    # Undo restores the generated image, redo the inpainted one.
    ActionChains(browser).key_down(Keys.CONTROL).send_keys("z").key_up(Keys.CONTROL).perform()
    assert np.array_equal(canvas_pixels(browser), generated)
    assert browser.find_element(By.ID, "editor").get_attribute("data-history") == "1/2"
    ActionChains(browser).key_down(Keys.CONTROL).key_down(Keys.SHIFT).send_keys("z").key_up(Keys.SHIFT) \
        .key_up(Keys.CONTROL).perform()
    assert np.array_equal(canvas_pixels(browser), inpainted)
    assert browser.find_element(By.ID, "editor").get_attribute("data-history") == "2/2"


def test_the_servers_refusals_are_shown_in_the_page(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_editor(browser, server)
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("101")  # over the server's max_steps=100
    browser.find_element(By.ID, "prompt").send_keys("a dog", Keys.ENTER)
    wait_for_request(browser, 1)
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed()
    assert "Refused (400)" in error.text and "max_steps=100" in error.text, error.text
    assert browser.find_element(By.ID, "editor").get_attribute("data-history") == "0/0"
    assert browser.find_element(By.ID, "inpaint").get_attribute("disabled")  # nothing to inpaint yet
