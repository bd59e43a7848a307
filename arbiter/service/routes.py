"""HTTP routes, thin: each handler checks readiness and hands the request to the chat service (serving.py) or
the head / adapter registries; OpenAPI documentation of every status a route answers with lives here."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from arbiter.heads import HeadLoadError, HeadNotFound

from . import serving
from .errors import APIError, Conflict, InvalidRequest, NotFound, Unavailable
from .protocol import (
    AdapterCard,
    AdapterDeleted,
    AdapterList,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HeadCard,
    HeadDeleted,
    HeadList,
    HeadModelCard,
    HeadPlot,
    HealthStatus,
    LoadAdapterRequest,
    LoadHeadRequest,
    ModelCard,
    ModelList,
    ScoreRequest,
    ScoreResponse,
    SwapHeadRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from .responses import ResponsesRequest, create_response
from .security import require_admin, require_api_key
from .state import ServiceState

log = logging.getLogger("arbiter.service")

router = APIRouter()

# OpenAPI documentation of every status a route can answer with. Only documentation: the fuzz tests (tests/test_fuzz.py) check real responses against these schemas.
_ERROR_TEXT = {
    400: "Invalid request (bad JSON, wrong types, values out of range, context too long, invalid head file)",
    401: "Missing or wrong API key",
    403: "An inference key was used on an admin endpoint",
    404: "Unknown model, head or route; admin endpoints when ARBITER_ADMIN_KEY is unset",
    409: "A head with this name is already loaded",
    413: "Request body larger than ARBITER_MAX_BODY_BYTES",
    429: "Queue full (ARBITER_MAX_QUEUE); retry after the Retry-After header",
    500: "The engine failed while serving the request",
    503: "Model still loading, or the engine worker is not running",
    504: "The request did not finish within ARBITER_REQUEST_TIMEOUT_S",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": _ERROR_TEXT[c]} for c in codes}


def _ok(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "description": "Success"}}


# One server-sent event of a streamed completion: a ChatCompletionChunk, an error, or the final [DONE].
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
            {"$ref": "#/components/schemas/ChatCompletionChunk"}, {"$ref": "#/components/schemas/ErrorResponse"}]}},
    ]}},
}

_INFERENCE = (400, 401, 404, 413, 429, 500, 503, 504)
_ADMIN = (400, 401, 403, 404, 409, 413, 503)


def state_of(request: Request) -> ServiceState:
    st: ServiceState = request.app.state.arbiter
    return st


def ready_state(request: Request) -> ServiceState:
    st = state_of(request)
    if st.worker is None or st.engine is None:
        if st.load_error:
            raise Unavailable(f"the model failed to load: {st.load_error}", code="model_load_failed")
        raise Unavailable("the model is still loading", code="model_loading", headers={"Retry-After": "5"})
    if not st.worker.alive:
        raise Unavailable("the engine worker is not running", code="engine_dead")
    return st


# --- health, models, metrics --------------------------------------------------------------------------


INSTANCE = f"{socket.gethostname()}:{os.getpid()}"  # which process answered (replicas behind one address)


@router.get("/health", response_model=None, tags=["ops"], responses={**_ok(HealthStatus), 503: {"model": HealthStatus, "description": "Not ready"}})
async def health(request: Request) -> HealthStatus | JSONResponse:
    st = state_of(request)
    if st.worker is None or not st.worker.alive:
        status = "loading" if st.worker is None and not st.load_error else "unavailable"
        return JSONResponse(status_code=503, content={"status": status, "error": st.load_error})
    return HealthStatus(status="ok", model=st.model_id, heads=st.require_registry().names(),
                        queue_depth=st.worker.depth(), instance=INSTANCE)


@router.get("/metrics", response_model=None, tags=["ops"], response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    st = state_of(request)
    if st.worker is not None:
        st.metrics.queue_depth.set(st.worker.depth())
    st.metrics.heads_loaded.set(len(st.registry.names()) if st.registry else 0)
    return PlainTextResponse(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=None, tags=["openai"], dependencies=[Depends(require_api_key)],
            responses={**_ok(ModelList), **_errors(401, 503)})
async def list_models(request: Request) -> ModelList:
    st = ready_state(request)
    return ModelList(data=[ModelCard(id=m, created=st.started, owned_by="arbiter")
                           for m in [st.model_id, *serving.adapter_names(st)]])


@router.get("/v1/models/{model_id:path}", response_model=None, tags=["openai"], dependencies=[Depends(require_api_key)],
            responses={**_ok(ModelCard), **_errors(401, 404, 503)})
async def get_model(model_id: str, request: Request) -> ModelCard:
    st = ready_state(request)
    if model_id != st.model_id and model_id not in serving.adapter_names(st):
        raise NotFound(f"model {model_id!r} does not exist; this server serves {sorted([st.model_id, *serving.adapter_names(st)])}",
                       param="model", code="model_not_found")
    return ModelCard(id=model_id, created=st.started, owned_by="arbiter")

# --- chat completions and scoring (serving.py) ----------------------------------------------------------


@router.post("/v1/chat/completions", response_model=None, tags=["openai"], dependencies=[Depends(require_api_key)],
             responses={200: {"model": ChatCompletionResponse,
                              "description": "A completion; with stream=true, server-sent events of chunks",
                              "content": {"text/event-stream": {"schema": _SSE_EVENT}}},
                        **_errors(*_INFERENCE)})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletionResponse | StreamingResponse:
    return await serving.create_chat_completion(ready_state(request), body, request)


@router.post("/v1/responses", response_model=None, tags=["openai"], dependencies=[Depends(require_api_key)],
             responses={200: {"description": "A Response object; with stream=true, server-sent typed events",
                              "content": {"text/event-stream": {}}}, **_errors(*_INFERENCE)})
async def responses(body: ResponsesRequest, request: Request) -> Any:
    return await create_response(ready_state(request), body, request)


@router.post("/v1/completions", response_model=None, tags=["openai"], dependencies=[Depends(require_api_key)],
             responses={**_ok(CompletionResponse), **_errors(*_INFERENCE)})
async def completions(body: CompletionRequest, request: Request) -> CompletionResponse:
    return await serving.create_completion(ready_state(request), body, request)


@router.post("/v1/score", response_model=None, tags=["arbiter"], dependencies=[Depends(require_api_key)],
             responses={**_ok(ScoreResponse), **_errors(*_INFERENCE)})
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    return await serving.score_candidates(ready_state(request), body, request)


# --- vLLM's tokenizer endpoints (eval harnesses: lm-eval's remote tokenizer) -----------------------------------


@router.post("/tokenize", response_model=None, tags=["vllm"], dependencies=[Depends(require_api_key)],
             responses={**_ok(TokenizeResponse), **_errors(400, 401, 404, 413, 503)})
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return await serving.tokenize(ready_state(request), body)


@router.post("/detokenize", response_model=None, tags=["vllm"], dependencies=[Depends(require_api_key)],
             responses={**_ok(DetokenizeResponse), **_errors(400, 401, 404, 413, 503)})
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return await serving.detokenize(ready_state(request), body)


@router.get("/tokenizer_info", response_model=None, tags=["vllm"], dependencies=[Depends(require_api_key)],
            responses={200: {"description": "The tokenizer's class, special tokens, context length and chat template"},
                       **_errors(401, 503)})
async def tokenizer_info(request: Request) -> dict[str, Any]:
    return serving.tokenizer_info(ready_state(request))


# --- heads ----------------------------------------------------------------------------------------------


@router.get("/v1/heads", response_model=None, tags=["arbiter"], dependencies=[Depends(require_api_key)],
            responses={**_ok(HeadList), **_errors(401)})
async def list_heads(request: Request) -> HeadList:
    st = state_of(request)
    snap = st.registry.snapshot() if st.registry else {}
    return HeadList(data=[HeadCard.of(snap[n]) for n in sorted(snap)], default=st.default_head())


_PNG = b"\x89PNG\r\n\x1a\n"
_MD_LINK = r"\]\(([^)\s]+\.png)\)"


def _card_and_plots(st: ServiceState, name: str) -> tuple[str | None, list[Path]]:
    """(the card's text, the PNG files it links that may be served). A plot is served only when the card links it,
    it resolves inside the heads directory's parent (the project a heads directory lives in: the shipped heads link
    benchmarks/reports/heads/...) and it starts with the PNG signature: nothing else on disk is reachable."""
    import re

    reg = st.require_registry()
    try:
        head = reg.get(name)
    except HeadNotFound:
        raise NotFound(f"head {name!r} is not loaded", param="name", code="head_not_found") from None
    if reg.root is None:
        return None, []
    d = reg.root / head.path
    card = d / "README.md"
    if not card.is_file() or card.is_symlink():
        return None, []
    text = card.read_text(errors="replace")[:200_000]
    fence = reg.root.parent
    plots = []
    for link in re.findall(_MD_LINK, text):
        f = (d / link).resolve()
        if (fence == f.parent or fence in f.parents) and f.is_file():
            with open(f, "rb") as fh:
                if fh.read(8) == _PNG:
                    plots.append(f)
    return text, plots


@router.get("/v1/heads/{name}/card", response_model=None, tags=["arbiter"], dependencies=[Depends(require_api_key)],
            responses={**_ok(HeadModelCard), **_errors(401, 404)})
async def head_card(name: str, request: Request) -> HeadModelCard:
    st = state_of(request)
    text, plots = await asyncio.to_thread(_card_and_plots, st, name)  # file reads off the event loop
    return HeadModelCard(id=name, markdown=text, plots=[HeadPlot(title=p.stem.replace("_", " "),
                                                                 url=f"/v1/heads/{name}/plots/{i}")
                                                        for i, p in enumerate(plots)])


@router.get("/v1/heads/{name}/plots/{index}", response_model=None, tags=["arbiter"], include_in_schema=False,
            dependencies=[Depends(require_api_key)])
async def head_plot(name: str, index: int, request: Request) -> Response:
    st = state_of(request)
    _, plots = await asyncio.to_thread(_card_and_plots, st, name)
    if not 0 <= index < len(plots):
        raise NotFound(f"head {name!r} has no plot {index}", param="index", code="plot_not_found")
    data = await asyncio.to_thread(plots[index].read_bytes)
    return Response(content=data, media_type="image/png")


_PLAYGROUND = Path(__file__).with_name("static") / "playground.html"


@router.get("/playground", response_model=None, include_in_schema=False)
async def playground(request: Request) -> Response:
    """The playground page (README "Playground"): static, no data in it; what it shows comes from the API calls it
    makes with the key typed into it. Off with ARBITER_PLAYGROUND=false (then 404)."""
    if not state_of(request).settings.playground:
        raise NotFound("the playground is off on this server (ARBITER_PLAYGROUND=false)", code="not_found")
    html = await asyncio.to_thread(_PLAYGROUND.read_text)
    return HTMLResponse(html, headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                                       "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; "
                                                                  "style-src 'unsafe-inline'; script-src 'unsafe-inline'"})


def _head_error(e: Exception) -> APIError:
    return InvalidRequest(str(e), param="path", code="invalid_head")


@router.post("/v1/admin/heads", response_model=None, tags=["admin"], dependencies=[Depends(require_admin)],
             responses={**_ok(HeadCard), **_errors(*_ADMIN)})
async def load_head(body: LoadHeadRequest, request: Request) -> HeadCard:
    st = ready_state(request)
    name = body.name
    if name is not None and name in st.require_registry().snapshot():
        raise Conflict(f"a head named {name!r} is already loaded; swap it with PUT /v1/admin/heads/{name}",
                       param="name", code="head_exists")
    try:
        head = await asyncio.to_thread(st.require_registry().load, body.path, name)
    except HeadLoadError as e:
        if "already loaded" in str(e):
            raise Conflict(str(e), param="name", code="head_exists") from None
        raise _head_error(e) from None
    log.info("loaded head %s from %s", head.name, body.path)
    return HeadCard.of(head)


@router.put("/v1/admin/heads/{name}", response_model=None, tags=["admin"], dependencies=[Depends(require_admin)],
            responses={**_ok(HeadCard), **_errors(*_ADMIN)})
async def swap_head(name: str, body: SwapHeadRequest, request: Request) -> HeadCard:
    st = ready_state(request)
    try:
        head = await asyncio.to_thread(st.require_registry().swap, name, body.path)
    except HeadNotFound:
        raise NotFound(f"head {name!r} is not loaded", param="name", code="head_not_found") from None
    except HeadLoadError as e:
        raise _head_error(e) from None
    log.info("swapped head %s to %s", name, body.path)
    return HeadCard.of(head)


@router.delete("/v1/admin/heads/{name}", response_model=None, tags=["admin"], dependencies=[Depends(require_admin)],
               responses={**_ok(HeadDeleted), **_errors(401, 403, 404, 503)})
async def unload_head(name: str, request: Request) -> HeadDeleted:
    st = ready_state(request)
    try:
        st.require_registry().unload(name)
    except HeadNotFound:
        raise NotFound(f"head {name!r} is not loaded", param="name", code="head_not_found") from None
    log.info("unloaded head %s", name)
    return HeadDeleted(id=name, deleted=True)


# --- adapters (several LoRA adapters on the one base model, ARBITER_ADAPTERS) ----------------------------------


@router.get("/v1/adapters", response_model=None, tags=["admin"], dependencies=[Depends(require_api_key)],
            responses={**_ok(AdapterList), **_errors(401, 503)})
async def list_adapters(request: Request) -> AdapterList:
    st = ready_state(request)
    ads = st.require_engine().adapters
    return AdapterList(data=[AdapterCard.of(ads.get(n)) for n in ads.names()] if ads is not None else [])


def _adapter_path(st: ServiceState, path: str) -> Path:
    root = st.settings.adapters_dir
    if not root:
        raise InvalidRequest("no adapters directory is configured (ARBITER_ADAPTERS_DIR)", param="path", code="invalid_adapter")
    root_p = Path(root).resolve()
    if not path or "\x00" in path or Path(path).is_absolute():
        raise InvalidRequest("adapter path must be a relative path inside the adapters directory", param="path",
                             code="invalid_adapter")
    # Every component, not only the last, must be a real directory inside the root: a symlink anywhere on the
    # way could point outside it (SECURITY.md "Adapters").
    cand = root_p
    for part in Path(path).parts:
        if part in ("..", "."):
            raise InvalidRequest(f"{path[:200]!r}: adapter paths may not contain '..' or '.'", param="path",
                                 code="invalid_adapter")
        cand = cand / part
        if cand.is_symlink():
            raise InvalidRequest(f"{path[:200]!r} goes through a symlink; adapter paths must be real directories",
                                 param="path", code="invalid_adapter")
    real = cand.resolve()
    if (real != root_p and root_p not in real.parents) or real == root_p:
        raise InvalidRequest(f"{path[:200]!r} is not a sub-directory of the adapters directory", param="path",
                             code="invalid_adapter")
    return real


@router.post("/v1/admin/adapters", response_model=None, tags=["admin"], dependencies=[Depends(require_admin)],
             responses={**_ok(AdapterCard), **_errors(*_ADMIN)})
async def load_adapter(body: LoadAdapterRequest, request: Request) -> AdapterCard:
    from arbiter.backbone import AdapterError

    st = ready_state(request)
    ads = st.require_engine().adapters
    if ads is None:
        raise InvalidRequest("this engine serves no switchable adapters (HF engine only)", param="name",
                             code="adapters_unsupported")
    if body.name in ads.names() or body.name == st.model_id:
        raise Conflict(f"a model named {body.name!r} is already served", param="name", code="adapter_exists")
    path = _adapter_path(st, body.path)
    try:
        ad = await asyncio.to_thread(ads.load, body.name, path, shown=body.path)
    except (AdapterError, ValueError, KeyError) as e:
        raise InvalidRequest(f"cannot load adapter {body.path[:200]!r}: {e}", param="path", code="invalid_adapter") from None
    except OSError as e:  # the message of an OSError names the absolute file: only its reason goes back
        raise InvalidRequest(f"cannot load adapter {body.path[:200]!r}: {e.strerror or type(e).__name__}", param="path",
                             code="invalid_adapter") from None
    log.info("loaded adapter %s from %s", body.name, body.path)
    return AdapterCard.of(ad)


@router.delete("/v1/admin/adapters/{name}", response_model=None, tags=["admin"], dependencies=[Depends(require_admin)],
               responses={**_ok(AdapterDeleted), **_errors(401, 403, 404, 409, 503)})
async def unload_adapter(name: str, request: Request) -> AdapterDeleted:
    from arbiter.generation.adapters import AdapterBusy, AdapterNotLoaded

    st = ready_state(request)
    ads = st.require_engine().adapters
    try:
        if ads is None:
            raise AdapterNotLoaded(name)
        # Waits for a running batch on it to finish (no new request joins it meanwhile), at most the bound.
        await asyncio.to_thread(ads.unload, name, wait_s=st.settings.adapter_unload_wait_s)
    except AdapterNotLoaded:
        raise NotFound(f"adapter {name!r} is not loaded", param="name", code="adapter_not_found") from None
    except AdapterBusy as e:
        raise Conflict(str(e), param="name", code="adapter_busy") from None
    log.info("unloaded adapter %s", name)
    return AdapterDeleted(id=name, deleted=True)
