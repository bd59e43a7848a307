"""HTTP routes. Thin: validate against settings -> submit to the worker -> shape the OpenAI response."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from arbiter import answers
from arbiter.chat import answer_ids, prompt_ids
from arbiter.heads import HeadLoadError, HeadNotFound, LoadedHead

from .engine.base import GenerationJob, JobError, SamplingParams
from .errors import APIError, Conflict, InvalidRequest, NotFound, Overloaded, ServerError, Timeout, Unavailable
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ErrorResponse,
    HeadCard,
    HeadDeleted,
    HeadList,
    HealthStatus,
    LoadAdapterRequest,
    LoadHeadRequest,
    ModelCard,
    ModelList,
    ScoreRequest,
    ScoreResponse,
    SwapHeadRequest,
)
from .rerank import AdaptiveRule, feature_layers, pick, select, settled
from .security import require_admin, require_api_key
from .state import ServiceState
from .worker import GenerateOutcome, QueueFull, WorkerDead

log = logging.getLogger("arbiter.service")
access_log = logging.getLogger("arbiter.access")

router = APIRouter()

# OpenAPI documentation of every status a route can answer with. Only documentation: handlers still
# return plain dicts, and the fuzz tests (tests/test_fuzz.py) check real responses against these schemas.
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


def _errors(*codes: int) -> dict:
    return {c: {"model": ErrorResponse, "description": _ERROR_TEXT[c]} for c in codes}


def _ok(model) -> dict:
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
    return request.app.state.arbiter


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


@router.get("/health", tags=["ops"], responses={**_ok(HealthStatus), 503: {"model": HealthStatus, "description": "Not ready"}})
async def health(request: Request):
    st = state_of(request)
    if st.worker is None or not st.worker.alive:
        status = "loading" if st.worker is None and not st.load_error else "unavailable"
        return JSONResponse(status_code=503, content={"status": status, "error": st.load_error})
    return {"status": "ok", "model": st.model_id, "heads": st.registry.names(), "queue_depth": st.worker.depth(),
            "instance": INSTANCE}


@router.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
async def metrics(request: Request):
    st = state_of(request)
    if st.worker is not None:
        st.metrics.queue_depth.set(st.worker.depth())
    st.metrics.heads_loaded.set(len(st.registry.names()) if st.registry else 0)
    return PlainTextResponse(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", tags=["openai"], dependencies=[Depends(require_api_key)],
            responses={**_ok(ModelList), **_errors(401, 503)})
async def list_models(request: Request):
    st = ready_state(request)
    return {"object": "list", "data": [{"id": m, "object": "model", "created": st.started, "owned_by": "arbiter"}
                                       for m in [st.model_id, *_adapter_names(st)]]}


@router.get("/v1/models/{model_id:path}", tags=["openai"], dependencies=[Depends(require_api_key)],
            responses={**_ok(ModelCard), **_errors(401, 404, 503)})
async def get_model(model_id: str, request: Request):
    st = ready_state(request)
    if model_id != st.model_id and model_id not in _adapter_names(st):
        raise NotFound(f"model {model_id!r} does not exist; this server serves {sorted([st.model_id, *_adapter_names(st)])}",
                       param="model", code="model_not_found")
    return {"id": model_id, "object": "model", "created": st.started, "owned_by": "arbiter"}


# --- shared request checks ----------------------------------------------------------------------------


def _adapter_names(st: ServiceState) -> list[str]:
    ads = getattr(st.engine, "adapters", None)
    return ads.names() if ads is not None else []


def _check_model(st: ServiceState, model: str) -> str | None:
    """The switchable adapter a request's ``model`` names (ARBITER_ADAPTERS), or None for the base model."""
    if model == st.model_id or model in st.model_aliases:
        return None
    if model in _adapter_names(st):
        return model
    raise NotFound(f"model {model!r} does not exist; this server serves {sorted([st.model_id, *_adapter_names(st)])}",
                   param="model", code="model_not_found")


def _served_id(st: ServiceState, model: str) -> str:
    return model if model in _adapter_names(st) else st.model_id


