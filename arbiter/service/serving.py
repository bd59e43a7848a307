"""The chat service behind the thin routes (routes.py): request checks against the settings, building and
submitting the job, awaiting it, and shaping OpenAI's response and chunk models (protocol.py); one SSE
generator serves both streaming paths (plain deltas as they arrive; rerank: the winner(s) once scored)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable, Literal, Sequence

from fastapi import Request
from fastapi.responses import StreamingResponse

from arbiter import answers
from arbiter.generation.base import (
    AdapterGone,
    Candidate,
    ConfidenceSpec,
    GenerationJob,
    JobError,
    PruneSpec,
    SamplingParams,
    TokenLogprob,
)
from arbiter.heads import LoadedHead
from arbiter.heads.config import CONFIDENCE_POLICIES
from arbiter.selection import AdaptiveRule, ConfidenceRule, VerifyWeights, select, settled

from .errors import APIError, InvalidRequest, NotFound, Overloaded, ServerError, Timeout, Unavailable
from .protocol import (
    AdaptiveInfo,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatMessageOut,
    Choice,
    ChunkChoice,
    ChunkDelta,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionRerank,
    CompletionResponse,
    ConfidenceInfo,
    DetokenizeRequest,
    DetokenizeResponse,
    PartialReward,
    PruneCheckpoint,
    PruneInfo,
    PruneOptions,
    RerankCandidate,
    RerankInfo,
    RerankOptions,
    RerankRule,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    ScoreUsage,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    VerifyInfo,
)
from .rerank import feature_layers
from .state import ServiceState
from .worker import GenerateOutcome, OverBudget, QueueFull, WorkerDead

log = logging.getLogger("arbiter.service")
access_log = logging.getLogger("arbiter.access")


def _put_threadsafe(loop: asyncio.AbstractEventLoop, q: asyncio.Queue[Any], item: Any) -> None:
    """Queue ``item`` from the worker thread, in order, on the event loop's queue."""
    loop.call_soon_threadsafe(q.put_nowait, item)


# --- shared request checks ----------------------------------------------------------------------------


def adapter_names(st: ServiceState) -> list[str]:
    ads = st.engine.adapters if st.engine is not None else None
    return ads.names() if ads is not None else []


def _check_model(st: ServiceState, model: str) -> str | None:
    """The switchable adapter a request's ``model`` names (ARBITER_ADAPTERS), or None for the base model."""
    if model == st.model_id or model in st.model_aliases:
        return None
    if model in adapter_names(st):
        return model
    raise NotFound(f"model {model!r} does not exist; this server serves {sorted([st.model_id, *adapter_names(st)])}",
                   param="model", code="model_not_found")


def _served_id(st: ServiceState, model: str) -> str:
    return model if model in adapter_names(st) else st.model_id


def _check_head_adapters(st: ServiceState, heads: list[LoadedHead], adapter: str | None, param: str) -> None:
    """A head reads the hidden states it was trained on: those of its adapter (provenance.adapter) or the base's."""
    from .adapters import head_adapter

    merged = st.require_engine().adapter_name
    for h in heads:
        trained = head_adapter(h.config)
        if adapter is not None and trained != adapter:
            raise InvalidRequest(f"head {h.name!r} was trained on {'adapter ' + repr(trained) if trained else 'the base model'}"
                                 f"'s hidden states, not adapter {adapter!r}'s", param=param, code="head_adapter_mismatch")
        if adapter is None and trained is not None and trained != merged:
            raise InvalidRequest(f"head {h.name!r} was trained on adapter {trained!r}'s hidden states; send model="
                                 f"{trained!r} (loaded with ARBITER_ADAPTERS) to use it", param=param,
                                 code="head_adapter_mismatch")


