"""Wire types: OpenAI's chat-completions shapes plus Arbiter's extensions (grouped and commented).

Requests accept unknown OpenAI fields (``extra="allow"``): they are ignored and logged, never rejected,
so newer clients keep working. Limits that depend on settings (n, max_tokens, ...) are checked in
``routes`` where the settings are known; these models check types and value ranges only.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator


def _valid_unicode(v: str) -> str:
    # JSON may carry lone UTF-16 surrogates ("\ud800"); Python keeps them, but the tokenizer cannot encode
    # them and would fail deep inside a request. Refuse them here, as a 400 naming the field.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone UTF-16 surrogate)") from None
    return v


# Text that reaches the tokenizer.
Text = Annotated[str, AfterValidator(_valid_unicode)]


# --- requests --------------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... are accepted and ignored
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class RerankOptions(BaseModel):
    """Arbiter's extension, passed by the openai client in ``extra_body={"rerank": {...}}``.

    ``candidates`` N are sampled in one batch and scored by the heads; the best ``n`` (OpenAI's meaning:
    choices returned) come back. The first head named picks; every head scores every candidate.
    """

    model_config = ConfigDict(extra="forbid")
    candidates: int | None = Field(None, ge=1, description="N candidates to sample (default: ARBITER_DEFAULT_CANDIDATES, at least n)")
    heads: list[str] | None = Field(None, min_length=1, description="Heads to score with; the first picks")
    head: str | None = Field(None, description="Shorthand for heads=[head]")
    return_candidates: bool = Field(False, description="Return every candidate with its rewards in `rerank`")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    rerank: RerankOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    def extra_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class ScoreRequest(BaseModel):
    """``POST /v1/score``: rewards for given answers to one conversation (no generation)."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    candidates: list[Text] = Field(min_length=1)
    heads: list[str] | None = Field(None, min_length=1)


class LoadHeadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=512, description="Directory relative to ARBITER_HEADS_DIR")
    # The same rule as a head config's name: it must be usable as one URL path segment (PUT/DELETE /v1/admin/heads/{name}).
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SwapHeadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=512)


# --- responses (built as dicts in routes; documented here) -------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RerankCandidate(BaseModel):
    index: int
    text: str
    finish_reason: str
    rewards: dict[str, float]
    completion_tokens: int


class RerankInfo(BaseModel):
    """The extra ``rerank`` field of a response: which heads scored, which candidates were chosen."""

    heads: list[str]
    candidates_scored: int
    chosen: list[int]
    rewards: list[float] = Field(description="Reward of each returned choice under the picking head")
    candidates: list[RerankCandidate] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    rerank: RerankInfo | None = None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (the ``data:`` payload); ``[DONE]`` ends the stream,
    and a failure after the stream started arrives as an ``ErrorResponse`` payload."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None
    rerank: RerankInfo | None = None


class ScoreItem(BaseModel):
    index: int
    rewards: dict[str, float]


class ScoreResponse(BaseModel):
    object: Literal["score.list"] = "score.list"
    model: str
    heads: list[str]
    data: list[ScoreItem]
    best: int
    usage: dict[str, int]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HeadCard(BaseModel):
    """A loaded head as ``/v1/heads`` and the admin endpoints describe it."""

    id: str
    object: Literal["head"] = "head"
    pooler: str
    layer: int
    backbone: str
    path: str
    metrics: dict[str, Any]


class HeadList(BaseModel):
    object: Literal["list"] = "list"
    data: list[HeadCard]
    default: str | None


class HeadDeleted(BaseModel):
    id: str
    object: Literal["head"] = "head"
    deleted: bool


class HealthStatus(BaseModel):
    """``/health``: 200 with model, heads and queue depth when ready; 503 with ``status`` and ``error`` otherwise."""

    status: Literal["ok", "loading", "unavailable"]
    model: str | None = None
    heads: list[str] | None = None
    queue_depth: int | None = None
    error: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# Models only the OpenAPI document references (no route returns them as a body): app.py adds their schemas.
DOC_ONLY_MODELS = (ChatCompletionChunk,)
