"""The FastAPI app and its runner: `create_app(state)`, `serve(state)`, `serve_in_thread(state)`.

Layers, outermost first: CORS (when origins are configured) -> request metrics -> body size (413)
-> API key (401) -> routes. Errors come out in the shape of the API a path belongs to:
OpenAI's `{"error": {"message", "type", "param", "code"}}` for /v1 (and anything else),
Ollama's `{"error": "message"}` for /api. Routes raise `ZenError`s (status by
`requests.error_status`: 400, 429 queue full, 503 shutting down) or HTTPException; request
validation errors (FastAPI's 422) are answered 400, as OpenAI does.

Shutdown (Ctrl-C, SIGTERM, `server.should_exit`): the scheduler is stopped first, so streams in
progress end at once with an error event instead of holding the server open until they finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from typing import Any, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ZenError
from . import ollama_api, openai_api, page
from .metrics import CONTENT_TYPE
from .openai_api import openai_error
from .requests import error_code, error_status
from .state import ServerConfig, ServerState

log = logging.getLogger("zen_eco.serve")

PROTECTED = ("/v1/", "/api/")  # what --api-key guards; /, /health and /metrics stay open


def _is_ollama(path: str) -> bool:
    return path.startswith("/api/")


class _AsciiJSON(JSONResponse):
    def render(self, content: Any) -> bytes:  # \u-escaped: error text may quote a client's lone surrogate
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def error_response(path: str, status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the shape of the API `path` belongs to."""
    body: Any = {"error": message} if _is_ollama(path) else openai_error(message, status, param, code)
    return _AsciiJSON(body, status_code=status, headers=headers)


# ------------------------------------------------------------------ middleware (plain ASGI)


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


