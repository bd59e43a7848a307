"""OpenAI's Responses API (``POST /v1/responses``) for what this server does: text in, text out, with the ``rerank``
extension. A request becomes one chat completion (``instructions`` as a system message, the ``input`` string or
message items as the conversation) served by ``serving.create_chat_completion``; its answer becomes a Response
object, or with ``stream: true`` the API's typed events (``response.created`` ... ``response.output_text.delta`` ...
``response.completed``). Nothing is stored: ``previous_response_id`` and ``conversation`` are refused with a 400."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from arbiter.structured import FormatError, StructuredOutput

from .errors import InvalidRequest
from .protocol import ANSWER_CHANGING_EXTRAS, ChatCompletionRequest, RerankOptions, _unsupported, refusal
from .state import ServiceState

# Accepted no-ops: they change neither what the answer is nor its shape here (as for chat completions).
_NO_OPS = ("metadata", "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier",
           "parallel_tool_calls", "store", "include", "truncation", "background", "max_tool_calls", "stream_options")


class ResponsesRequest(BaseModel):
    """``POST /v1/responses`` (OpenAI's ``CreateResponse``), the parts this server serves."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] = Field(description="A string (one user message) or a list of message items")
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    stream: bool = False
    previous_response_id: str | None = None
    conversation: Any = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    rerank: RerankOptions | None = None

    @field_validator("temperature", "top_p", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, v: Any, info: ValidationInfo) -> Any:
        return cls.model_fields[str(info.field_name)].default if v is None else v

    @model_validator(mode="after")
    def _served(self) -> ResponsesRequest:
        if self.previous_response_id is not None:
            raise refusal("previous_response_id", "this server stores no responses: send the whole conversation as "
                                                  "`input` message items instead of previous_response_id")
        if self.conversation is not None:
            raise refusal("conversation", "this server stores no conversations: send the messages as `input`")
        try:  # json_object / json_schema: constrained decoding, as response_format on chat (arbiter.structured)
            StructuredOutput.of(self.format, param="text.format")
        except FormatError as e:
            raise refusal(e.param, str(e)) from None
        tc = self.tool_choice
        if tc is not None and not (isinstance(tc, str) and tc in ("none", "auto")):
            raise _unsupported("tool_choice", "forcing a tool call (this model never emits tool calls)")
        if self.top_logprobs:
            raise _unsupported("top_logprobs", "log-probs on the Responses API (use /v1/chat/completions)")
        for name, value in (self.model_extra or {}).items():
            if name in ANSWER_CHANGING_EXTRAS and value not in ANSWER_CHANGING_EXTRAS[name]:
                raise _unsupported(name, f"{name}={str(value)[:40]!r}")
        if not self.messages() or all(m["role"] == "system" for m in self.messages()):
            raise refusal("input", "input must hold at least one message")
        return self

    @property
    def format(self) -> dict[str, Any]:
        """``text.format`` (default ``{"type": "text"}``)."""
        fmt = (self.text or {}).get("format")
        return fmt if isinstance(fmt, dict) else {"type": "text"}

    def response_format(self) -> dict[str, Any] | None:
        """``text.format`` in chat completions' ``response_format`` shape (the schema nested under json_schema)."""
        fmt = self.format
        if fmt.get("type") != "json_schema":
            return None if fmt.get("type") == "text" else {"type": fmt["type"]}
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict", "description")
                                                       if k in fmt}}

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as chat messages: ``instructions`` first (a system message), then the input."""
        out: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*out, {"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            kind = item.get("type", "message")
            if kind != "message" or item.get("role") not in ("user", "assistant", "system", "developer"):
                raise _unsupported(f"input.{i}", f"an input item of type {str(kind)[:40]!r} (message items only)")
            content = item.get("content")
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                        shown = part.get("type") if isinstance(part, dict) else type(part).__name__
                        raise _unsupported(f"input.{i}.content.{j}", f"a content part of type {str(shown)[:40]!r} "
                                                                     "(this model reads text only)")
                    parts.append(str(part.get("text", "")))
                content = "".join(parts)
            if not isinstance(content, str):
                raise refusal(f"input.{i}.content", "a message's content must be a string or a list of text parts")
            out.append({"role": item["role"], "content": content})
        return out


def _chat_body(body: ResponsesRequest, stream: bool) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({
        "model": body.model, "messages": body.messages(), "temperature": body.temperature, "top_p": body.top_p,
        "max_completion_tokens": body.max_output_tokens, "stream": stream, "response_format": body.response_format(),
        **({"stream_options": {"include_usage": True}} if stream else {}),
        **({"rerank": body.rerank.model_dump(exclude_none=True)} if body.rerank is not None else {})})


def _response(body: ResponsesRequest, rid: str, created: int, model: str, text: str, finish: str | None,
              usage: dict[str, Any] | None, rerank: Any, status: Literal["completed", "in_progress"]) -> dict[str, Any]:
    """A Response object (OpenAI's ``Response`` schema) holding one assistant message."""
    done = status == "completed"
    incomplete = done and finish == "length"
    out: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": created, "status": "incomplete" if incomplete else status,
        "completed_at": int(time.time()) if done else None, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": model,
        "output": [{"type": "message", "id": f"msg_{rid[5:]}", "status": "incomplete" if incomplete else "completed",
                    "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": [],
                                                      "logprobs": []}]}] if done else [],
        "parallel_tool_calls": True, "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
        "service_tier": "default", "store": False, "temperature": body.temperature, "top_p": body.top_p,
        "text": {"format": body.format}, "tool_choice": "auto", "tools": [], "truncation": "disabled",
        "metadata": (body.model_extra or {}).get("metadata") or {},
        "usage": None if usage is None else {
            "input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]},
    }
    if out["usage"] is None:
        del out["usage"]  # optional, not nullable: absent until the answer is done
    if rerank is not None:
        out["rerank"] = rerank  # Arbiter's extension, as on chat completions
    return out