def _check_head_adapters(st: ServiceState, heads: list[LoadedHead], adapter: str | None, param: str) -> None:
    """A head reads the hidden states it was trained on: those of its adapter (provenance.adapter) or the base's."""
    from .adapters import head_adapter

    merged = (getattr(getattr(st.engine, "backbone", None), "adapter", None) or {}).get("name")
    for h in heads:
        trained = head_adapter(h.config)
        if adapter is not None and trained != adapter:
            raise InvalidRequest(f"head {h.name!r} was trained on {'adapter ' + repr(trained) if trained else 'the base model'}"
                                 f"'s hidden states, not adapter {adapter!r}'s", param=param, code="head_adapter_mismatch")
        if adapter is None and trained is not None and trained != merged:
            raise InvalidRequest(f"head {h.name!r} was trained on adapter {trained!r}'s hidden states; send model="
                                 f"{trained!r} (loaded with ARBITER_ADAPTERS) to use it", param=param,
                                 code="head_adapter_mismatch")


def _messages(st: ServiceState, messages: list[ChatMessage]) -> list[dict]:
    """The messages as the shared chat encoder takes them (``arbiter.chat``: roles, tool calls and results)."""
    if len(messages) > st.settings.max_messages:
        raise InvalidRequest(f"at most {st.settings.max_messages} messages are allowed", param="messages")
    out = []
    for i, m in enumerate(messages):
        part = m.unsupported_part()
        if part is not None:
            kind = m.content[part].type  # type: ignore[index]
            raise InvalidRequest(f"content parts of type {kind!r} are not supported: this model reads text only",
                                 param=f"messages.{i}.content.{part}", code="unsupported_parameter")
        out.append(m.encoder_dict())
    if not any(m["content"].strip() for m in out if m["role"] == "user"):
        raise InvalidRequest("messages must contain at least one non-empty user message", param="messages")
    return out


def _unsupported(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {what} is not supported by this server", param=param, code="unsupported_parameter")


def _check_output_options(body: ChatCompletionRequest) -> None:
    """Fields that change what the output must be: honoured, or refused by name (never silently ignored)."""
    rf = body.response_format
    if rf is not None and rf.get("type", "text") != "text":
        raise _unsupported("response_format", f"type {str(rf.get('type'))[:40]!r} (only 'text')")
    tc = body.tool_choice
    if tc is not None and not (isinstance(tc, str) and tc in ("none", "auto")):
        shown = repr(tc[:40]) if isinstance(tc, str) else f"a {str(tc.get('type', 'named'))[:40]!r} choice"
        raise _unsupported("tool_choice", f"{shown} (this model never emits tool calls; 'none' and 'auto' are accepted)")
    fc = body.function_call
    if fc is not None and not (isinstance(fc, str) and fc in ("none", "auto")):
        raise _unsupported("function_call", "forcing a function call")
    if body.modalities is not None and any(m != "text" for m in body.modalities):
        raise _unsupported("modalities", "an output modality other than 'text'")
    if body.audio is not None:
        raise _unsupported("audio", "audio output")
    if body.web_search_options is not None:
        raise _unsupported("web_search_options", "web search")
    if (body.model_extra or {}).get("moderation") is not None:
        raise _unsupported("moderation", "output moderation")
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs=true", param="top_logprobs")


def _logit_bias(st: ServiceState, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    out = []
    for key, value in (bias or {}).items():
        try:
            tid = int(key)
        except ValueError:
            tid = -1
        if not 0 <= tid < st.vocab_size:
            raise InvalidRequest(f"logit_bias keys must be token ids between 0 and {st.vocab_size - 1}, got {key[:20]!r}",
                                 param="logit_bias")
        out.append((tid, float(value)))
    return tuple(out)


def _encode_prompt(st: ServiceState, messages: list[dict], budget: int) -> list[int]:
    try:
        ids = prompt_ids(st.engine.tokenizer, messages)
    except Exception as e:  # template errors are the request's fault (e.g. roles out of order)
        raise InvalidRequest(f"messages could not be rendered with the chat template: {e}", param="messages") from None
    limit = st.engine.context_length
    if len(ids) + budget > limit:
        raise InvalidRequest(
            f"this model's context is {limit} tokens; the messages take {len(ids)} and the answer needs "
            f"{budget} more; shorten the messages or lower max_tokens",
            param="messages", code="context_length_exceeded")
    return ids


def _resolve_heads(st: ServiceState, names: list[str] | None, param: str) -> list[LoadedHead]:
    snapshot = st.registry.snapshot()
    if not snapshot:
        raise InvalidRequest("reranking needs a reward head, and none is loaded (set ARBITER_HEADS_DIR or load one)",
                             param=param, code="no_head_loaded")
    if not names:
        default = st.settings.default_head if st.settings.default_head in snapshot else sorted(snapshot)[0]
        names = [default]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"{param} names a head more than once", param=param)
    out = []
    for n in names:
        if n not in snapshot:
            raise NotFound(f"head {n!r} is not loaded; loaded heads: {sorted(snapshot)}", param=param, code="head_not_found")
        out.append(snapshot[n])
    return out


async def _wait(request: Request, st: ServiceState, fut: asyncio.Future, cancel=None):
    """Wait for the worker; drop the work when the client disconnects or the deadline passes."""
    deadline = time.monotonic() + st.settings.request_timeout_s
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"the request did not finish within {st.settings.request_timeout_s:g} s", code="timeout")
            done, _ = await asyncio.wait({fut}, timeout=min(0.5, remaining))
            if done:
                return fut.result()
            if await request.is_disconnected():
                # An ordinary answer (uvicorn drops it): raising CancelledError here made uvicorn log
                # "Exception in ASGI application" with a traceback for every client that went away.
                raise APIError("the client closed the connection", code="client_closed_request", status=499)
    except BaseException:
        if cancel is not None:
            cancel.set()
        fut.cancel()
        raise


