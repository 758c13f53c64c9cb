"""The server's web page in a real headless Chromium (Debian's `chromium`, driven by Playwright for Python),
against the real server on loopback serving a tiny random model and a V1 adapter that takes images (issue 35).

The page's streamed answer is compared with the server's own non-streamed answer to the same request
(greedy), so what the page shows is what the model said. With SERVE_PAGE_SCREENSHOT=1 the page after the
answer is saved to bench/results/serve_page.png (otherwise to the test's temporary folder, so that a test run
leaves the checkout as it was).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import save_tiny_folder
from playwright import sync_api
from serve_util import VISION, paced, save_v1, serve

from llama_adapter.serve import ServeConfig

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary: apt-get install chromium (.ci/run does)")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "bench" / "results" / "serve_page.png"
CONTEXT = 4096  # the tiny model's context: room for an answer long enough to be stopped halfway
MAX_TOKENS = 3000  # the server's bound on max_tokens
ANSWER_TOKENS = 24
LONG_TOKENS = MAX_TOKENS  # greedy, the tiny model does not end it early
QUESTION = "what colour is the triangle?"
ASSISTANT_TEXT = "document.querySelectorAll('.message.assistant .text')"


@pytest.fixture(scope="module")
def served_config(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("serve_page")
    folder = save_tiny_folder(root / "tiny", max_position_embeddings=CONTEXT)
    adapter = save_v1(folder, root / "v1img", seed=4, vision=VISION)
    return dict(model=str(folder), adapters={"v1img": str(adapter)}, max_tokens=MAX_TOKENS, dtype="fp32")


@pytest.fixture(scope="module")
def served(served_config) -> Any:
    with serve(ServeConfig(**served_config)) as (url, server):
        yield url, server


@pytest.fixture(scope="module")
def site(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def browser() -> Any:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@contextmanager
def open_page(browser: Any, url: str) -> Iterator[Any]:
    """A fresh page (its own storage) at `url`, failing on any JavaScript error."""
    context = browser.new_context(viewport={"width": 1000, "height": 720})
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(url)
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def page(browser, site) -> Any:
    with open_page(browser, site + "/") as page:
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        yield page


def draw_shape(path: Path) -> None:
    """A green triangle on white, 160x120, as a PNG."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (160, 120), "white")
    ImageDraw.Draw(image).polygon([(80, 12), (140, 108), (20, 108)], fill=(46, 160, 67))
    image.save(path)


def settings(page: Any, max_tokens: int, temperature: float = 0.0) -> None:
    if not page.is_visible("#max-tokens"):
        page.click(".settings summary")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))


def wait_idle(page: Any) -> None:
    """Until the answer has ended: the send button is enabled again, the stop button disabled."""
    page.wait_for_selector("#send:not([disabled])")
    assert page.is_disabled("#stop")


def chat_requests(page: Any) -> list[dict[str, Any]]:
    """The JSON bodies the page posts to /v1/chat/completions, in order (filled as they are sent)."""
    bodies: list[dict[str, Any]] = []
    page.on("request", lambda r: bodies.append(r.post_data_json)
            if r.method == "POST" and r.url.endswith("/v1/chat/completions") else None)
    return bodies