def _messages(st: ServiceState, messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the shared chat encoder takes them (``arbiter.chat``: roles, tool calls and results)."""
    if len(messages) > st.settings.max_messages:
        raise InvalidRequest(f"at most {st.settings.max_messages} messages are allowed", param="messages")
    out = []
    for i, m in enumerate(messages):
        part = m.unsupported_part()
        if part is not None:
            kind = getattr(m.content[part], "type", "?")  # type: ignore[index]
            raise InvalidRequest(f"content parts of type {kind!r} are not supported: this model reads text only",
                                 param=f"messages.{i}.content.{part}", code="unsupported_parameter")
        out.append(m.encoder_dict())
    if not any(m["content"].strip() for m in out if m["role"] == "user"):
        raise InvalidRequest("messages must contain at least one non-empty user message", param="messages")
    return out


def _logit_bias(st: ServiceState, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    out = []
    if bias and len(bias) > st.settings.max_logit_bias:
        raise InvalidRequest(f"logit_bias may have at most {st.settings.max_logit_bias} entries, got {len(bias)}",
                             param="logit_bias")
    for key, value in (bias or {}).items():
        # Canonical decimal ids only: "01", "+1" or " 1" would alias token 1 and let one id appear twice.
        tid = int(key) if key.isdigit() and key.isascii() and (key == "0" or not key.startswith("0")) else -1
        if not 0 <= tid < st.vocab_size:
            raise InvalidRequest(f"logit_bias keys must be token ids between 0 and {st.vocab_size - 1}, got {key[:20]!r}",
                                 param="logit_bias")
        out.append((tid, float(value)))
    return tuple(out)


def _encode_prompt(st: ServiceState, messages: list[dict[str, Any]], budget: int) -> list[int]:
    try:
        ids = st.require_engine().encode_prompt(messages)
    except Exception as e:  # template errors are the request's fault (e.g. roles out of order)
        raise InvalidRequest(f"messages could not be rendered with the chat template: {e}", param="messages") from None
    limit = st.require_engine().context_length
    if len(ids) + budget > limit:
        raise InvalidRequest(
            f"this model's context is {limit} tokens; the messages take {len(ids)} and the answer needs "
            f"{budget} more; shorten the messages or lower max_tokens",
            param="messages", code="context_length_exceeded")
    return ids


def _encode_continuation(st: ServiceState, messages: list[dict[str, Any]], budget: int) -> list[int]:
    """``continue_final_message``: the conversation before the last message as a prompt (ending with the assistant
    header), then the last (assistant) message's text, not closed: generation continues it, and a head reads the
    whole answer (that text and the continuation) at the closing token, as for any answer."""
    prefix = st.require_engine().encode_answer(str(messages[-1]["content"]))
    return _encode_prompt(st, messages[:-1], budget + len(prefix)) + prefix


def _resolve_heads(st: ServiceState, names: list[str] | None, param: str) -> list[LoadedHead]:
    snapshot = st.require_registry().snapshot()
    if not snapshot:
        raise InvalidRequest("reranking needs a reward head, and none is loaded (set ARBITER_HEADS_DIR or load one)",
                             param=param, code="no_head_loaded")
    if not names:
        default = st.default_head()  # THE default-head rule (state.py), also shown by /v1/heads
        names = [default if default is not None and default in snapshot else sorted(snapshot)[0]]  # (an unload between)
    if len(set(names)) != len(names):
        raise InvalidRequest(f"{param} names a head more than once", param=param)
    out = []
    for n in names:
        if n not in snapshot:
            raise NotFound(f"head {n!r} is not loaded; loaded heads: {sorted(snapshot)}", param=param, code="head_not_found")
        out.append(snapshot[n])
    return out


async def _wait(request: Request, st: ServiceState, fut: asyncio.Future[Any], cancel: threading.Event | None = None) -> Any:
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


def _submit(st: ServiceState, submit: Callable[..., asyncio.Future[Any]], *args: Any) -> asyncio.Future[Any]:
    try:
        return submit(*args)
    except QueueFull:
        st.metrics.rejected.labels("queue_full").inc()
        raise Overloaded("the server is busy; retry after a moment", code="queue_full",
                         headers={"Retry-After": "1"}) from None
    except WorkerDead:
        raise Unavailable("the engine worker is not running", code="engine_dead") from None
    except OverBudget as e:
        st.metrics.rejected.labels("batch_token_budget").inc()
        raise InvalidRequest(str(e), code="batch_token_budget") from None


def _worker_error(e: Exception) -> APIError:
    if isinstance(e, WorkerDead):
        return Unavailable(str(e), code="engine_dead")
    if isinstance(e, AdapterGone):
        return NotFound(str(e), param="model", code="model_not_found")
    if isinstance(e, JobError):  # the engine refused this request's parameters (the vLLM engine validates per job)
        return InvalidRequest(str(e), code="invalid_sampling_parameters")
    log.error("request failed in the engine: %r", e)
    return ServerError("the engine failed while serving this request", code="engine_error")


# --- chat completions ---------------------------------------------------------------------------------


# --- chat completions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatPlan:
    """A chat request resolved once, before any work: every check against the settings done, the heads, the
    selection rule and its extractor, N and the caps, the adapter and the prompt ids. Everything downstream (the
    one-batch path, adaptive rounds, the stream) reads it instead of re-reading the body."""

    body: ChatCompletionRequest
    adapter: str | None
    heads: list[LoadedHead]
    rule: "Rule"
    n_sample: int  # candidates to sample (the maximum for adaptive requests)
    cap_tokens: int | None  # the token budget (rerank.budget / X-Arbiter-Budget)
    ids: list[int]
    params: SamplingParams
    rid: str
    created: int
    t0: float
    log_fields: dict[str, Any]
    answers: "Answers"  # the request's extracted answers (filled as candidates arrive)
    prune: PruneSpec | None = None  # early rejection (rerank.prune / ARBITER_PRUNE_AT), resolved
    conf: ConfidenceSpec | None = None  # each candidate's confidence, computed while decoding

    @property
    def reranking(self) -> bool:
        """A rerank request (with or without a head: the training-free policies need none)."""
        return self.body.rerank is not None

    @property
    def online(self) -> Any:
        """DeepConf's online stop (``rerank.confidence.online``), or None."""
        rr = self.body.rerank
        return rr.confidence.online if rr is not None and rr.confidence is not None else None

    @property
    def return_candidates(self) -> bool:
        return bool(self.body.rerank and self.body.rerank.return_candidates)

    @property
    def adaptive(self) -> AdaptiveRule | None:
        rr = self.body.rerank
        if rr is None or not rr.adaptive:
            return None
        return AdaptiveRule(**rr.adaptive.model_dump()) if not isinstance(rr.adaptive, bool) else AdaptiveRule()


async def plan_chat(st: ServiceState, body: ChatCompletionRequest, request: Request) -> ChatPlan:
    """Check ``body`` against the settings and resolve it into a :class:`ChatPlan` (InvalidRequest / NotFound
    naming the field otherwise). Tokenizes off the event loop."""
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
    max_tokens = body.requested_max_tokens or min(s.default_max_tokens, s.max_tokens_limit)
    if max_tokens > s.max_tokens_limit:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise InvalidRequest(f"{param} must be at most {s.max_tokens_limit}", param=param)
    stops = list(body.stop or [])
    if len(stops) > s.max_stop:
        raise InvalidRequest(f"at most {s.max_stop} stop strings are allowed", param="stop")
    if any(len(x) > s.max_stop_length for x in stops):
        raise InvalidRequest(f"stop strings must be at most {s.max_stop_length} characters", param="stop")

    rr = body.rerank
    heads: list[LoadedHead] = []
    rule = DEFAULT_RULE
    n_sample = body.n
    cap_tokens: int | None = None
    prune: PruneSpec | None = None
    conf: ConfidenceSpec | None = None
    if rr is not None:
        names = rr.heads or ([rr.head] if rr.head else None)
        # The training-free policies need no head: one is used only where the request names it.
        heads = [] if rr.select in CONFIDENCE_POLICIES and not names else _resolve_heads(st, names, "rerank.heads")
        _check_head_adapters(st, heads, adapter, "rerank.heads")
        n_sample = rr.candidates if rr.candidates is not None else max(min(s.default_candidates, s.max_candidates), body.n)
        if n_sample > s.max_candidates:
            raise InvalidRequest(f"rerank.candidates must be at most {s.max_candidates}", param="rerank.candidates")
        assert n_sample >= body.n  # explicit candidates >= n is the request's own rule (protocol); the default is max'd
        rule = _rule(rr, heads)  # a vote policy without a usable extractor is refused before any work
        cap_candidates, cap_tokens = _budget(request, rr)
        if cap_candidates is not None:
            n_sample = min(n_sample, cap_candidates)
        if cap_tokens is not None and not rr.adaptive:
            n_sample = min(n_sample, max(1, cap_tokens // max_tokens))  # N x max_tokens within the token budget
        if n_sample < body.n:
            raise InvalidRequest(f"the budget leaves {n_sample} candidate(s), fewer than n ({body.n})", param="rerank.budget")
        prune = _prune_spec(st, rr, body.n, max_tokens) if heads or rr.prune else None
        if prune is not None and not heads:
            raise InvalidRequest("rerank.prune ranks prefixes by a head's partial rewards and this request scores with "
                                 "no head; DeepConf's confidence stop is rerank.confidence.online", param="rerank.prune",
                                 code="unsupported_parameter")
        conf = _confidence_spec(rr, rule, body.n, n_sample, prune)
        if body.stream and rr.confidence is not None and rr.confidence.online is not None:
            raise InvalidRequest("rerank.confidence.online samples in two rounds, which a stream does not: send "
                                 "stream: false", param="rerank.confidence.online", code="unsupported_parameter")
        if rule.policy == "verify" and prune is not None:
            raise InvalidRequest("rerank.select=verify cannot prune: a pruned candidate's answer is never read, and "
                                 "verification ranks answers, not prefixes (send prune: false)", param="rerank.prune",
                                 code="unsupported_parameter")
    messages = _messages(st, body.messages)
    if rr is not None and rule.policy == "verify" and rule.uses_option:
        rule = _with_options(rule, rr, messages)
    # Off the event loop: a prompt near the body limit takes seconds to tokenize (the tokenizer releases
    # the GIL), and every other request, health probes included, would wait for it.
    if body.continue_final_message:  # the candidates continue the last assistant message (vLLM's meaning)
        ids = await asyncio.to_thread(_encode_continuation, st, messages, max_tokens + 1)
    else:
        ids = await asyncio.to_thread(_encode_prompt, st, messages, max_tokens + 1)
    if body.structured is not None and not st.require_engine().structured:
        raise InvalidRequest(f"response_format {body.structured.kind} needs constrained decoding, which the "
                             f"{type(st.engine).__name__} does not do (the HF and vLLM engines do)",
                             param="response_format", code="unsupported_parameter")
    params = body.to_sampling_params(max_tokens=max_tokens, logit_bias=_logit_bias(st, body.logit_bias))
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    log_fields: dict[str, Any] = {"id": rid, "n": body.n, "candidates": n_sample, "prompt_tokens": len(ids),
                                  "stream": body.stream, "heads": [h.name for h in heads]}
    if s.log_prompts:
        log_fields["messages"] = messages
    if prune is not None:
        log_fields["prune"] = {"at": list(prune.at), "keep": prune.keep, "close": prune.close}
    return ChatPlan(body, adapter, heads, rule, n_sample, cap_tokens, ids, params, rid, int(time.time()), t0,
                    log_fields, Answers(rule, s.extract_budget_s), prune, conf)


def _confidence_spec(rr: RerankOptions, rule: "Rule", n: int, n_sample: int,
                     prune: PruneSpec | None) -> ConfidenceSpec | None:
    """Whether the engine computes each candidate's confidence while decoding (a training-free policy, the
    request's ``confidence`` options or ``return_candidates``), with its window; DeepConf's online stop checked."""
    co = rr.confidence
    if rule.policy not in CONFIDENCE_POLICIES and co is None and not rr.return_candidates:
        return None
    if co is not None and co.online is not None:
        if rr.adaptive:
            raise InvalidRequest("rerank.confidence.online and rerank.adaptive both sample in rounds; send one (adaptive "
                                 "N with a confidence vote stops on consensus)", param="rerank.confidence.online",
                                 code="unsupported_parameter")
        if prune is not None:
            raise InvalidRequest("rerank.confidence.online stops candidates by confidence; rerank.prune by a head: send "
                                 "one (prune: false)", param="rerank.prune", code="unsupported_parameter")
        if co.online.warmup >= n_sample:
            raise InvalidRequest(f"rerank.confidence.online.warmup ({co.online.warmup}) must be below the candidates "
                                 f"({n_sample}): the warm-up sets the threshold the others are stopped by",
                                 param="rerank.confidence.online.warmup")
    return ConfidenceSpec(window=co.window if co is not None else ConfidenceSpec().window, min_keep=n)


DEFAULT_PRUNE_AT = (16, 32, 64)  # `prune: true` on a server without ARBITER_PRUNE_AT


def _prune_spec(st: ServiceState, rr: RerankOptions, n: int, max_tokens: int) -> PruneSpec | None:
    """The request's pruning (docs/features.md "Pruning"): ``rerank.prune`` (true: the server's schedule; an object:
    its own), else the server default ARBITER_PRUNE_AT (not for adaptive requests), else none."""
    s = st.settings
    if rr.prune is False or (rr.prune is None and (s.prune_checkpoints() is None or rr.adaptive)):
        return None
    opts = rr.prune if isinstance(rr.prune, PruneOptions) else PruneOptions()
    if not st.require_engine().prunes:
        raise InvalidRequest("rerank.prune needs the partial rewards of the HF engine's decode loop "
                             f"(ARBITER_ENGINE=hf); this server runs the {type(st.engine).__name__}",
                             param="rerank.prune", code="unsupported_parameter")
    if opts.at is not None:
        at = tuple(opts.at)
    elif opts.at_fraction is not None:
        at = tuple(sorted({max(1, round(f * max_tokens)) for f in opts.at_fraction}))
    else:
        at = s.prune_checkpoints() or DEFAULT_PRUNE_AT
    return PruneSpec(at=at, keep=opts.keep if opts.keep is not None else s.prune_keep, min_keep=max(n, opts.min_keep or n),
                     close=opts.close if opts.close is not None else s.prune_close)


async def _outcome(request: Request, st: ServiceState, fut: asyncio.Future[Any],
                   cancel: threading.Event | None = None) -> Any:
    """The worker's result, with THE mapping of engine errors to API errors (a cancelled or API error passes)."""
    try:
        return await _wait(request, st, fut, cancel)
    except (APIError, asyncio.CancelledError):
        raise
    except Exception as e:
        raise _worker_error(e) from None


async def create_chat_completion(st: ServiceState, body: ChatCompletionRequest,
                                 request: Request) -> ChatCompletionResponse | StreamingResponse:
    """``POST /v1/chat/completions``: resolve the request once (``plan_chat``), run it, shape the answer."""
    plan = await plan_chat(st, body, request)
    if body.stream and not plan.reranking:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[tuple[int, str, Any] | None] = asyncio.Queue()
        # Deltas cross from the worker thread in order; the result future's callback ends them.
        def on_delta(i: int, text: str, lps: list[TokenLogprob] | None = None) -> None:
            _put_threadsafe(loop, deltas, (i, text, lps))

        job = GenerationJob(plan.ids, body.n, plan.params, adapter=plan.adapter, on_delta=on_delta)
        fut = _submit(st, st.require_worker().submit_generate, job, ())
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(deltas.put_nowait, None))
        return _stream(request, st, plan, job, fut, deltas)

    if plan.adaptive is not None:
        outcome, adaptive_info = await _adaptive(request, st, plan)
        resp = _completion(st, plan, outcome, adaptive=adaptive_info)
        plan.log_fields["adaptive"] = adaptive_info
        _account(st, "chat", outcome, plan.log_fields, plan.t0)
        return resp
    if plan.online is not None and not body.stream:
        outcome, online_info = await _online(request, st, plan)
        await _read_answers(request, st, plan, outcome)
        resp = _completion(st, plan, outcome, online=online_info)
        plan.log_fields["online"] = online_info
        _account(st, "chat", outcome, plan.log_fields, plan.t0)
        return resp

    job = GenerationJob(plan.ids, plan.n_sample, plan.params, feature_layers=feature_layers(plan.heads),
                        adapter=plan.adapter, prune=plan.prune, confidence=plan.conf)
    fut = _submit(st, st.require_worker().submit_generate, job, plan.heads)
    if body.stream:
        return _stream(request, st, plan, job, fut)
    done: GenerateOutcome = await _outcome(request, st, fut, job.cancelled)
    if plan.reranking:
        await _read_answers(request, st, plan, done)
    resp = _completion(st, plan, done)
    _account(st, "chat", done, plan.log_fields, plan.t0)
    return resp


def _budget(request: Request, rr: RerankOptions) -> tuple[int | None, int | None]:
    """(most candidates, most completion tokens): ``rerank.budget``, overridden key by key by ``X-Arbiter-Budget``
    (``tokens=1500``, ``candidates=4`` or both, comma-separated)."""
    cands = rr.budget.candidates if rr.budget else None
    tokens = rr.budget.tokens if rr.budget else None
    values = request.headers.getlist("x-arbiter-budget")
    if len(values) > 1:
        raise InvalidRequest("X-Arbiter-Budget may be given once", param="X-Arbiter-Budget")
    header = values[0] if values else None
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


async def _adaptive(request: Request, st: ServiceState, plan: ChatPlan) -> tuple[GenerateOutcome, dict[str, Any]]:
    """Sample in rounds of ``round`` candidates (continuing one seeded candidate sequence) until the leader is
    settled (selection.settled), ``plan.n_sample`` candidates were sampled, or the token budget is spent."""
    import dataclasses
    import secrets

    import torch

    from arbiter.generation.base import GenerationResult

    stop_rule = plan.adaptive
    assert stop_rule is not None  # adaptive rounds run only for adaptive rerank requests
    body, heads, n_max, cap_tokens, rule, ans = plan.body, plan.heads, plan.n_sample, plan.cap_tokens, plan.rule, plan.answers
    params = plan.params
    # One base seed for every round, so round r continues the candidate sequence instead of repeating it.
    params = dataclasses.replace(params, seed=params.seed if params.seed is not None else secrets.randbits(62))
    cands: list[Candidate] = []
    rewards: list[torch.Tensor] = []
    queue_s, run_s, rounds, stopped = 0.0, 0.0, 0, "max_candidates"
    while len(cands) < n_max:
        k = min(max(stop_rule.round, body.n - len(cands)), n_max - len(cands))
        job = GenerationJob(plan.ids, k, params, feature_layers=feature_layers(heads), first_index=len(cands),
                            adapter=plan.adapter, confidence=plan.conf)
        fut = _submit(st, st.require_worker().submit_generate, job, heads)
        out: GenerateOutcome = await _outcome(request, st, fut, job.cancelled)
        rounds += 1
        cands += out.result.candidates
        rewards.append(_rewards(out))
        queue_s += out.queue_s
        run_s += out.run_s
        r = torch.cat(rewards)
        spent = sum(len(c.token_ids) for c in cands)
        found = await ans.update(cands)  # each candidate extracted once, off the event loop
        verified = await ans.verify(request, st, plan, found) if rule.policy == "verify" else None
        if len(cands) >= body.n and settled(r, rule.policy, found, stop_rule, verified, rule.weights,
                                            [c.confidence for c in cands], rule.conf):
            stopped = "settled"
            break
        if cap_tokens is not None and spent >= cap_tokens:
            stopped = "token_budget"
            break
    if len(cands) < n_max:
        st.metrics.tokens_saved.inc((n_max - len(cands)) * spent / max(len(cands), 1))
    merged = GenerateOutcome(GenerationResult(cands, len(plan.ids)), torch.cat(rewards), queue_s, run_s, found=ans.found,
                             verified=ans.verified if rule.policy == "verify" else None)
    return merged, {"rounds": rounds, "stopped": stopped, "candidates": len(cands), "max_candidates": n_max}


def _rewards(out: GenerateOutcome) -> Any:
    """The heads' rewards [N, H] of a generation outcome; [N, 0] when the request scores with no head."""
    import torch

    return out.rewards if out.rewards is not None else torch.zeros(len(out.result.candidates), 0)


async def _online(request: Request, st: ServiceState, plan: ChatPlan) -> tuple[GenerateOutcome, dict[str, Any]]:
    """DeepConf's online stop (``rerank.confidence.online``, arXiv 2508.15260): ``warmup`` candidates in full, the
    threshold at the (1 - keep) quantile of their lowest group confidences (linear interpolation, as DeepConf's
    numpy percentile), then the other candidates of the same seeded sequence under that threshold: the engine stops
    one whose last full window falls below it (Candidate.pruned)."""
    import dataclasses
    import secrets

    import torch

    from arbiter.generation.base import GenerationResult

    online, conf = plan.online, plan.conf
    assert online is not None and conf is not None
    params = dataclasses.replace(plan.params, seed=plan.params.seed if plan.params.seed is not None else secrets.randbits(62))
    outs: list[GenerateOutcome] = []
    threshold: float | None = None
    for first, k in ((0, online.warmup), (online.warmup, plan.n_sample - online.warmup)):
        spec = conf if first == 0 else dataclasses.replace(conf, stop_below=threshold,
                                                           min_keep=max(plan.body.n - online.warmup, 0))
        job = GenerationJob(plan.ids, k, params, feature_layers=feature_layers(plan.heads), first_index=first,
                            adapter=plan.adapter, confidence=spec)
        fut = _submit(st, st.require_worker().submit_generate, job, plan.heads)
        outs.append(await _outcome(request, st, fut, job.cancelled))
        if first == 0:
            lows = [c.confidence.lowest_group for c in outs[0].result.candidates
                    if c.confidence is not None and c.confidence.tokens]
            threshold = float(torch.quantile(torch.tensor(lows, dtype=torch.float64), 1 - online.keep)) if lows else None
    cands = [c for o in outs for c in o.result.candidates]
    merged = GenerateOutcome(GenerationResult(cands, len(plan.ids)), torch.cat([_rewards(o) for o in outs]),
                             sum(o.queue_s for o in outs), sum(o.run_s for o in outs))
    stopped = [c for c in outs[1].result.candidates if c.pruned]
    kept = [len(c.token_ids) for c in cands if not c.pruned]
    if stopped and kept:  # estimated as for pruning: what a stopped candidate would have spent, on average
        st.metrics.tokens_saved.inc(sum(max(0.0, sum(kept) / len(kept) - len(c.token_ids)) for c in stopped))
    return merged, {"threshold": threshold, "warmup": online.warmup, "stopped": len(stopped),
                    "stopped_tokens": sum(len(c.token_ids) for c in stopped)}


@dataclass(frozen=True)
class Rule:
    """The selection rule of one rerank request, resolved once: the policy, the answer extractor (None for
    argmax) and where the rule came from (README "Heads carry their rule")."""

    policy: str
    extract: answers.Extractor | None
    info: RerankRule
    canonical: str | None = None  # verify: the template an answer is scored in
    weights: VerifyWeights | None = None  # verify: the group score's weights
    options: tuple[str, ...] | None = None  # verify with {option}: the options' texts, A first
    conf: ConfidenceRule | None = None  # the training-free policies: the score and knobs

    @property
    def uses_option(self) -> bool:
        return self.canonical is not None and answers.uses_option(self.canonical)


def _with_options(rule: Rule, rr: RerankOptions, messages: list[dict[str, Any]]) -> Rule:
    """A verify rule whose template renders ``{option}``, with the options' texts (``answers.options_of``: the
    request's ``choices``, else the lettered lines of the last user message); a 400 when there are none."""
    opts = answers.options_of(messages, rr.choices)
    if not opts:
        raise InvalidRequest(f"rerank.select=verify renders answers as {rule.canonical!r}, which needs the options' "
                             "texts: list them as lettered lines (A. ..., B. ...) in the last user message or send "
                             "rerank.choices", param="rerank.choices")
    return replace(rule, options=tuple(opts))


async def _read_answers(request: Request, st: ServiceState, plan: ChatPlan, outcome: GenerateOutcome) -> None:
    """Before selection: each candidate's answer (off the event loop) and, for verify, each distinct answer's
    canonical reward (one score pass through the worker)."""
    outcome.found = await plan.answers.update(outcome.result.candidates)
    if plan.rule.policy == "verify":
        outcome.verified = await plan.answers.verify(request, st, plan, outcome.found)


class Answers:
    """A rerank request's extracted answers: each candidate is extracted once (adaptive rounds add candidates),
    in a worker thread, under one time budget for the whole request (ARBITER_EXTRACT_BUDGET_S); spending it is
    a 400 naming the pattern (README "Rerank extension")."""

    def __init__(self, rule: Rule, budget_s: float):
        self.rule, self.budget_s = rule, budget_s
        self.found: list[str | None] = []
        self.spent = 0.0
        # select=verify: each distinct answer's canonical form and reward, and what scoring them cost
        self.verified: dict[str, float | None] = {}
        self.canonical: dict[str, str] = {}
        self.scored, self.verify_tokens, self.verify_s = 0, 0, 0.0

    async def update(self, cands: Sequence[Candidate]) -> list[str | None] | None:
        ex = self.rule.extract
        if ex is None:
            return None
        new = cands[len(self.found):]
        todo = [c.text for c in new if not c.pruned]  # a pruned candidate has no answer: no vote
        if new:
            t0 = time.monotonic()
            try:
                got = iter(await asyncio.to_thread(ex.many, todo, self.budget_s - self.spent) if todo else [])
                self.found += [None if c.pruned else next(got) for c in new]
            except answers.ExtractionOverrun:
                info = self.rule.info
                what = f"rerank.pattern `{info.pattern}`" if info.extractor == "regex" else f"rerank.extractor {info.extractor}"
                param = "rerank.pattern" if info.extractor == "regex" else "rerank.extractor"
                raise InvalidRequest(f"{what}: extracting the candidates' answers took more than this request's budget "
                                     f"of {self.budget_s:g} s (ARBITER_EXTRACT_BUDGET_S)",
                                     param=param, code="extraction_timeout") from None
            finally:
                self.spent += time.monotonic() - t0
        return self.found

    async def verify(self, request: Request, st: ServiceState, plan: ChatPlan,
                     found: Sequence[str | None] | None) -> dict[str, float | None]:
        """The picking head's reward of each distinct answer in ``found`` rendered in the rule's canonical form
        (README "Verifying answers"): the answers not scored yet go through one score pass (prompt + answer +
        closing token each, batched by the worker); an answer that cannot be rendered (a letter with no listed
        option) or would not fit the context gets None. Tokens and time are counted for ``usage``."""
        rule = self.rule
        assert rule.canonical is not None and found is not None
        new = [a for a in dict.fromkeys(x for x in found if x is not None) if a not in self.verified]
        if not new:
            return self.verified
        canon = {a: answers.render_canonical(rule.canonical, a, rule.options) for a in new}
        eng = st.require_engine()
        todo = [a for a in new if canon[a] is not None]
        self.canonical.update({a: c for a, c in canon.items() if c is not None})
        ids = await asyncio.to_thread(lambda: [eng.encode_answer(str(canon[a])) for a in todo])
        room = eng.context_length - len(plan.ids) - 1
        fits = [(a, t) for a, t in zip(todo, ids) if len(t) <= room]
        self.verified.update({a: None for a in new})
        if fits:
            t0 = time.monotonic()
            fut = _submit(st, st.require_worker().submit_score, plan.ids, [t for _, t in fits], plan.heads[:1],
                          plan.adapter)
            rewards = await _outcome(request, st, fut)
            self.verify_s += time.monotonic() - t0
            self.verify_tokens += len(plan.ids) + sum(len(t) + 1 for _, t in fits)  # the prompt once: its answers share it
            self.verified.update({a: float(rewards[k, 0]) for k, (a, _) in enumerate(fits)})
        self.scored += len(fits)
        return self.verified


DEFAULT_RULE = Rule("argmax", None, RerankRule(select="argmax", source="default"))


def _rule(rr: RerankOptions, heads: list[LoadedHead]) -> Rule:
    """The request's rule: ``rerank.select`` when given (source "request"), else the picking head's own rule
    (source "head"), else argmax ("default"). The extractor fields are the request's when it gives an
    extractor, else the head's. InvalidRequest naming the field when a vote policy has no usable extractor."""
    own = heads[0].config.selection if heads else None
    policy = rr.select or (own.select if own else "argmax")
    source: Literal["request", "head", "default"] = "request" if rr.select else ("head" if own else "default")
    spec: tuple[str | None, str | None, str | None, list[str] | None] = (None, None, None, None)
    if rr.extractor is not None:
        spec = (rr.extractor, rr.pattern, rr.field, rr.labels)
    elif own is not None and own.extractor is not None:
        spec = (own.extractor, own.pattern, own.field, own.labels)
    name, pattern, field, labels = spec
    conf = _confidence_rule(policy, rr, own)
    if policy in ("argmax", "confidence"):
        return Rule(policy, None, RerankRule(select=policy, source=source, score=conf.score if conf else None), conf=conf)
    canonical, weights = None, None
    if policy == "verify":
        canonical = rr.canonical or (own.canonical if own else None)
        if canonical is None:
            raise InvalidRequest(f"rerank.select=verify needs the canonical form answers are scored in: head "
                                 f"{heads[0].name!r} carries none (its selection has no canonical); send "
                                 "rerank.canonical, e.g. \"{answer}\" or \"{answer}. {option}\"",
                                 param="rerank.canonical", code="unsupported_parameter")
        try:
            answers.check_canonical(canonical, name)
        except ValueError as e:
            raise InvalidRequest(f"rerank.canonical: {e}", param="rerank.canonical") from None
        weights = VerifyWeights(own.vote_weight, own.text_weight) if own and own.select == "verify" else VerifyWeights()
    info = RerankRule(select=policy, source=source, extractor=name, pattern=pattern, field=field, labels=labels,
                      canonical=canonical, vote_weight=weights.vote if weights else None,
                      text_weight=weights.text if weights else None, score=conf.score if conf else None,
                      keep=conf.keep if conf and policy == "deepconf_vote" else None)
    if name is None:
        raise InvalidRequest(f"rerank.select={policy} needs rerank.extractor ({', '.join(answers.EXTRACTORS)})",
                             param="rerank.extractor")
    try:
        return Rule(policy, answers.extractor(name, pattern=pattern, field=field, labels=labels), info, canonical, weights,
                    conf=conf)
    except Exception as e:  # a bad pattern (regex.error) or a missing pattern / field / labels
        param = {"json_field": "rerank.field", "label_words": "rerank.labels"}.get(name, "rerank.pattern")
        raise InvalidRequest(f"rerank.extractor={name}: {e}", param=param) from None


def _confidence_rule(policy: str, rr: RerankOptions, own: Any) -> ConfidenceRule | None:
    """The training-free policies' knobs: what the request's ``confidence`` sets, else what the picking head's own
    rule of that policy carries (``selection.score`` / ``keep``, written by the verifier recipe), else the defaults."""
    if policy not in CONFIDENCE_POLICIES:
        return None
    co = rr.confidence
    given = co.model_fields_set if co is not None else set()
    head = own if own is not None and own.select == policy else None
    score = (co.score if co is not None and co.score else None) or (head.score if head else None)
    keep = co.keep if co is not None and "keep" in given else (head.keep if head and head.keep is not None else None)
    base = ConfidenceRule()
    return ConfidenceRule(score=score or ConfidenceRule.default_score(policy), keep=base.keep if keep is None else keep,
                          borda_p=co.borda_p if co is not None else base.borda_p,
                          temperature=co.temperature if co is not None else base.temperature)


def _choices(st: ServiceState, plan: ChatPlan, outcome: GenerateOutcome) -> tuple[list[Candidate], RerankInfo | None]:
    """(the candidates to return, the ``rerank`` info or None): all candidates without heads, else the selection's."""
    body, heads, rule, prune, answers_ = plan.body, plan.heads, plan.rule, plan.prune, plan.answers
    return_candidates = plan.return_candidates
    token_text = st.require_token_text()
    cands = outcome.result.candidates
    if not plan.reranking:
        return list(cands), None
    found = outcome.found if rule.extract is not None else None
    assert rule.extract is None or found is not None, "answers are extracted off the event loop before selection"
    rewards = _rewards(outcome)
    confs = [c.confidence for c in cands]
    sel = select(rewards, rule.policy, found, outcome.verified, rule.weights, confs, rule.conf)
    chosen = sel.top(body.n)
    names = [h.name for h in heads]
    scored = sum(1 for c in cands if not c.pruned)
    groups = sel.groups
    if groups is not None and rule.policy == "verify":  # what each answer was scored as; an unverifiable one: null
        groups = [{**g, "canonical": answers_.canonical.get(g["answer"]),
                   "score": g["score"] if g["canonical_reward"] is not None else None} for g in groups]
    info = RerankInfo(heads=names, candidates_scored=scored, policy=sel.policy, rule=rule.info, chosen=chosen,
                      rewards=[float(rewards[i, 0]) for i in chosen] if heads else [], groups=groups)
    if rule.conf is not None:
        info.confidence = ConfidenceInfo(score=rule.conf.score, chosen=[
            confs[i].score(rule.conf.score) if confs[i] is not None else float("-inf") for i in chosen])
    if rule.policy == "verify":
        info.verify = VerifyInfo(answers_scored=answers_.scored, tokens=answers_.verify_tokens,
                                 seconds=round(answers_.verify_s, 4))
    if prune is not None:
        info.prune = _prune_info(cands, prune)
    if return_candidates:
        info.candidates = [
            RerankCandidate(index=i, text=c.text, finish_reason=c.finish_reason,
                            rewards={} if c.pruned else
                            {n: float(rewards[i, k]) for k, n in enumerate(names)},
                            completion_tokens=len(c.token_ids),
                            partial_rewards=None if c.partial_rewards is None else
                            [PartialReward(tokens=t, reward=r) for t, r in c.partial_rewards],
                            pruned_at=c.pruned_at,
                            confidence=_confidence_dict(c.confidence),
                            logprobs=token_text.logprobs(c.logprobs) if c.logprobs is not None else None)
            for i, c in enumerate(cands)
        ]
    return [cands[i] for i in chosen], info


def _confidence_dict(conf: Any) -> dict[str, float | int | None] | None:
    """A candidate's confidence as the API returns it: a score that is not a number (an answer of no tokens) is null."""
    if conf is None:
        return None
    return {k: v if isinstance(v, int) or math.isfinite(v) else None for k, v in conf.as_dict().items()}


def _prune_info(cands: Sequence[Candidate], prune: PruneSpec) -> PruneInfo:
    """What pruning did, read off the candidates: each checkpoint reached (the candidates alive there record a
    partial reward at it) and those it dropped; tokens the pruned ones spent, and an estimate of those saved."""
    checkpoints = []
    for t in prune.at:
        live = sum(1 for c in cands if any(tt == t for tt, _ in c.partial_rewards or ()))
        if live:
            checkpoints.append(PruneCheckpoint(tokens=t, live=live,
                                               pruned=[i for i, c in enumerate(cands) if c.pruned_at == t]))
    pruned = [c for c in cands if c.pruned]
    kept = [len(c.token_ids) for c in cands if not c.pruned]
    mean_kept = sum(kept) / len(kept) if kept else 0.0
    return PruneInfo(at=list(prune.at), keep=prune.keep, min_keep=prune.min_keep, checkpoints=checkpoints,
                     pruned=len(pruned), pruned_tokens=sum(len(c.token_ids) for c in pruned),
                     tokens_saved_estimate=round(sum(max(0.0, mean_kept - len(c.token_ids)) for c in pruned)))


def _usage(outcome: GenerateOutcome, plan: ChatPlan | None = None) -> Usage:
    # completion_tokens counts every candidate generated (that is the work done), not only the returned ones.
    c = outcome.result.completion_tokens
    p = outcome.result.prompt_tokens
    verify = plan.answers.verify_tokens if plan is not None and plan.rule.policy == "verify" else None
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c, verify_tokens=verify)


def _completion(st: ServiceState, plan: ChatPlan, outcome: GenerateOutcome, adaptive: dict[str, Any] | None = None,
                online: dict[str, Any] | None = None) -> ChatCompletionResponse:
    picked, info = _choices(st, plan, outcome)
    if info is not None and adaptive is not None:
        info.adaptive = AdaptiveInfo(**adaptive)
    if info is not None and online is not None:
        if info.confidence is None:
            info.confidence = ConfidenceInfo(score="lowest_group", chosen=[])
        info.confidence = info.confidence.model_copy(update=online)
    return ChatCompletionResponse(
        id=plan.rid, created=plan.created, model=_served_id(st, plan.body.model), system_fingerprint=st.system_fingerprint,
        choices=[Choice(index=i, message=ChatMessageOut(content=c.text), finish_reason=c.finish_reason,
                        logprobs=st.require_token_text().logprobs(c.logprobs)) for i, c in enumerate(picked)],
        usage=_usage(outcome, plan), rerank=info)


def _account(st: ServiceState, endpoint: str, outcome: GenerateOutcome | None, fields: dict[str, Any], t0: float) -> None:
    if outcome is not None:
        st.metrics.tokens_generated.inc(outcome.result.completion_tokens)
        st.metrics.prompt_tokens.inc(outcome.result.prompt_tokens)
        fields.update(completion_tokens=outcome.result.completion_tokens, queue_s=round(outcome.queue_s, 4),
                      run_s=round(outcome.run_s, 4))
    fields["latency_s"] = round(time.monotonic() - t0, 4)
    access_log.info(json.dumps({"endpoint": endpoint, **fields}, default=str))


# --- streaming ------------------------------------------------------------------------------------------


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


def _error_event(e: Exception) -> str:
    err = e if isinstance(e, APIError) else _worker_error(e)
    return _sse(json.dumps(err.body(), separators=(",", ":")))


def _stream(request: Request, st: ServiceState, plan: ChatPlan, job: GenerationJob, fut: asyncio.Future[Any],
            deltas: asyncio.Queue[tuple[int, str, Any] | None] | None = None) -> StreamingResponse:
    """The one SSE generator: a role chunk; the content (``deltas`` as the worker produces them, or, with
    heads, the chosen candidate(s) once scored); finish reasons (with the ``rerank`` info); usage when
    ``stream_options.include_usage``; ``[DONE]``. A failure after the stream started is an error event; a
    client that goes away cancels the job."""
    body = plan.body
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None, rerank: RerankInfo | None = None) -> str:
        c = ChatCompletionChunk(id=plan.rid, created=plan.created, model=_served_id(st, body.model),
                                system_fingerprint=st.system_fingerprint, choices=choices, usage=usage, rerank=rerank)
        return _sse(c.model_dump_json(exclude=None if include_usage else {"usage"}))

    def content(i: int, text: str, lps: list[TokenLogprob] | None) -> ChunkChoice:
        return ChunkChoice(index=i, delta=ChunkDelta(content=text),
                           logprobs=st.require_token_text().logprobs(lps or []) if body.logprobs else None)

    async def events() -> AsyncIterator[str]:
        deadline = time.monotonic() + st.settings.request_timeout_s
        try:
            yield chunk([ChunkChoice(index=i, delta=ChunkDelta(role="assistant", content="")) for i in range(body.n)])
            while deltas is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout(f"the request did not finish within {st.settings.request_timeout_s:g} s", code="timeout")
                try:
                    item = await asyncio.wait_for(deltas.get(), timeout=remaining)
                except asyncio.TimeoutError:
                    continue
                if item is None:
                    break
                yield chunk([content(*item)])
            try:
                outcome: GenerateOutcome = await _wait(request, st, fut, job.cancelled)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                yield _error_event(e)
                yield "data: [DONE]\n\n"
                return
            if plan.reranking:
                try:
                    await _read_answers(request, st, plan, outcome)
                except APIError as e:
                    yield _error_event(e)
                    yield "data: [DONE]\n\n"
                    return
            picked, info = _choices(st, plan, outcome)
            if plan.reranking:
                for i, c in enumerate(picked):
                    yield chunk([content(i, c.text, c.logprobs)])
            yield chunk([ChunkChoice(index=i, delta=ChunkDelta(), finish_reason=c.finish_reason)
                         for i, c in enumerate(picked)], rerank=info)
            if include_usage:
                yield chunk([], usage=_usage(outcome, plan))
            yield "data: [DONE]\n\n"
            _account(st, "chat_stream", outcome, plan.log_fields, plan.t0)
        except Timeout as e:
            job.cancelled.set()
            yield _error_event(e)
            yield "data: [DONE]\n\n"
        finally:
            if not fut.done():  # the client went away (the generator was closed): free the rows
                job.cancelled.set()
                fut.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# --- legacy completions -------------------------------------------------------------------------------------