def _submit(st: ServiceState, submit, *args):
    try:
        return submit(*args)
    except QueueFull:
        st.metrics.rejected.labels("queue_full").inc()
        raise Overloaded("the server is busy; retry after a moment", code="queue_full",
                         headers={"Retry-After": "1"}) from None
    except WorkerDead:
        raise Unavailable("the engine worker is not running", code="engine_dead") from None


def _worker_error(e: Exception) -> APIError:
    if isinstance(e, WorkerDead):
        return Unavailable(str(e), code="engine_dead")
    if isinstance(e, JobError):  # the engine refused this request's parameters (the vLLM engine validates per job)
        return InvalidRequest(str(e), code="invalid_sampling_parameters")
    log.error("request failed in the engine: %r", e)
    return ServerError("the engine failed while serving this request", code="engine_error")


# --- chat completions ---------------------------------------------------------------------------------


@router.post("/v1/chat/completions", tags=["openai"], dependencies=[Depends(require_api_key)],
             responses={200: {"model": ChatCompletionResponse,
                              "description": "A completion; with stream=true, server-sent events of chunks",
                              "content": {"text/event-stream": {"schema": _SSE_EVENT}}},
                        **_errors(*_INFERENCE)})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = ready_state(request)
    s = st.settings
    t0 = time.monotonic()
    adapter = _check_model(st, body.model)
    extra = body.extra_fields()
    if extra:
        # Field names are client-chosen: log a bounded, escaped sample, never a megabyte of keys.
        shown = ", ".join(repr(k[:40]) for k in extra[:10]) + (f" (+{len(extra) - 10} more)" if len(extra) > 10 else "")
        log.info("ignoring unsupported fields: %s", shown)
    if body.n > s.max_n:
        raise InvalidRequest(f"n must be at most {s.max_n}", param="n")
    # Defaults never exceed the limits: a request that sends no max_tokens must not be refused for it.
    max_tokens = body.max_completion_tokens or body.max_tokens or min(s.default_max_tokens, s.max_tokens_limit)
    if max_tokens > s.max_tokens_limit:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise InvalidRequest(f"{param} must be at most {s.max_tokens_limit}", param=param)
    _check_output_options(body)
    stops = list(body.stop or [])
    if len(stops) > s.max_stop:
        raise InvalidRequest(f"at most {s.max_stop} stop strings are allowed", param="stop")
    if any(len(x) > s.max_stop_length for x in stops):
        raise InvalidRequest(f"stop strings must be at most {s.max_stop_length} characters", param="stop")

    rr = body.rerank
    heads: list[LoadedHead] = []
    n_sample = body.n
    if rr is not None:
        names = rr.heads or ([rr.head] if rr.head else None)
        heads = _resolve_heads(st, names, "rerank.heads")
        _check_head_adapters(st, heads, adapter, "rerank.heads")
        n_sample = rr.candidates if rr.candidates is not None else max(min(s.default_candidates, s.max_candidates), body.n)
        if n_sample > s.max_candidates:
            raise InvalidRequest(f"rerank.candidates must be at most {s.max_candidates}", param="rerank.candidates")
        if n_sample < body.n:
            raise InvalidRequest(f"rerank.candidates ({n_sample}) must be at least n ({body.n})", param="rerank.candidates")
        _answer_extractor(rr)  # a vote policy without a usable extractor is refused before any work
        cap_candidates, cap_tokens = _budget(request, rr)
        if cap_candidates is not None:
            n_sample = min(n_sample, cap_candidates)
        if cap_tokens is not None and not rr.adaptive:
            n_sample = min(n_sample, max(1, cap_tokens // max_tokens))  # N x max_tokens within the token budget
        if n_sample < body.n:
            raise InvalidRequest(f"the budget leaves {n_sample} candidate(s), fewer than n ({body.n})", param="rerank.budget")
        if rr.adaptive and body.stream:
            raise InvalidRequest("rerank.adaptive cannot be combined with stream=true", param="rerank.adaptive")
    messages = _messages(st, body.messages)
    # Off the event loop: a prompt near the body limit takes seconds to tokenize (the tokenizer releases
    # the GIL), and every other request, health probes included, would wait for it.
    ids = await asyncio.to_thread(_encode_prompt, st, messages, max_tokens + 1)
    params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                            stop=tuple(stops), seed=body.seed, logit_bias=_logit_bias(st, body.logit_bias),
                            frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                            logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    log_fields = {"id": rid, "n": body.n, "candidates": n_sample, "prompt_tokens": len(ids), "stream": body.stream,
                  "heads": [h.name for h in heads]}
    if s.log_prompts:
        log_fields["messages"] = messages

    if body.stream and not heads:
        return _stream_plain(request, st, body, ids, params, rid, created, log_fields, t0, adapter)

    if rr is not None and rr.adaptive:
        outcome, adaptive_info = await _adaptive(request, st, body, ids, params, heads, n_sample, adapter)
        resp = _completion_body(st, body, outcome, rid, created, heads)
        resp["rerank"]["adaptive"] = adaptive_info
        log_fields["adaptive"] = adaptive_info
        _account(st, "chat", outcome, log_fields, t0)
        return resp

    job = GenerationJob(ids, n_sample, params, feature_layers=feature_layers(heads), adapter=adapter)
    fut = _submit(st, st.worker.submit_generate, job, heads)
    if body.stream:
        return _stream_rerank(request, st, body, job, fut, rid, created, heads, log_fields, t0)
    try:
        outcome: GenerateOutcome = await _wait(request, st, fut, job.cancelled)
    except APIError:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as e:
        raise _worker_error(e) from None
    resp = _completion_body(st, body, outcome, rid, created, heads)
    _account(st, "chat", outcome, log_fields, t0)
    return resp


def _budget(request: Request, rr) -> tuple[int | None, int | None]:
    """(most candidates, most completion tokens): ``rerank.budget``, overridden key by key by ``X-Arbiter-Budget``
    (``tokens=1500``, ``candidates=4`` or both, comma-separated)."""
    cands = rr.budget.candidates if rr.budget else None
    tokens = rr.budget.tokens if rr.budget else None
    header = request.headers.get("x-arbiter-budget")
    if header:
        for part in header.split(","):
            key, _, value = part.strip().partition("=")
            try:
                n = int(value)
            except ValueError:
                n = 0
            if key not in ("tokens", "candidates") or n < 1:
                raise InvalidRequest("X-Arbiter-Budget must be 'tokens=<int>', 'candidates=<int>' or both, "
                                     f"comma-separated, with positive integers; got {header[:80]!r}",
                                     param="X-Arbiter-Budget")
            if key == "tokens":
                tokens = n
            else:
                cands = n
    return cands, tokens


async def _adaptive(request: Request, st: ServiceState, body: ChatCompletionRequest, ids: list[int],
                    params: SamplingParams, heads, n_max: int, adapter: str | None) -> tuple[GenerateOutcome, dict]:
    """Sample in rounds of ``rule.round`` candidates (continuing one seeded candidate sequence) until the leader
    is settled (rerank.settled), ``n_max`` candidates were sampled, or the token budget is spent."""
    import dataclasses
    import secrets

    import torch

    from .engine.base import GenerationResult

    rr = body.rerank
    opts = rr.adaptive if not isinstance(rr.adaptive, bool) else None
    rule = AdaptiveRule(**opts.model_dump()) if opts is not None else AdaptiveRule()
    _, cap_tokens = _budget(request, rr)
    ex = _answer_extractor(rr)
    # One base seed for every round, so round r continues the candidate sequence instead of repeating it.
    params = dataclasses.replace(params, seed=params.seed if params.seed is not None else secrets.randbits(62))
    cands, rewards, queue_s, run_s, rounds, stopped = [], [], 0.0, 0.0, 0, "max_candidates"
    while len(cands) < n_max:
        k = min(max(rule.round, body.n - len(cands)), n_max - len(cands))
        job = GenerationJob(ids, k, params, feature_layers=feature_layers(heads), first_index=len(cands), adapter=adapter)
        fut = _submit(st, st.worker.submit_generate, job, heads)
        try:
            out: GenerateOutcome = await _wait(request, st, fut, job.cancelled)
        except (APIError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise _worker_error(e) from None
        rounds += 1
        cands += out.result.candidates
        rewards.append(out.rewards)
        queue_s += out.queue_s
        run_s += out.run_s
        r = torch.cat(rewards)
        spent = sum(len(c.token_ids) for c in cands)
        found = [ex(c.text) for c in cands] if ex is not None else None
        if len(cands) >= body.n and settled(r, rr.select, found, rule):
            stopped = "settled"
            break
        if cap_tokens is not None and spent >= cap_tokens:
            stopped = "token_budget"
            break
    if len(cands) < n_max:
        st.metrics.tokens_saved.inc((n_max - len(cands)) * spent / max(len(cands), 1))
    merged = GenerateOutcome(GenerationResult(cands, len(ids)), torch.cat(rewards), queue_s, run_s)
    return merged, {"rounds": rounds, "stopped": stopped, "candidates": len(cands), "max_candidates": n_max}


def _answer_extractor(rr):
    """The request's answer extractor (None for argmax); InvalidRequest naming the field when it cannot be built."""
    if rr.select == "argmax":
        return None
    if rr.extractor is None:
        raise InvalidRequest(f"rerank.select={rr.select} needs rerank.extractor (last_number, choice_letter, regex or "
                             "json_field)", param="rerank.extractor")
    try:
        return answers.extractor(rr.extractor, pattern=rr.pattern, field=rr.field)
    except Exception as e:  # a bad pattern (regex.error) or a missing pattern / field
        param = "rerank.field" if rr.extractor == "json_field" else "rerank.pattern"
        raise InvalidRequest(f"rerank.extractor={rr.extractor}: {e}", param=param) from None


def _choices(body: ChatCompletionRequest, outcome: GenerateOutcome, heads, return_candidates: bool):
    cands = outcome.result.candidates
    rerank_info = None
    if heads:
        ex = _answer_extractor(body.rerank) if body.rerank is not None else None
        found = [ex(c.text) for c in cands] if ex is not None else None
        sel = select(outcome.rewards, body.rerank.select if body.rerank is not None else "argmax", found)
        chosen = sel.top(body.n)
        names = [h.name for h in heads]
        rerank_info = {
            "heads": names,
            "candidates_scored": len(cands),
            "policy": sel.policy,
            "chosen": chosen,
            "rewards": [float(outcome.rewards[i, 0]) for i in chosen],
        }
        if sel.groups is not None:
            rerank_info["groups"] = sel.groups
        if return_candidates:
            rerank_info["candidates"] = [
                {"index": i, "text": c.text, "finish_reason": c.finish_reason,
                 "rewards": {n: float(outcome.rewards[i, k]) for k, n in enumerate(names)},
                 "completion_tokens": len(c.token_ids)}
                for i, c in enumerate(cands)
            ]
        picked = [cands[i] for i in chosen]
    else:
        picked = list(cands)
    return picked, rerank_info


def _usage(outcome: GenerateOutcome) -> dict:
    # completion_tokens counts every candidate generated (that is the work done), not only the returned ones.
    c = outcome.result.completion_tokens
    p = outcome.result.prompt_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _completion_body(st, body, outcome, rid, created, heads) -> dict:
    picked, info = _choices(body, outcome, heads, bool(body.rerank and body.rerank.return_candidates))
    out = {
        "id": rid, "object": "chat.completion", "created": created, "model": _served_id(st, body.model),
        "system_fingerprint": st.system_fingerprint,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
             "finish_reason": c.finish_reason, "logprobs": st.token_text.logprobs(c.logprobs)}
            for i, c in enumerate(picked)
        ],
        "usage": _usage(outcome),
    }
    if info is not None:
        out["rerank"] = info
    return out


def _account(st: ServiceState, endpoint: str, outcome: GenerateOutcome | None, fields: dict, t0: float) -> None:
    if outcome is not None:
        st.metrics.tokens_generated.inc(outcome.result.completion_tokens)
        st.metrics.prompt_tokens.inc(outcome.result.prompt_tokens)
        fields.update(completion_tokens=outcome.result.completion_tokens, queue_s=round(outcome.queue_s, 4),
                      run_s=round(outcome.run_s, 4))
    fields["latency_s"] = round(time.monotonic() - t0, 4)
    access_log.info(json.dumps({"endpoint": endpoint, **fields}, default=str))


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _chunk(st, rid, created, choices, usage=None, include_usage=False, extra=None) -> str:
    obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": st.model_id,
           "system_fingerprint": st.system_fingerprint, "choices": choices}
    if include_usage:
        obj["usage"] = usage
    if extra:
        obj.update(extra)
    return _sse(obj)


