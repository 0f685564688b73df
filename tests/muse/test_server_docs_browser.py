"""`/docs` in a real browser, offline: headless Chromium against `muse serve` on the tiny pipeline, with every
request the page makes to another origin blocked, lists every operation of /openapi.json with its body's fields.
FastAPI's own Swagger UI loads from a CDN and is a blank page offline (issue 24).

Skipped when chromium, chromedriver or selenium is missing, unless MUSE_REQUIRE_BROWSER=1 (CI), where that fails."""

import json
import urllib.request

import pytest

from muse.server import TASKS, ServerSettings, ServerThread, create_app
from tests.muse.test_editor_browser import TIMEOUT, headless_chrome


@pytest.fixture(scope="module")
def browser():
    # Offline: every host but the loopback server resolves nowhere, so a CDN script would fail to load.
    chrome = headless_chrome("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", log_browser=True)
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def server(tiny_pipe):
    settings = ServerSettings(preview_every=1)
    with ServerThread(create_app(tiny_pipe, settings), settings) as url:
        yield url


def test_docs_lists_every_operation_offline(browser, server):
    from selenium.webdriver.support.ui import WebDriverWait

    with urllib.request.urlopen(server + "/openapi.json") as response:
        spec = json.load(response)
    expected = {(method.upper(), path) for path, methods in spec["paths"].items() for method in methods}
    assert {("POST", endpoint) for endpoint in TASKS} | {("GET", "/health"), ("GET", "/metrics")} <= expected

    browser.get(server + "/docs")
    state = WebDriverWait(browser, TIMEOUT).until(
        lambda b: b.execute_script("const s = document.getElementById('docs').dataset.ready; return s !== '0' && s"))
    assert state == "1", browser.find_element("id", "error").text
    shown = browser.execute_script(
        "return [...document.querySelectorAll('.operation')].map(o => [o.dataset.method, o.dataset.path])")
    assert {tuple(item) for item in shown} == expected
    fields = browser.execute_script(
        "return [...document.querySelectorAll('[data-path=\"/generate\"] tr.field')].map(r => r.dataset.field)")
    assert {"prompt", "seed", "num_steps", "guidance_scale", "stream"} <= set(fields)
    assert browser.find_element("css selector", '[data-path="/outpaint"]').text.count("pad") >= 1
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(r => r.name)")
    assert resources and all(name.startswith(server) for name in resources), resources
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