async def create_completion(st: ServiceState, body: CompletionRequest, request: Request) -> CompletionResponse:
    """``POST /v1/completions`` (README "Legacy completions"): each prompt as raw text or token ids (no chat
    template), ``n`` choices per prompt (choice index = prompt x n + j, as OpenAI orders them); ``best_of`` samples
    that many and returns the ``n`` with the highest mean log-prob per token (OpenAI's definition, from the
    confidences the engine computes while decoding); ``echo`` puts the prompt (and its log-probs, from one
    teacher-forced forward) before the completion; ``max_tokens: 0`` with ``echo`` only scores the prompt."""
    import torch

    s = st.settings
    t0 = time.monotonic()
    adapter = _check_model(st, body.model)
    eng = st.require_engine()
    if body.n > s.max_n:
        raise InvalidRequest(f"n must be at most {s.max_n}", param="n")
    rr = body.rerank
    heads: list[LoadedHead] = []
    if rr is not None:  # Arbiter's extension: a head ranks the candidates (argmax) instead of mean log-prob
        heads = _resolve_heads(st, rr.heads or ([rr.head] if rr.head else None), "rerank.heads")
        _check_head_adapters(st, heads, adapter, "rerank.heads")
        n_sample = rr.candidates or body.best_of or max(min(s.default_candidates, s.max_candidates), body.n)
    else:
        n_sample = body.best_of or body.n
    if n_sample > s.max_candidates:
        raise InvalidRequest(f"best_of must be at most {s.max_candidates}", param="best_of" if rr is None else "rerank.candidates")
    if body.max_tokens > s.max_tokens_limit:
        raise InvalidRequest(f"max_tokens must be at most {s.max_tokens_limit}", param="max_tokens")
    if len(body.stop or []) > s.max_stop or any(len(x) > s.max_stop_length for x in body.stop or []):
        raise InvalidRequest(f"at most {s.max_stop} stop strings of at most {s.max_stop_length} characters", param="stop")
    raw = body.prompts()
    if not raw or len(raw) > s.max_messages:
        raise InvalidRequest(f"prompt: give 1 to {s.max_messages} prompts", param="prompt")

    def tokenize() -> list[list[int]]:
        out = []
        for i, p in enumerate(raw):
            ids = list(eng.tokenizer(p, add_special_tokens=True)["input_ids"]) if isinstance(p, str) else list(p)
            if not ids or any(not 0 <= t < st.vocab_size for t in ids):
                raise InvalidRequest(f"prompt {i}: empty, or a token id outside [0, {st.vocab_size})", param="prompt")
            if len(ids) + body.max_tokens + 1 > eng.context_length:
                raise InvalidRequest(f"prompt {i}: this model's context is {eng.context_length} tokens; the prompt takes "
                                     f"{len(ids)} and max_tokens asks {body.max_tokens} more", param="prompt",
                                     code="context_length_exceeded")
            out.append(ids)
        return out

    prompts = await asyncio.to_thread(tokenize)
    params = SamplingParams(max_tokens=max(body.max_tokens, 1), temperature=body.temperature, top_p=body.top_p,
                            stop=tuple(body.stop or ()), seed=body.seed, logit_bias=_logit_bias(st, body.logit_bias),
                            frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                            logprobs=body.logprobs, include_stop=body.include_stop_str_in_output)
    picking = n_sample > body.n and rr is None
    worker = st.require_worker()
    reranked: list[CompletionRerank] = []
    choices: list[CompletionChoice] = []
    completion_tokens = 0
    text = st.require_token_text()
    for pi, ids in enumerate(prompts):
        if body.max_tokens > 0:
            job = GenerationJob(ids, n_sample, params, adapter=adapter, feature_layers=feature_layers(heads),
                                confidence=ConfidenceSpec(min_keep=body.n) if picking else None)
            done: GenerateOutcome = await _outcome(request, st, _submit(st, worker.submit_generate, job, tuple(heads)),
                                                   job.cancelled)
            cands = done.result.candidates
            completion_tokens += done.result.completion_tokens
            if rr is not None:  # the first head's reward, highest first (ties: the lower index)
                scores = _rewards(done)  # [N, H], scored by the worker as for a chat rerank
                order = sorted(range(len(cands)), key=lambda i: (-float(scores[i, 0]), i))[: body.n]
                reranked.append(CompletionRerank(
                    prompt_index=pi, heads=[h.name for h in heads], candidates_scored=len(cands), chosen=order,
                    rewards=[{h.name: float(scores[i, k]) for k, h in enumerate(heads)} for i in range(len(cands))],
                    texts=[c.text for c in cands] if rr.return_candidates else None))
                st.metrics.candidates_scored.inc(len(cands))
                cands = [cands[i] for i in order]
            elif picking:  # OpenAI's best_of: the highest mean log-prob per token
                order = select(torch.zeros(len(cands), 0), "confidence", confidence=[c.confidence for c in cands],
                               rule=ConfidenceRule("mean_logprob")).order
                cands = [cands[i] for i in order[: body.n]]
        else:
            cands = [Candidate([], "", "length") for _ in range(body.n)]
        echo: list[Any] = []
        if body.echo and body.logprobs is not None:
            echo = await _outcome(request, st, _submit(st, worker.submit_prompt_logprobs, ids, body.logprobs, adapter))
        prompt_text = eng.tokenizer.decode(ids, skip_special_tokens=False) if body.echo else ""
        for j, c in enumerate(cands):
            lp = None
            if body.logprobs is not None:
                entries = [(tid, e) for tid, e in zip(ids, echo)] if body.echo else []
                entries += [(e.token_id, e) for e in (c.logprobs or [])]
                lp = _legacy_logprobs(text, entries)
            finish = "length" if c.finish_reason == "length" else "stop"
            choices.append(CompletionChoice(text=prompt_text + c.text, index=pi * body.n + j, logprobs=lp,
                                            finish_reason=finish))
    p_tokens = sum(len(x) for x in prompts)
    resp = CompletionResponse(id=f"cmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()),
                              model=_served_id(st, body.model), choices=choices, system_fingerprint=st.system_fingerprint,
                              usage=Usage(prompt_tokens=p_tokens, completion_tokens=completion_tokens,
                                          total_tokens=p_tokens + completion_tokens),
                              rerank=reranked if rr is not None else None)
    st.metrics.tokens_generated.inc(completion_tokens)
    st.metrics.prompt_tokens.inc(p_tokens)
    _account(st, "completions", None, {"id": resp.id, "prompts": len(prompts), "n": body.n, "best_of": n_sample,
                                       "echo": body.echo, "prompt_tokens": p_tokens,
                                       "completion_tokens": completion_tokens}, t0)
    return resp


