"""How long the chat page's main thread stalls while a fast model streams a long answer.

    python benchmarks/chat_page.py [--tokens 3000]

Serves the random tiny Qwen3 of the tests (float32, hundreds of tokens a second: faster than a page can
lay out a growing answer token by token) on loopback, opens `/` in headless Chromium (/usr/bin/chromium,
Playwright), asks for a long answer with thinking off and reports the wall time until the page is idle
again, the answer's length, and the longest gap between ticks of a 10 ms timer on the page: while the
page's thread is held, nothing else runs there, the Stop button included.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import opens_thinking_tiny  # noqa: E402

from zen_eco.serve.app import serve_in_thread  # noqa: E402
from zen_eco.serve.state import ServerConfig, ServerState  # noqa: E402

TIMER = """() => { window.stall = 0; let last = performance.now();
  window.tick = setInterval(() => { const now = performance.now(); window.stall = Math.max(window.stall, now - last);
                                    last = now; }, 10); }"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=3000)
    args = p.parse_args()
    model = opens_thinking_tiny(Path(tempfile.mkdtemp()) / "tiny")
    with serve_in_thread(ServerState(model, ServerConfig("tiny-page", port=0))) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(base_url=base)
        page.goto("/")
        page.wait_for_function("document.getElementById('model').textContent.includes('tiny-page')")
        page.uncheck("#thinking")
        page.fill("#max_tokens", str(args.tokens))
        page.evaluate(TIMER)
        start = time.perf_counter()
        page.fill("#prompt", "Write a very long story")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelector('article.msg.assistant .stats') !== null", timeout=600_000)
        seconds = time.perf_counter() - start
        stall = page.evaluate("() => { clearInterval(window.tick); return window.stall; }")
        chars = page.evaluate("() => document.querySelector('article.msg.assistant .text').textContent.length")
        print(f"{args.tokens} tokens asked: {seconds:.1f} s until the page was idle, {chars} characters, "
              f"longest stall of the page's thread {stall:.0f} ms")
        browser.close()


if __name__ == "__main__":
    main()