class BodyLimit:
    """413 for bodies over `limit` bytes: at once from Content-Length, or while reading a chunked body.
    POST bodies whose content type is not JSON (curl -d sends form-urlencoded) are read as JSON."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            # Read (and drop) what the client is already sending, so it sees the answer instead of a
            # reset connection; a body far beyond the limit is cut off.
            await _drain(receive, 4 * self.limit)
            return await error_response(scope["path"], 413, BodyTooLarge(self.limit).detail,
                                        headers={"Connection": "close"})(scope, receive, send)
        if scope["method"] == "POST" and not headers.get(b"content-type", b"").split(b";")[0].strip().endswith(b"json"):
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"]
                         + [(b"content-type", b"application/json")])
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        started = False

        async def watch(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watch)
        except BodyTooLarge as exc:  # raised past the routes' own handling
            if started:
                raise
            await error_response(scope["path"], 413, exc.detail)(scope, receive, send)


async def _drain(receive, most: int) -> None:
    seen = 0
    while seen <= most:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class ApiKey:
    """`Authorization: Bearer <key>` (or `x-api-key: <key>`) on /v1 and /api routes; preflights pass."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"].startswith(PROTECTED):
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
            if not hmac.compare_digest(given, self.key):
                response = error_response(scope["path"], 401, "invalid or missing API key: send "
                                          "'Authorization: Bearer <key>'", code="invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class CountRequests:
    """zen_eco_requests_total{route, status}: route is the matched route's template ("other" if none)."""

    def __init__(self, app, state: ServerState, api: FastAPI) -> None:
        self.app, self.state, self.api = app, state, api
        self._paths: set[str] | None = None

    def _label(self, scope) -> str:
        route = getattr(scope.get("route"), "path", None)
        if route:
            return route
        if self._paths is None:  # routes not reached (401, 413): label known paths by themselves
            self._paths = set(self.api.openapi().get("paths", {}))
        return scope["path"] if scope["path"] in self._paths else "other"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.state.metrics.requests.labels(self._label(scope), str(status)).inc()


# ------------------------------------------------------------------ the app


def create_app(state: ServerState) -> FastAPI:
    """The server's ASGI app. Its lifespan starts the scheduler and stops it at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.stop)

    app = FastAPI(title="zen-eco", version="0.1.0", lifespan=lifespan,
                  description="OpenAI- and Ollama-compatible server over zen-eco's continuous-batching engine.")
    app.state.zen = state
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.include_router(page.router)

    @app.get("/health")
    async def health() -> JSONResponse:
        sched = state.scheduler
        ok = sched.running
        return JSONResponse({"status": "ok" if ok else "stopped", "model": state.config.model_id,
                             "queue_depth": sched.queue_depth, "active": sched.active,
                             "max_batch": sched.max_batch, "max_queue": sched.max_queue},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            loc = []
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_response(request.url.path, 400, message, param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body"
            message = f"the request body is not valid UTF-8: {exc.__cause__}"
        elif isinstance(exc.__cause__, RecursionError):
            message = "the request body's JSON is nested too deeply"
        return error_response(request.url.path, exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(ZenError)
    async def zen_error(request: Request, exc: ZenError) -> JSONResponse:
        return error_response(request.url.path, error_status(exc), str(exc), code=error_code(exc))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}")

    cfg = state.config
    if cfg.api_key:
        app.add_middleware(ApiKey, key=cfg.api_key)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    app.add_middleware(CountRequests, state=state, api=app)
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["*"])
    return app


# ------------------------------------------------------------------ running it


def make_server(state: ServerState, log_level: str = "info"):
    """A uvicorn Server for the app (not started). Its shutdown stops the scheduler before waiting
    for open connections, so streams end at once; 5 s later anything still open is cancelled."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            await asyncio.to_thread(state.stop)
            await super().shutdown(sockets)

    config = uvicorn.Config(create_app(state), host=state.config.host, port=state.config.port, log_level=log_level,
                            timeout_graceful_shutdown=5, access_log=log_level == "debug")
    return Server(config)


def _bound_port(server) -> int:
    return server.servers[0].sockets[0].getsockname()[1]


def serve(state: ServerState, log_level: str = "info") -> None:
    """Run the server in this thread until Ctrl-C / SIGTERM."""
    server = make_server(state, log_level)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after a clean shutdown
        pass


@contextlib.contextmanager
def serve_in_thread(state: ServerState, log_level: str = "warning", timeout: float = 60.0) -> Iterator[str]:
    """Run the server in a background thread (port 0: a free one) and yield its base URL,
    e.g. "http://127.0.0.1:54321"; stops it on exit. For tests and benchmarks."""
    server = make_server(state, log_level)
    thread = threading.Thread(target=server.run, name="zen-eco-server", daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > timeout:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    state.config.port = _bound_port(server)
    try:
        yield f"http://{state.config.host}:{state.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def model_name(ref: str | None, path: str) -> str:
    """The id clients see: a Hub id as given, else the file's or directory's name (no .gguf)."""
    from pathlib import Path

    if ref and ref != "default" and not Path(ref).exists():
        return ref
    name = Path(path).name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def serve_model(ref: str | None, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                cors_origins: list[str] | None = None, max_batch: int = 8, max_queue: int = 64,
                max_tokens: int | None = None, name: str | None = None, dtype: str = "auto", device: str = "auto",
                context: int | None = None, threads: int | None = None, quant: str = "auto",
                kv_cache: str = "bf16", log_level: str = "info", compile: bool = False) -> None:
    """`zen-eco serve`: check the options, load the model, serve until Ctrl-C."""
    import sys

    from ..api import freeze_heap, load

    if not 0 <= port <= 65535:
        raise ZenError(f"port must be in [0, 65535], got {port}")
    if max_batch < 1 or max_queue < 0:
        raise ZenError(f"--max-batch must be >= 1 and --max-queue >= 0, got {max_batch} and {max_queue}")
    if max_tokens is not None and max_tokens < 1:
        raise ZenError(f"--max-tokens must be >= 1, got {max_tokens}")
    if api_key is not None and not api_key.strip():
        raise ZenError("--api-key is empty")
    zm = load(ref, dtype=dtype, device=device, context=context, threads=threads, progress=sys.stderr.isatty(),
              quant=quant, kv_cache=kv_cache, compile=compile)
    freeze_heap()
    config = ServerConfig(name or model_name(ref, zm.path), host, port, api_key, list(cors_origins or []), max_batch,
                          max_queue, max_tokens=max_tokens)
    serve(ServerState(zm, config), log_level)