def _legacy_logprobs(text: Any, entries: list[tuple[int, TokenLogprob | None]]) -> CompletionLogprobs:
    """OpenAI's legacy ``logprobs`` object: each token's text, log-prob (None for the prompt's first token: nothing
    predicts it), its top alternatives as token -> log-prob, and its character offset in the returned text."""
    tokens, lps, tops, offsets = [], [], [], []
    at = 0
    for tid, e in entries:
        piece = text.piece(tid)[0]
        tokens.append(piece)
        offsets.append(at)
        at += len(piece)
        lps.append(None if e is None else e.logprob)
        tops.append(None if e is None else {text.piece(t)[0]: v for t, v in e.top})
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)


# --- score ----------------------------------------------------------------------------------------------


async def score_candidates(st: ServiceState, body: ScoreRequest, request: Request) -> ScoreResponse:
    """``POST /v1/score``: every candidate answer's reward under the requested heads."""
    t0 = time.monotonic()
    adapter = _check_model(st, body.model)
    if len(body.candidates) > st.settings.max_score_candidates:
        raise InvalidRequest(f"at most {st.settings.max_score_candidates} candidates are allowed", param="candidates")
    heads = _resolve_heads(st, body.heads, "heads")
    _check_head_adapters(st, heads, adapter, "heads")
    messages = _messages(st, body.messages)
    eng = st.require_engine()

    def encode() -> tuple[list[int], list[list[int]]]:  # off the event loop, as in chat_completions
        answers = [eng.encode_answer(c) for c in body.candidates]
        return _encode_prompt(st, messages, max(len(a) for a in answers) + 1), answers

    ids, answers = await asyncio.to_thread(encode)
    fut = _submit(st, st.require_worker().submit_score, ids, answers, heads, adapter)
    rewards = await _outcome(request, st, fut)
    names = [h.name for h in heads]
    best = select(rewards, "argmax").order[0]  # the selection policies' argmax (arbiter/selection.py)
    total = len(ids) * len(answers) + sum(len(a) + 1 for a in answers)
    _account(st, "score", None, {"candidates": len(answers), "heads": names}, t0)
    return ScoreResponse(
        model=_served_id(st, body.model), heads=names,
        data=[ScoreItem(index=i, rewards={n: float(rewards[i, k]) for k, n in enumerate(names)}) for i in range(len(answers))],
        best=best, usage=ScoreUsage(prompt_tokens=total, total_tokens=total))


