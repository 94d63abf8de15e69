"""The chat page at `/`: one self-contained HTML file (static/chat.html: no CDN, no build step).

It uses the server's own OpenAI API from the browser: the model name from /v1/models, answers
streamed from /v1/chat/completions (SSE read with fetch + ReadableStream), `reasoning_content`
shown in a collapsible block, temperature / top-p / max tokens / thinking on-off, a stop button
(AbortController: the server sees the disconnect and frees the request's slot), the conversation
kept in the page, and an API key field for servers started with --api-key.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@lru_cache(maxsize=1)
def chat_html() -> str:
    return files("zen_eco.serve").joinpath("static/chat.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def chat_page() -> HTMLResponse:
    # no-cache: a browser picks up a new page after an upgrade; the file is small
    return HTMLResponse(chat_html(), headers={"Cache-Control": "no-cache"})