async def create_response(st: ServiceState, body: ResponsesRequest, request: Request) -> dict[str, Any] | StreamingResponse:
    from . import serving

    rid = f"resp_{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.format.get("type", "text") != "text" and not st.require_engine().structured:
        raise InvalidRequest(f"text.format {body.format['type']} needs constrained decoding, which the "
                             f"{type(st.engine).__name__} does not do (the HF and vLLM engines do)",
                             param="text.format", code="unsupported_parameter")
    chat = _chat_body(body, body.stream)
    got = await serving.create_chat_completion(st, chat, request)
    if not body.stream:
        assert not isinstance(got, StreamingResponse)
        c = got.choices[0]
        out = got.model_dump(mode="json")
        return _response(body, rid, created, got.model, c.message.content or "", c.finish_reason, out["usage"],
                         out.get("rerank"), "completed")
    assert isinstance(got, StreamingResponse)
    return StreamingResponse(_events(body, rid, created, got), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _events(body: ResponsesRequest, rid: str, created: int, chat: StreamingResponse) -> AsyncIterator[str]:
    """The chat stream's chunks as the Responses API's typed events, numbered by ``sequence_number``."""
    seq = 0
    model = body.model
    msg = f"msg_{rid[5:]}"

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        seq += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq - 1, **fields})}\n\n"

    text, finish, usage, rerank, started = "", None, None, None, False
    async for raw in chat.body_iterator:
        line = raw if isinstance(raw, str) else bytes(raw).decode()
        for part in line.split("\n"):
            if not part.startswith("data: ") or part == "data: [DONE]":
                continue
            chunk = json.loads(part[len("data: "):])
            if "error" in chunk:  # the chat stream's error event: the Responses API's own
                yield event("error", code=chunk["error"].get("code"), message=chunk["error"].get("message"),
                            param=chunk["error"].get("param"))
                return
            model = chunk.get("model", model)
            if not started:
                started = True
                shell = _response(body, rid, created, model, "", None, None, None, "in_progress")
                yield event("response.created", response=shell)
                yield event("response.in_progress", response=shell)
                yield event("response.output_item.added", output_index=0, item={
                    "type": "message", "id": msg, "status": "in_progress", "role": "assistant", "content": []})
                yield event("response.content_part.added", item_id=msg, output_index=0, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            for ch in chunk.get("choices", []):
                if ch.get("index", 0) != 0:
                    continue
                delta = (ch.get("delta") or {}).get("content")
                if delta:
                    text += delta
                    yield event("response.output_text.delta", item_id=msg, output_index=0, content_index=0,
                                delta=delta, logprobs=[])
                if ch.get("finish_reason"):
                    finish = ch["finish_reason"]
            usage = chunk.get("usage") or usage
            rerank = chunk.get("rerank") or rerank
    final = _response(body, rid, created, model, text, finish, usage, rerank, "completed")
    item = final["output"][0]
    yield event("response.output_text.done", item_id=msg, output_index=0, content_index=0, text=text, logprobs=[])
    yield event("response.content_part.done", item_id=msg, output_index=0, content_index=0, part=item["content"][0])
    yield event("response.output_item.done", output_index=0, item=item)
    yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)