# --- vLLM's tokenizer endpoints (/tokenize, /detokenize, /tokenizer_info) ------------------------------------------


async def tokenize(st: ServiceState, body: TokenizeRequest) -> TokenizeResponse:
    """vLLM's ``POST /tokenize``: what eval harnesses (lm-eval's remote tokenizer) use to count and split tokens
    exactly as this server does. A prompt: the tokenizer's own encoding (special tokens added by default, as the
    completions route adds them); messages: the chat route's encoding (``arbiter.chat``)."""
    eng = st.require_engine()
    if body.model is not None:
        _check_model(st, body.model)

    def run() -> list[int]:
        if body.prompt is not None:
            add = True if body.add_special_tokens is None else body.add_special_tokens
            return list(eng.tokenizer(body.prompt, add_special_tokens=add)["input_ids"])
        assert body.messages is not None
        messages = _messages(st, body.messages)
        if body.continue_final_message:
            if messages[-1]["role"] != "assistant":
                raise InvalidRequest("continue_final_message needs the last message to be the assistant's",
                                     param="continue_final_message")
            return _encode_continuation(st, messages, 0)
        if not body.add_generation_prompt:
            from arbiter.chat import prompt_ids

            return prompt_ids(eng.tokenizer, messages, add_generation_prompt=False)
        return _encode_prompt(st, messages, 0)

    ids = await asyncio.to_thread(run)
    strs = [str(t) for t in eng.tokenizer.convert_ids_to_tokens(ids)] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=eng.context_length, tokens=ids, token_strs=strs)


