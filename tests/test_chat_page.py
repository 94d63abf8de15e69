"""The chat page at `/`, end to end: headless Chromium (Playwright, the system /usr/bin/chromium)
against a real `zen-eco serve` on loopback.

The model is the random tiny Qwen3 with a template that opens `<think>` when thinking is on, so the
thinking block shows even with random weights. What the page sent is read from the browser's own
request and what the server did from /metrics.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from conftest import opens_thinking_tiny

from zen_eco.serve.app import serve_in_thread
from zen_eco.serve.state import ServerConfig, ServerState

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return opens_thinking_tiny(tmp_path_factory.mktemp("page") / "tiny")


@pytest.fixture(scope="module")
def url(tiny):
    with serve_in_thread(ServerState(tiny, ServerConfig("tiny-page", port=0))) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: the chat page test drives the system Chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, url):
    context = browser.new_context(base_url=url)
    page = context.new_page()
    page.set_default_timeout(30_000)
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    page.sent = sent
    page.goto("/")
    yield page
    context.close()


def generated_tokens(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(re.search(r"^zen_eco_generation_tokens_total (\S+)$", text, re.M).group(1))


def settle(url: str) -> None:
    """Wait until the server has no request running (a stopped one is freed at the next step)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        h = httpx.get(url + "/health").json()
        if h["active"] == 0 and h["queue_depth"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server still has work: {h}")


def ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_answer(page):
    return page.locator("article.msg.assistant").last


def test_page_is_self_contained(url):
    r = httpx.get(url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<script src" not in r.text and "<link" not in r.text and "http://" not in r.text.replace(
        "http://www.w3.org", "")  # nothing fetched from elsewhere


def test_answer_streams_with_the_settings_sent(page, url):
    expect_model = page.locator("#model")
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny-page')")
    assert "tiny-page" in expect_model.text_content()
    page.uncheck("#thinking")
    page.fill("#temperature", "0.9")  # random weights: hot enough that no single token dominates
    page.fill("#top_p", "0.8")
    page.fill("#max_tokens", "12")
    before = generated_tokens(url)
    ask(page, "Hello there")
    answer = last_answer(page)
    answer.locator(".stats").wait_for()
    reply = answer.locator(".text").first.text_content()
    assert answer.get_attribute("data-finish") == "length", reply
    assert reply.strip(), answer.inner_html()  # some text arrived
    assert answer.locator("details.thinking").count() == 0
    body = page.sent[-1]
    assert body["stream"] is True and body["model"] == "tiny-page"
    assert body["temperature"] == 0.9 and body["top_p"] == 0.8 and body["max_tokens"] == 12
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["messages"] == [{"role": "user", "content": "Hello there"}]
    settle(url)
    assert generated_tokens(url) - before == 12  # the server generated what the page asked for
    assert "12 tokens" in answer.locator(".stats").text_content()
    # the conversation is kept: the next request carries the whole history
    page.fill("#max_tokens", "3")
    ask(page, "And then?")
    last_answer(page).locator(".stats").wait_for()
    assert [m["role"] for m in page.sent[-1]["messages"]] == ["user", "assistant", "user"]
    assert page.sent[-1]["messages"][1]["content"].strip() == reply.strip()
    assert page.locator("article.msg").count() == 4
    page.click("#new-chat")
    assert page.locator("article.msg").count() == 0


def test_thinking_block_for_a_thinking_model(page, url):
    toggle = page.locator("#toggle-settings")
    assert page.is_visible("#settings") and toggle.get_attribute("aria-expanded") == "true"
    toggle.click()  # the settings fold away and come back
    assert page.is_hidden("#settings") and toggle.get_attribute("aria-expanded") == "false"
    toggle.click()
    page.check("#thinking")
    page.fill("#max_tokens", "10")
    ask(page, "Think first")
    answer = last_answer(page)
    answer.locator(".stats").wait_for()
    block = answer.locator("details.thinking")
    assert block.count() == 1 and block.locator(".text").text_content().strip()
    assert page.sent[-1]["chat_template_kwargs"] == {"enable_thinking": True}
    summary = block.locator("summary")
    open_before = block.evaluate("d => d.open")
    summary.click()  # collapsible
    assert block.evaluate("d => d.open") != open_before


def test_stop_button_stops_a_long_generation(page, url):
    page.uncheck("#thinking")
    page.fill("#max_tokens", "3000")
    before = generated_tokens(url)
    ask(page, "Write a very long story")
    text = last_answer(page).locator(".text").first
    page.wait_for_function("document.querySelector('article.msg.assistant .text')?.textContent.length > 0")
    first = len(text.text_content())
    page.wait_for_function(f"document.querySelector('article.msg.assistant .text').textContent.length > {first}")
    assert page.is_enabled("#stop") and page.is_disabled("#send")  # still streaming, growing as it goes
    page.click("#stop")
    answer = last_answer(page)
    answer.locator(".stats").wait_for()
    assert answer.get_attribute("data-finish") == "stopped"
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    settle(url)  # the server noticed the disconnect and freed the slot
    assert generated_tokens(url) - before < 1000


def test_api_key_field(browser, tiny):
    with serve_in_thread(ServerState(tiny, ServerConfig("keyed", port=0, api_key="sesame"))) as base:
        context = browser.new_context(base_url=base)
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto("/")
        page.wait_for_function("document.getElementById('model').textContent.includes('API key')")
        page.fill("#api_key", "sesame")
        page.dispatch_event("#api_key", "change")
        page.wait_for_function("document.getElementById('model').textContent.includes('keyed')")
        page.uncheck("#thinking")
        page.fill("#max_tokens", "4")
        ask(page, "Hi")
        answer = last_answer(page)
        answer.locator(".stats").wait_for()
        assert not answer.evaluate("a => a.classList.contains('error')")
        context.close()