def _error_event(e: Exception) -> str:
    err = e if isinstance(e, APIError) else _worker_error(e)
    return _sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})


def _stream_plain(request, st, body, ids, params, rid, created, log_fields, t0, adapter=None) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    # Deltas cross from the worker thread in order; the result future's callback ends the stream.
    job = GenerationJob(ids, body.n, params, adapter=adapter,
                        on_delta=lambda i, t, lps=None: loop.call_soon_threadsafe(q.put_nowait, (i, t, lps)))
    fut = _submit(st, st.worker.submit_generate, job, ())
    fut.add_done_callback(lambda f: q.put_nowait(None))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        deadline = time.monotonic() + st.settings.request_timeout_s
        try:
            yield _chunk(st, rid, created, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None} for i in range(body.n)],
                         include_usage=include_usage)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout(f"the request did not finish within {st.settings.request_timeout_s:g} s", code="timeout")
                try:
                    item = await asyncio.wait_for(q.get(), timeout=remaining)
                except asyncio.TimeoutError:
                    continue
                if item is None:
                    break
                i, text, lps = item
                choice = {"index": i, "delta": {"content": text}, "finish_reason": None}
                if body.logprobs:
                    choice["logprobs"] = st.token_text.logprobs(lps or [])
                yield _chunk(st, rid, created, [choice], include_usage=include_usage)
            try:
                outcome: GenerateOutcome = fut.result()
            except Exception as e:
                yield _error_event(e)
                yield "data: [DONE]\n\n"
                return
            yield _chunk(st, rid, created, [{"index": i, "delta": {}, "finish_reason": c.finish_reason}
                                            for i, c in enumerate(outcome.result.candidates)],
                         include_usage=include_usage)
            if include_usage:
                yield _chunk(st, rid, created, [], usage=_usage(outcome), include_usage=True)
            yield "data: [DONE]\n\n"
            _account(st, "chat_stream", outcome, log_fields, t0)
        except Timeout as e:
            job.cancelled.set()
            yield _error_event(e)
            yield "data: [DONE]\n\n"
        finally:
            # A client that went away cancels the generator: free the rows at the next decode step.
            if not fut.done():
                job.cancelled.set()
                fut.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _stream_rerank(request, st, body, job, fut, rid, created, heads, log_fields, t0) -> StreamingResponse:
    """Rerank + stream: candidates are scored first, then the winner(s) stream out."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        try:
            yield _chunk(st, rid, created, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None} for i in range(body.n)],
                         include_usage=include_usage)
            try:
                outcome: GenerateOutcome = await _wait(request, st, fut, job.cancelled)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                yield _error_event(e)
                yield "data: [DONE]\n\n"
                return
            picked, info = _choices(body, outcome, heads, bool(body.rerank and body.rerank.return_candidates))
            for i, c in enumerate(picked):
                choice = {"index": i, "delta": {"content": c.text}, "finish_reason": None}
                if body.logprobs:
                    choice["logprobs"] = st.token_text.logprobs(c.logprobs or [])
                yield _chunk(st, rid, created, [choice], include_usage=include_usage)
            yield _chunk(st, rid, created, [{"index": i, "delta": {}, "finish_reason": c.finish_reason}
                                            for i, c in enumerate(picked)],
                         include_usage=include_usage, extra={"rerank": info})
            if include_usage:
                yield _chunk(st, rid, created, [], usage=_usage(outcome), include_usage=True)
            yield "data: [DONE]\n\n"
            _account(st, "chat_stream", outcome, log_fields, t0)
        finally:
            if not fut.done():
                job.cancelled.set()
                fut.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# --- score ----------------------------------------------------------------------------------------------


@router.post("/v1/score", tags=["arbiter"], dependencies=[Depends(require_api_key)],
             responses={**_ok(ScoreResponse), **_errors(*_INFERENCE)})
async def score(body: ScoreRequest, request: Request):
    st = ready_state(request)
    t0 = time.monotonic()
    adapter = _check_model(st, body.model)
    if len(body.candidates) > st.settings.max_score_candidates:
        raise InvalidRequest(f"at most {st.settings.max_score_candidates} candidates are allowed", param="candidates")
    heads = _resolve_heads(st, body.heads, "heads")
    _check_head_adapters(st, heads, adapter, "heads")
    messages = _messages(st, body.messages)
    tok = st.engine.tokenizer

    def encode() -> tuple[list[int], list[list[int]]]:  # off the event loop, as in chat_completions
        answers = [answer_ids(tok, c, st.engine.end_id, close=False) for c in body.candidates]
        return _encode_prompt(st, messages, max(len(a) for a in answers) + 1), answers

    ids, answers = await asyncio.to_thread(encode)
    fut = _submit(st, st.worker.submit_score, ids, answers, heads, adapter)
    try:
        rewards = await _wait(request, st, fut)
    except (APIError, asyncio.CancelledError):
        raise
    except Exception as e:
        raise _worker_error(e) from None
    names = [h.name for h in heads]
    p = pick(rewards)
    total = len(ids) * len(answers) + sum(len(a) + 1 for a in answers)
    _account(st, "score", None, {"candidates": len(answers), "heads": names}, t0)
    return {
        "object": "score.list", "model": _served_id(st, body.model), "heads": names,
        "data": [{"index": i, "rewards": {n: float(rewards[i, k]) for k, n in enumerate(names)}} for i in range(len(answers))],
        "best": p.order[0],
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }


# --- heads ----------------------------------------------------------------------------------------------


@router.get("/v1/heads", tags=["arbiter"], dependencies=[Depends(require_api_key)],
            responses={**_ok(HeadList), **_errors(401)})
async def list_heads(request: Request):
    st = state_of(request)
    snap = st.registry.snapshot() if st.registry else {}
    return {"object": "list", "data": [snap[n].describe() for n in sorted(snap)], "default": st.default_head()}


def _head_error(e: Exception) -> APIError:
    return InvalidRequest(str(e), param="path", code="invalid_head")


@router.post("/v1/admin/heads", tags=["admin"], dependencies=[Depends(require_admin)],
             responses={**_ok(HeadCard), **_errors(*_ADMIN)})
async def load_head(body: LoadHeadRequest, request: Request):
    st = ready_state(request)
    name = body.name
    if name is not None and name in st.registry.snapshot():
        raise Conflict(f"a head named {name!r} is already loaded; swap it with PUT /v1/admin/heads/{name}",
                       param="name", code="head_exists")
    try:
        head = await asyncio.to_thread(st.registry.load, body.path, name)
    except HeadLoadError as e:
        if "already loaded" in str(e):
            raise Conflict(str(e), param="name", code="head_exists") from None
        raise _head_error(e) from None
    log.info("loaded head %s from %s", head.name, body.path)
    return head.describe()


@router.put("/v1/admin/heads/{name}", tags=["admin"], dependencies=[Depends(require_admin)],
            responses={**_ok(HeadCard), **_errors(*_ADMIN)})
async def swap_head(name: str, body: SwapHeadRequest, request: Request):
    st = ready_state(request)
    try:
        head = await asyncio.to_thread(st.registry.swap, name, body.path)
    except HeadNotFound:
        raise NotFound(f"head {name!r} is not loaded", param="name", code="head_not_found") from None
    except HeadLoadError as e:
        raise _head_error(e) from None
    log.info("swapped head %s to %s", name, body.path)
    return head.describe()


@router.delete("/v1/admin/heads/{name}", tags=["admin"], dependencies=[Depends(require_admin)],
               responses={**_ok(HeadDeleted), **_errors(401, 403, 404, 503)})
async def unload_head(name: str, request: Request):
    st = ready_state(request)
    try:
        st.registry.unload(name)
    except HeadNotFound:
        raise NotFound(f"head {name!r} is not loaded", param="name", code="head_not_found") from None
    log.info("unloaded head %s", name)
    return {"id": name, "object": "head", "deleted": True}


# --- adapters (several LoRA adapters on the one base model, ARBITER_ADAPTERS) ----------------------------------


@router.get("/v1/adapters", tags=["admin"], dependencies=[Depends(require_api_key)])
async def list_adapters(request: Request):
    st = ready_state(request)
    ads = getattr(st.engine, "adapters", None)
    return {"object": "list", "data": [ads.get(n).card() for n in ads.names()] if ads is not None else []}


def _adapter_path(st: ServiceState, path: str):
    from pathlib import Path

    root = st.settings.adapters_dir
    if not root:
        raise InvalidRequest("no adapters directory is configured (ARBITER_ADAPTERS_DIR)", param="path", code="invalid_adapter")
    root_p = Path(root).resolve()
    if not path or "\x00" in path or Path(path).is_absolute():
        raise InvalidRequest("adapter path must be a relative path inside the adapters directory", param="path",
                             code="invalid_adapter")
    cand = root_p / path
    real = cand.resolve()
    if cand.is_symlink() or (real != root_p and root_p not in real.parents) or real == root_p:
        raise InvalidRequest(f"{path!r} is not a sub-directory of the adapters directory", param="path",
                             code="invalid_adapter")
    return real


@router.post("/v1/admin/adapters", tags=["admin"], dependencies=[Depends(require_admin)],
             responses={**_errors(*_ADMIN)})
async def load_adapter(body: LoadAdapterRequest, request: Request):
    from arbiter.backbone import AdapterError

    st = ready_state(request)
    ads = getattr(st.engine, "adapters", None)
    if ads is None:
        raise InvalidRequest("this engine serves no switchable adapters (HF engine only)", param="name",
                             code="adapters_unsupported")
    if body.name in ads.names() or body.name == st.model_id:
        raise Conflict(f"a model named {body.name!r} is already served", param="name", code="adapter_exists")
    path = _adapter_path(st, body.path)
    try:
        ad = await asyncio.to_thread(ads.load, body.name, path)
    except (AdapterError, OSError, ValueError, KeyError) as e:
        raise InvalidRequest(f"cannot load adapter {body.path!r}: {e}", param="path", code="invalid_adapter") from None
    log.info("loaded adapter %s from %s", body.name, body.path)
    return ad.card()


@router.delete("/v1/admin/adapters/{name}", tags=["admin"], dependencies=[Depends(require_admin)],
               responses={**_errors(401, 403, 404, 503)})
async def unload_adapter(name: str, request: Request):
    from .adapters import AdapterNotLoaded

    st = ready_state(request)
    ads = getattr(st.engine, "adapters", None)
    try:
        if ads is None:
            raise AdapterNotLoaded(name)
        await asyncio.to_thread(ads.unload, name)  # waits for a running batch on it to finish
    except AdapterNotLoaded:
        raise NotFound(f"adapter {name!r} is not loaded", param="name", code="adapter_not_found") from None
    log.info("unloaded adapter %s", name)
    return {"id": name, "object": "adapter", "deleted": True}