async def detokenize(st: ServiceState, body: DetokenizeRequest) -> DetokenizeResponse:
    """vLLM's ``POST /detokenize``: token ids to text (special tokens kept, as vLLM decodes them)."""
    eng = st.require_engine()
    if body.model is not None:
        _check_model(st, body.model)
    bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < st.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"tokens.{bad}: {body.tokens[bad]} is outside this model's vocabulary [0, {st.vocab_size})",
                             param=f"tokens.{bad}")
    text = await asyncio.to_thread(eng.tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=str(text))


def tokenizer_info(st: ServiceState) -> dict[str, Any]:
    """vLLM's ``GET /tokenizer_info``: the tokenizer's class, special tokens, context length and chat template
    (lm-eval's remote tokenizer reads ``eos_token`` and the template from it)."""
    tok = st.require_engine().tokenizer

    def text(v: Any) -> str | None:
        return None if v is None else str(getattr(v, "content", v))

    return {"tokenizer_class": type(tok).__name__, "eos_token": text(getattr(tok, "eos_token", None)),
            "bos_token": text(getattr(tok, "bos_token", None)), "pad_token": text(getattr(tok, "pad_token", None)),
            "unk_token": text(getattr(tok, "unk_token", None)), "chat_template": getattr(tok, "chat_template", None),
            "model_max_length": st.require_engine().context_length, "model": st.model_id}