def server_answer(site: str, body: dict[str, Any]) -> str:
    """The server's non-streamed answer to a chat request."""
    request = urllib.request.Request(site + "/v1/chat/completions", data=json.dumps({**body, "stream": False}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as res:
        return json.load(res)["choices"][0]["message"]["content"]


def test_the_picker_lists_the_models_and_offers_images_only_where_taken(page):
    options = {o.get_attribute("value"): o.text_content() for o in page.locator("#model option").all()}
    assert set(options) == {"base", "v1img"}
    assert "images" in options["v1img"] and "images" not in options["base"]
    page.select_option("#model", "base")
    assert page.is_disabled("#image") and "takes no images" in page.text_content("#model-note")
    page.select_option("#model", "v1img")
    assert page.is_enabled("#image") and page.text_content("#model-note") == ""


def test_a_question_with_an_image_streams_the_models_answer(page, site, tmp_path):
    picture = tmp_path / "shape.png"
    draw_shape(picture)
    sent = chat_requests(page)
    page.select_option("#model", "v1img")
    settings(page, ANSWER_TOKENS)
    page.fill("#prompt", QUESTION)
    page.set_input_files("#image", str(picture))
    page.wait_for_selector("#pending:not([hidden])")
    page.click("#send")
    page.wait_for_function(f"{ASSISTANT_TEXT}.length === 1 && {ASSISTANT_TEXT}[0].textContent.length > 0")
    wait_idle(page)

    # the conversation shows the question with the uploaded image, then the streamed answer
    url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    user = page.locator(".message.user")
    assert user.count() == 1 and QUESTION in user.text_content()
    assert user.locator("img").get_attribute("src") == url
    assert user.locator("img").evaluate("img => img.complete && img.naturalWidth") == 160
    answer = page.locator(".message.assistant .text").text_content()
    assert answer and page.is_hidden("#error")

    # the page sent the image as an image_url part and showed exactly what the model answers to it
    assert len(sent) == 1 and sent[0]["stream"] is True and sent[0]["model"] == "v1img"
    assert sent[0]["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]}]
    assert answer == server_answer(site, sent[0])

    shot = SCREENSHOT if os.environ.get("SERVE_PAGE_SCREENSHOT") == "1" else tmp_path / SCREENSHOT.name
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 0

    # a second turn carries the whole conversation
    page.fill("#prompt", "and the square?")
    page.press("#prompt", "Enter")
    page.wait_for_function(f"{ASSISTANT_TEXT}.length === 2")
    wait_idle(page)
    assert len(sent) == 2 and sent[1]["messages"] == sent[0]["messages"] + [
        {"role": "assistant", "content": answer}, {"role": "user", "content": "and the square?"}]


def metric(site: str, name: str) -> float:
    with urllib.request.urlopen(site + "/metrics", timeout=30) as res:
        text = res.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"no {name} in /metrics"
    return float(match.group(1))


def test_stop_ends_a_long_answer_and_the_chat_goes_on(page, served):
    site, server = served
    generated = metric(site, "llama_adapter_generated_tokens_total")
    page.select_option("#model", "v1img")
    settings(page, LONG_TOKENS)
    page.fill("#prompt", "tell me a long story")
    length = f"{ASSISTANT_TEXT}[0].textContent.length"
    with paced(server, 0.005):  # the long answer takes 15 s at least, however fast the machine
        page.click("#send")
        page.wait_for_function(f"{length} > 0")
        seen = page.evaluate(length)
        page.wait_for_function(f"{length} > {seen}")  # it streams: the text grows
        page.click("#stop")  # waits for the button to be enabled: fails if the answer had already ended
    page.wait_for_selector(".message.assistant.stopped")
    wait_idle(page)
    stopped = page.evaluate(length)
    time.sleep(1.0)
    assert page.evaluate(length) == stopped  # nothing arrives after the stop
    assert page.get_attribute(".message.assistant", "data-note") == "stopped"
    # the server noticed: the sequence left the batch before its max_tokens (greedy, it has no end of its own)
    deadline = time.monotonic() + 30
    while metric(site, "llama_adapter_running_sequences") > 0:
        assert time.monotonic() < deadline, "the stopped stream is still decoding on the server"
        time.sleep(0.1)
    assert metric(site, "llama_adapter_generated_tokens_total") - generated < LONG_TOKENS

    # the server is free again: the next turn is answered
    settings(page, ANSWER_TOKENS)
    page.fill("#prompt", "a short one")
    page.click("#send")
    page.wait_for_function(f"{ASSISTANT_TEXT}.length === 2 && {ASSISTANT_TEXT}[1].textContent.length > 0")
    wait_idle(page)


def test_the_servers_json_error_is_shown(page):
    page.select_option("#model", "base")
    settings(page, MAX_TOKENS + 1)
    page.fill("#prompt", QUESTION)
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert "400" in page.text_content("#error") and "max_tokens" in page.text_content("#error")
    # the failed turn is taken back: the question returns to the input, no answer is left on the page
    assert page.input_value("#prompt") == QUESTION
    assert page.locator(".message.assistant").count() == 0 and page.locator(".message.user.failed").count() == 1


def test_with_an_api_key_the_page_asks_for_it_and_sends_it(browser, served_config):
    with serve(ServeConfig(**served_config, api_key="sesame")) as (url, _server):
        with open_page(browser, url + "/") as page:  # the page itself loads without the key
            page.wait_for_selector("#error:not([hidden])")
            assert "401" in page.text_content("#error") and page.locator("#model option").count() == 0
            page.fill("#api-key", "sesame")
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.querySelectorAll('#model option').length === 2")
            assert page.is_hidden("#error")
            assert page.evaluate("localStorage.getItem('llama-adapter.api-key')") == "sesame"
            sent: list[dict[str, str]] = []
            page.on("request", lambda r: sent.append(r.headers) if r.url.endswith("/v1/chat/completions") else None)
            settings(page, 4)
            page.fill("#prompt", QUESTION)
            page.click("#send")
            page.wait_for_function(f"{ASSISTANT_TEXT}.length === 1 && {ASSISTANT_TEXT}[0].textContent.length > 0")
            wait_idle(page)
            assert sent and sent[0]["authorization"] == "Bearer sesame"
