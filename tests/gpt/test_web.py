"""The web page at / in a real headless browser: the system's Chromium driven by Selenium (its
chromedriver from the same system packages, never a downloaded one). Type a prompt, see the text stream
in, change the temperature, stop a generation.

Without Chromium the test skips, naming what to install (`sudo apt-get install chromium chromium-driver`);
with TRITONGPT_REQUIRE_BROWSER=1 (set by .ci/run) a missing browser is a failure instead."""
from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.gpt.serving import LiveServer, random_model, slow_down

pytestmark = pytest.mark.requires("starlette", "uvicorn", "httpx")

INSTALL = "sudo apt-get install chromium chromium-driver"
REQUIRED = os.environ.get("TRITONGPT_REQUIRE_BROWSER") == "1"
STEP = 0.03          # seconds added to every model step: the text streams in over a second or two


def _missing(what: str, install: str = INSTALL):
    message = f"the web page's browser test needs {what}: {install}"
    if REQUIRED:
        pytest.fail(message + "; TRITONGPT_REQUIRE_BROWSER=1 makes this a failure")
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
    except ImportError:
        _missing("the selenium package", "pip install selenium (and " + INSTALL + ")")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        _missing("Chromium and chromedriver")
    os.environ.setdefault("SE_OFFLINE", "true")        # Selenium Manager must not try to download anything
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    b = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    b.set_page_load_timeout(30)
    try:
        yield b
    finally:
        b.quit()


@pytest.fixture(scope="module")
def server():
    model, tok = random_model()
    slow_down(model, STEP)
    with LiveServer(model, tok, slots=2, max_tokens=400) as s:
        yield s


def wait_for(condition, timeout: float, what: str):
    t0 = time.monotonic()
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


# Records the generated text's length each time the page changes it, with the time.
WATCH = """
window.seen = [];
new MutationObserver(() => window.seen.push([performance.now(), document.getElementById('generated').textContent]))
  .observe(document.getElementById('generated'), {childList: true, characterData: true, subtree: true});
"""


def text_of(b, element_id: str) -> str:
    return b.execute_script(f"return document.getElementById('{element_id}').textContent")


def api_text(server, **body) -> str:
    import httpx
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "top_p": 1.0, **body}, timeout=60)
    return r.json()["choices"][0]["text"]


def generate(b) -> None:
    b.execute_script(WATCH)
    b.find_element("id", "generate").click()
    wait_for(lambda: text_of(b, "finish").startswith(("finished", "failed", "stopped")), 60, "the generation ending")
    assert text_of(b, "error") == ""


def test_type_a_prompt_see_the_text_stream_in_and_change_the_temperature(browser, server):
    from selenium.webdriver.common.keys import Keys
    b = browser
    b.get(server.url + "/")
    wait_for(lambda: "model tiny" in text_of(b, "model"), 10, "the page finding the model")

    prompt = b.find_element("id", "prompt")
    prompt.send_keys("ROMEO:")
    tokens = b.find_element("id", "max-tokens")
    tokens.clear()
    tokens.send_keys("40")
    temperature = b.find_element("id", "temperature")
    temperature.send_keys(Keys.HOME)                # the slider to its minimum: greedy
    assert text_of(b, "temperature-value") == "0"

    generate(b)
    greedy = api_text(server, prompt="ROMEO:", max_tokens=40, temperature=0)
    assert text_of(b, "generated") == greedy and len(greedy) == 40
    assert text_of(b, "prompt-echo") == "ROMEO:"
    # It streamed: the text grew many times, each time a longer prefix of the answer, over the generation.
    seen = b.execute_script("return window.seen")
    texts = [t for _, t in seen if t]
    assert len(texts) >= 10, seen
    assert all(greedy.startswith(t) for t in texts)
    assert all(len(a) < len(c) for a, c in zip(texts, texts[1:]))
    assert seen[-1][0] - seen[0][0] > 10 * STEP * 1000
    assert text_of(b, "tokens") == "40" and float(text_of(b, "speed")) > 0
    assert text_of(b, "finish") == "finished: length" and text_of(b, "ttft").endswith("ms")

    for _ in range(30):                              # 30 steps of 0.05: temperature 1.5
        temperature.send_keys(Keys.ARROW_RIGHT)
    assert text_of(b, "temperature-value") == "1.5"
    b.find_element("id", "seed").send_keys("5")
    generate(b)
    sampled = api_text(server, prompt="ROMEO:", max_tokens=40, temperature=1.5, seed=5)
    assert text_of(b, "generated") == sampled and sampled != greedy


def test_the_stop_button_ends_the_stream_and_frees_the_slot(browser, server):
    b = browser
    b.get(server.url + "/")
    wait_for(lambda: "model tiny" in text_of(b, "model"), 10, "the page finding the model")
    b.find_element("id", "prompt").send_keys("JULIET:")
    tokens = b.find_element("id", "max-tokens")
    tokens.clear()
    tokens.send_keys("400")
    b.find_element("id", "generate").click()
    wait_for(lambda: len(text_of(b, "generated")) >= 5, 30, "text arriving")
    b.find_element("id", "stop-button").click()
    wait_for(lambda: text_of(b, "finish") == "stopped", 10, "the page saying it stopped")
    wait_for(lambda: server.engine.busy() == 0 and not server.service.jobs, 5, "the server freeing the slot")
    assert len(text_of(b, "generated")) < 400
