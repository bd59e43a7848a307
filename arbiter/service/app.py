"""FastAPI application factory: ``create_app(settings, *, engine=None, heads=None)``.

Without an injected engine the model loads in a background thread at start-up, so the server answers at
once: ``/health`` says 503 until the model and heads are ready. Tests inject a fake engine and a
prepared head registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from arbiter import __version__
from arbiter.heads import HeadRegistry

from . import engine as engine_mod
from .errors import APIError, error_response
from .metrics import Metrics
from .protocol import DOC_ONLY_MODELS, REFUSAL
from .routes import router
from .settings import Settings
from .state import ServiceState
from .worker import Worker

if TYPE_CHECKING:
    from arbiter.generation.base import Engine

log = logging.getLogger("arbiter.service")


class BodySizeLimit:
    """Pure ASGI middleware: refuse bodies over the limit with 413 (by header, or while streaming in)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._reject(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _TooLarge(self.max_bytes).response()(scope, receive, send)


class _TooLarge(StarletteHTTPException):
    """Raised from ``receive`` when a body without Content-Length (chunked) runs over the limit. An
    HTTPException because FastAPI turns any other exception raised while it reads the body into
    "400 There was an error parsing the body"; HTTPExceptions pass through to the app's handler."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body larger than {max_bytes} bytes")

    def response(self) -> JSONResponse:
        return error_response(413, self.detail, "invalid_request_error", None, "body_too_large")


class AllowedHosts:
    """Pure ASGI middleware: with ARBITER_ALLOWED_HOSTS set, a request whose Host header names another host gets
    400 (OpenAI's error shape). Against DNS rebinding: a web page on evil.example whose name a resolver points at
    127.0.0.1 reaches a key-less local server from the victim's browser, but its requests carry Host: evil.example."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str]):
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.hosts:
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
        if host_name(host) not in self.hosts:
            resp = error_response(400, "the Host header names a host this server does not answer for "
                                       "(ARBITER_ALLOWED_HOSTS)", "invalid_request_error", None, "host_not_allowed")
            return await resp(scope, receive, send)
        await self.app(scope, receive, send)


def host_name(host: str) -> str:
    """The host of a Host header, lower case, without its port: ``[::1]:8000`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestMetrics:
    """Pure ASGI middleware: count every HTTP request by route and status, and time it to its last byte.

    The label is the route's path template (unknown paths share ``unmatched``, so clients cannot grow the
    label set). A request that ends without a response is 499 when cancelled (client gone), else 500.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        status: list[int] = []

        async def send_status(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status.append(msg["status"])
            await send(msg)

        failed = "500"
        try:
            await self.app(scope, receive, send_status)
        except BaseException as e:
            failed = "499" if isinstance(e, asyncio.CancelledError) else "500"
            raise
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, str(status[0]) if status else failed).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - t0)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """(message, param, code) of a request that failed validation: a cross-field rule's own (protocol.refusal),
    else the first error that says what is wrong, named by its field."""
    errs = exc.errors()
    if not errs:
        return "invalid request", None, "invalid_value"
    own = next((x for x in errs if x.get("type") == REFUSAL), None)
    if own is not None:
        ctx = own.get("ctx") or {}
        return str(ctx.get("message", own.get("msg"))), ctx.get("param"), str(ctx.get("code", "invalid_value"))
    # A value that fails every member of a union (str | list[...]) yields one error per member; the one a
    # validator raised on purpose (value_error) says what is wrong, "Input should be a valid list" does not.
    # A JSON object against `bool | Options` fails the bool member too ("Input should be a valid boolean"); the
    # object member's error names the field at fault, so it goes first.
    primitive = {"bool", "str", "int", "float"}
    e = next((x for x in errs if x.get("type") == "value_error"), None) \
        or next((x for x in errs if str((x.get("loc") or ("",))[-1]) not in primitive), errs[0])
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None, "invalid_value"
    if e.get("type") == "missing" and not loc:
        return "the request needs a JSON body", None, "invalid_value"
    # pydantic's locations for union members (e.g. 'str', 'list[TextPart]') are noise for a client.
    # Model members of a union show as their class name ('PruneOptions'); field names here are never capitalised.
    param = ".".join(x for x in loc if not any(c in x for c in "[]") and x not in primitive and not x[:1].isupper()) or None
    msg = e.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param, "invalid_value"


def _openapi_with_400(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI documents request validation failures as 422; this service answers them 400 (OpenAI's
    status), documented per route. Drop the 422 entries so the schema states what the server does, and add
    the schemas of models only the document refers to."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base()  # caches app.openapi_schema; edited in place
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            comps.pop("HTTPValidationError", None)
            comps.pop("ValidationError", None)
            for model in DOC_ONLY_MODELS:  # e.g. the streamed chunk, referenced from text/event-stream
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in js.pop("$defs", {}).items():
                    comps.setdefault(name, sub)
                comps.setdefault(model.__name__, js)
        assert app.openapi_schema is not None
        return app.openapi_schema

    return openapi


def _watch_heads(state: ServiceState, every_s: float) -> None:
    """Poll the heads directory (ARBITER_HEADS_WATCH_S): replicas that share it pick up added, changed and removed
    heads without an admin call reaching each of them."""
    import threading

    def loop() -> None:
        while not state.stopping.wait(every_s):
            try:
                changes = state.require_registry().sync()
            except Exception:  # a scan error must not kill the watcher
                log.exception("heads directory scan failed")
                continue
            for kind, names in changes.items():
                for n in names:
                    (log.error if kind == "errors" else log.info)("heads directory: %s %s", kind, n)
            if any(changes.values()):
                state.metrics.heads_loaded.set(len(state.require_registry().names()))

    threading.Thread(target=loop, name="arbiter-heads-watch", daemon=True).start()


def free_memory_bytes(device: str) -> int:
    """Memory a batch may still take: free GPU memory on CUDA; on CPU the kernel's MemAvailable, or what the cgroup
    (a container's limit) leaves, whichever is smaller."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info()[0])
    avail = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    return max(int(avail), 0)


def batch_token_budget(settings: Settings, eng: "Engine", device: str) -> int | None:
    """ARBITER_MAX_BATCH_TOKENS, or its default: a quarter of the free memory over twice the KV bytes per token (a
    decode step appends to the cache by copying it, so a batch briefly holds its cache twice); None when the engine
    bounds its own KV memory."""
    if settings.max_batch_tokens is not None:
        return settings.max_batch_tokens
    per = eng.kv_bytes_per_token()
    if not per:
        return None
    return max(4096, free_memory_bytes(device) // 4 // (2 * per))


def create_app(settings: Settings | None = None, *, engine: "Engine | None" = None, heads: HeadRegistry | None = None,
               exit_on_engine_death: bool = True) -> FastAPI:
    settings = settings or Settings()
    state = ServiceState(settings=settings, metrics=Metrics(), registry=heads)

    def on_death(exc: BaseException) -> None:
        app.state.exit_code = 3
        if exit_on_engine_death:
            log.critical("engine worker died; asking the server to exit so a supervisor restarts it")
            server = getattr(app.state, "server", None)
            if server is not None:  # set by `arbiter serve`: a clean stop, then exit code 3
                server.should_exit = True
            else:
                os.kill(os.getpid(), signal.SIGTERM)

    def start(eng: Engine) -> None:
        device = engine_mod.resolve_device(settings) if engine is None else "cpu"
        if state.registry is None:
            state.registry = HeadRegistry(settings.heads_dir, eng.fingerprint,
                                          device=device,
                                          supported_layers=eng.supported_features(),
                                          engine=type(eng).__name__)
            loaded, errors = state.registry.load_all()
            state.head_load_errors = errors
            for d, err in errors.items():
                log.error("head %s not loaded: %s", d, err)
            if loaded:
                log.info("heads loaded: %s", ", ".join(loaded))
            for name in loaded:
                dtype_warning = state.registry.get(name).config.dtype_warning(eng.dtype)
                if dtype_warning:
                    log.warning("%s", dtype_warning)
                trained_with = state.registry.get(name).config.provenance.get("adapter")
                if trained_with and Path(trained_with).name != eng.adapter_name:
                    log.warning("head %s was trained jointly with adapter %s, which is not the one served (%s): "
                                "its rewards assume that adapter", name, trained_with, eng.adapter_name)
        if settings.heads_watch_s and state.registry.root is not None:  # also a registry the embedder passed in
            _watch_heads(state, settings.heads_watch_s)
        if settings.prune_at and not eng.prunes:
            raise ValueError(f"ARBITER_PRUNE_AT: the {type(eng).__name__} does not prune (partial rewards come from the "
                             "HF engine's decode loop; docs/features.md \"Pruning\")")
        state.bind_engine(eng)
        budget = batch_token_budget(settings, eng, device)
        per = eng.kv_bytes_per_token()
        if budget is None:
            log.info("batch token budget: none (the %s engine bounds its own KV memory)", type(eng).__name__)
        else:
            log.info("batch token budget: %d tokens (rows x (prompt + max_tokens))%s", budget,
                     f", ~{budget * per / 2**30:.1f} GiB of KV cache" if per else "")
        w = Worker(eng, max_queue=settings.max_queue, max_batch_rows=settings.max_batch_rows,
                   continuous=settings.continuous_batching, max_batch_tokens=budget,
                   metrics=state.metrics, on_death=on_death)
        w.start()
        state.worker = w
        log.info("ready: model %s", state.model_id)

    def load_in_background() -> None:
        try:
            start(engine_mod.load_engine(settings))
        except Exception as e:  # surfaced by /health and 503s, and logged
            state.load_error = f"{type(e).__name__}: {e}"
            log.exception("model load failed")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            start(engine)
        else:
            threading.Thread(target=load_in_background, name="arbiter-load", daemon=True).start()
        yield
        state.stopping.set()
        if state.worker is not None:
            state.worker.stop()  # drains queued work

    app = FastAPI(title="Arbiter", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat completions with best-of-N reranking by Direct Preference Heads")
    app.state.arbiter = state
    app.state.exit_code = 0
    app.include_router(router)
    app.openapi = _openapi_with_400(app)  # type: ignore[method-assign]  # FastAPI's documented override
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AllowedHosts, hosts=settings.allowed_host_set())
    app.add_middleware(RequestMetrics, metrics=state.metrics)  # outermost of ours: counts 413s too

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param, code = _validation_message(exc)
        return error_response(400, msg, "invalid_request_error", param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, _TooLarge):
            return exc.response()
        if exc.status_code == 404:
            return error_response(404, f"no route {request.method} {request.url.path}", "not_found_error", None, "unknown_route")
        if exc.status_code == 405:
            return error_response(405, f"method {request.method} is not allowed on {request.url.path}",
                                  "invalid_request_error", None, "method_not_allowed")
        t = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), t)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error", "server_error", None, "internal_error")

    return app
