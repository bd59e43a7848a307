"""Wire types: OpenAI's chat-completions shapes plus Arbiter's extensions (grouped and commented).

Requests accept unknown OpenAI fields (``extra="allow"``): they are ignored and logged, never rejected,
so newer clients keep working. Limits that depend on settings (n, max_tokens, ...) are checked in
``serving.plan_chat`` where the settings are known; these models check types, value ranges and the rules
between fields that hold whatever the settings (a refusal keeps its OpenAI ``param`` and ``code``: :func:`refusal`).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from arbiter.confidence import ScoreName
from arbiter.generation.base import SamplingParams, checkpoints_valid
from arbiter.heads.config import NAME_PATTERN, PolicyName
from arbiter.structured import FormatError, StructuredOutput

REFUSAL = "arbiter_refusal"  # the pydantic error type of a cross-field rule; app.py answers it with its param and code


def refusal(param: str, message: str, code: str = "invalid_value") -> PydanticCustomError:
    """A validation error that keeps OpenAI's error fields: 400 with this ``param`` and ``code`` and the message
    as written (the app's validation handler reads them from the error's context)."""
    return PydanticCustomError(REFUSAL, "{message}", {"message": message, "param": param, "code": code})


def _unsupported(param: str, what: str) -> PydanticCustomError:
    return refusal(param, f"{param}: {what} is not supported by this server", "unsupported_parameter")


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


class ContentPart(BaseModel):
    """One part of a message's content. Text and refusal parts are read; other types (image_url,
    input_audio, file) are well-formed OpenAI parts that a text model cannot take: the route answers 400
    ``unsupported_parameter`` naming the part."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(min_length=1)
    text: Text | None = None
    refusal: Text | None = None

    @model_validator(mode="after")
    def _has_its_field(self) -> ContentPart:
        if self.type in ("text", "refusal") and getattr(self, self.type) is None:
            raise ValueError(f"a {self.type!r} content part needs a {self.type!r} string")
        return self


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Text
    arguments: Text = ""


class CustomCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Text
    input: Text = ""


class ToolCall(BaseModel):
    """An assistant turn's tool call, as a client sends it back in the next request."""

    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: Literal["function", "custom"] = "function"
    function: FunctionCall | None = None
    custom: CustomCall | None = None

    @model_validator(mode="after")
    def _has_its_body(self) -> ToolCall:
        if getattr(self, self.type) is None:
            raise ValueError(f"a {self.type!r} tool call needs a {self.type!r} object")
        return self


class ChatMessage(BaseModel):
    """Every message form of OpenAI's spec: system, developer, user, assistant (text, refusal, tool calls,
    the deprecated function_call), tool and the deprecated function results. How each is rendered through
    the model's chat template: ``arbiter.chat``."""

    model_config = ConfigDict(extra="allow")  # audio, ... are accepted and ignored
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[ContentPart] | None = None
    name: str | None = None
    refusal: Text | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join((p.text if p.type == "text" else p.refusal) or "" for p in self.content)

    def unsupported_part(self) -> int | None:
        """Index of the first content part that is neither text nor refusal (None when all are)."""
        if isinstance(self.content, list):
            for i, p in enumerate(self.content):
                if p.type not in ("text", "refusal"):
                    return i
        return None

    def encoder_dict(self) -> dict[str, Any]:
        """The message as ``arbiter.chat`` takes it (plain JSON types)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        for key in ("name", "refusal", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        if self.function_call is not None:
            out["function_call"] = self.function_call.model_dump()
        return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = False


class AdaptiveOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    round: int = Field(2, ge=1, description="Candidates sampled per round")
    margin: float = Field(1.0, ge=0.0, description="argmax: stop once the best reward beats the runner-up by more")
    supermajority: float = Field(0.75, gt=0.5, le=1.0,
                                 description="Vote policies: stop once the leading answer holds this share of the weight")


class OnlineStopOptions(BaseModel):
    """DeepConf's online stop (arXiv 2508.15260): ``warmup`` candidates are sampled in full first; the threshold is
    the (1 - ``keep``) quantile of their lowest group confidences; every later candidate stops (as pruned: no
    answer, no vote) once the mean confidence of its last full window falls below it."""

    model_config = ConfigDict(extra="forbid")
    warmup: int = Field(4, ge=1, description="Candidates sampled in full to set the threshold (DeepConf: 16)")
    keep: float = Field(0.9, gt=0.0, le=1.0, description="Share of warm-up-like candidates the threshold lets "
                                                         "through (DeepConf-high 0.9, DeepConf-low 0.1)")


class ConfidenceOptions(BaseModel):
    """The model's own confidence in each candidate (README "Training-free selection"): the score the
    training-free policies rank by and their knobs, the window of the group confidences, DeepConf's online stop."""

    model_config = ConfigDict(extra="forbid")
    score: ScoreName | None = Field(
        None, description="What the policy ranks by (default: deepconf for confidence, bottom10_group for "
                          "deepconf_vote, self_certainty for borda, mean_logprob for cisc)")
    keep: float = Field(0.9, gt=0.0, le=1.0, description="deepconf_vote: the share of answered candidates kept, by score")
    borda_p: float = Field(1.0, ge=0.0, le=10.0, description="borda: rank r of N votes (N - r + 1)^p")
    temperature: float = Field(0.1, gt=0.0, le=100.0, description="cisc: each candidate votes softmax(score / T)")
    window: int = Field(2048, ge=1, le=65536, description="Tokens per window of the group confidences (DeepConf: 2048)")
    online: OnlineStopOptions | None = Field(None, description="DeepConf's online stop (HF and vLLM engines)")


class BudgetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidates: int | None = Field(None, ge=1, description="Most candidates to sample")
    tokens: int | None = Field(None, ge=1, description="Most completion tokens to spend (checked between rounds)")


class PruneOptions(BaseModel):
    """Early rejection (docs/features.md, "Pruning"): at each checkpoint the picking head scores every live
    candidate's prefix from the decode loop's own hidden state, and only the best share goes on generating."""

    model_config = ConfigDict(extra="forbid")
    at: list[int] | None = Field(None, min_length=1, max_length=8,
                                 description="Checkpoints in tokens generated per candidate, ascending (default: the "
                                             "server's ARBITER_PRUNE_AT)")
    at_fraction: list[float] | None = Field(None, min_length=1, max_length=8,
                                            description="Checkpoints as fractions of max_tokens, ascending, in (0, 1)")
    keep: float | None = Field(None, gt=0.0, le=1.0, description="Share of the live candidates kept at each "
                                                                 "checkpoint, rounded up (default: ARBITER_PRUNE_KEEP; "
                                                                 "1 records partial rewards and drops nothing)")
    min_keep: int | None = Field(None, ge=1, description="Candidates that always survive, finished ones included "
                                                         "(default and least: n)")
    close: bool | None = Field(None, description="Score each prefix as a closed answer (one extra decode step per "
                                                 "checkpoint feeds the closing token, where the heads were trained) "
                                                 "instead of at its last token (free); default ARBITER_PRUNE_CLOSE")

    @model_validator(mode="after")
    def _one_schedule(self) -> PruneOptions:
        if self.at is not None and self.at_fraction is not None:
            raise refusal("rerank.prune", "rerank.prune takes `at` or `at_fraction`, not both")
        if self.at is not None and not checkpoints_valid(self.at):
            raise refusal("rerank.prune.at", "rerank.prune.at must be distinct positive token counts, ascending")
        fr = self.at_fraction
        if fr is not None and (not checkpoints_valid(fr, 0.0, 1.0) or 0.0 in fr):
            raise refusal("rerank.prune.at_fraction", "rerank.prune.at_fraction must be distinct fractions in (0, 1), ascending")
        return self


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
    select: PolicyName | None = Field(
        None, description="Selection policy: argmax of the first head's reward, a vote over extracted answers "
                          "(weighted by softmax of the rewards, or one vote each), or verify (each distinct answer "
                          "scored once in the head's canonical form; the best-verified answer wins). Absent: the "
                          "picking head's own rule (its config's `selection`), else argmax")
    extractor: Literal["last_number", "choice_letter", "label_words", "regex", "json_field"] | None = Field(
        None, description="How an answer is read from a candidate for the vote policies (default: the picking "
                          "head's extractor, if its rule has one)")
    labels: list[str] | None = Field(None, min_length=1, max_length=32,
                                     description="extractor=label_words: the answer words (the first one in the text wins)")
    pattern: str | None = Field(None, min_length=1, max_length=256,
                                description="extractor=regex: a pattern with exactly one capturing group")
    field: str | None = Field(None, min_length=1, max_length=128,
                              description="extractor=json_field: dotted path of the field in the first JSON object")
    canonical: str | None = Field(None, min_length=1, max_length=256,
                                  description="select=verify: the template an extracted answer is scored in ({answer}; "
                                              "{option}: the listed text of an option letter); default: the head's")
    choices: list[Annotated[str, Field(min_length=1, max_length=8192)]] | None = Field(
        None, min_length=2, max_length=26, description="select=verify with {option}: the options' texts, A first "
                                                       "(default: the lettered lines of the last user message)")
    adaptive: bool | AdaptiveOptions | None = Field(
        None, description="Sample in rounds and stop once the leader is settled; `candidates` is then the maximum")
    budget: BudgetOptions | None = Field(None, description="Caps on candidates / completion tokens (the "
                                                           "X-Arbiter-Budget header overrides it)")
    prune: bool | PruneOptions | None = Field(
        None, description="Drop weak candidates mid-generation by the picking head's partial rewards; true: the "
                          "server's schedule; false: no pruning even where the server prunes by default")
    confidence: ConfidenceOptions | None = Field(
        None, description="The training-free policies' score and knobs, and DeepConf's online stop")


# Extras other OpenAI-compatible servers (vLLM) accept that change what the answer is: a request may send one only
# with the value that changes nothing (listed), else it is refused by name; it is never silently ignored. Unknown
# extras that change nothing here (`extra_body: {}` sent literally, `priority`) are logged and ignored.
ANSWER_CHANGING_EXTRAS: dict[str, tuple[Any, ...]] = {
    "top_k": (None, -1, 0), "min_p": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0), "min_tokens": (None, 0),
    "length_penalty": (None, 1, 1.0), "use_beam_search": (None, False), "ignore_eos": (None, False),
    "stop_token_ids": (None, []), "bad_words": (None, []), "allowed_token_ids": (None,),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True), "echo": (None, False), "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,), "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,),
    "guided_grammar": (None,), "guided_decoding_backend": (None,), "structured_outputs": (None,),
    "chat_template": (None,), "chat_template_kwargs": (None, {}), "documents": (None,), "logits_processors": (None,),
    "best_of": (None, 1), "vllm_xargs": (None, {}),
}

# Fields OpenAI marks nullable whose null means "the default" (the spec's `nullable: true`).
_NULL_IS_DEFAULT = ("n", "temperature", "top_p", "stream", "logprobs", "frequency_penalty", "presence_penalty")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # Accepted so that their values can be checked; what is not implemented is refused by the route
    # with 400 unsupported_parameter, never silently ignored.
    response_format: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None
    user: str | None = None
    # vLLM's chat extras with vLLM's meaning: continue the last (assistant) message instead of starting a new turn
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    include_stop_str_in_output: bool = False  # vLLM's: the stop string that ended an answer stays in its text
    rerank: RerankOptions | None = None
    _structured: StructuredOutput | None = PrivateAttr(default=None)  # response_format, compiled once

    @field_validator(*_NULL_IS_DEFAULT, mode="before")
    @classmethod
    def _null_is_default(cls, v: Any, info: ValidationInfo) -> Any:
        return cls.model_fields[str(info.field_name)].default if v is None else v

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k, b in (v or {}).items():
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values must be between -100 and 100 (token {k[:20]!r}: {b})")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @model_validator(mode="after")
    def _cross_field_rules(self) -> ChatCompletionRequest:
        """The rules between fields that hold whatever the settings. Output options that change what the answer
        must be are honoured or refused by name, never silently ignored."""
        try:  # json_object / json_schema: constrained decoding (arbiter.structured); a bad schema is a 400 here
            self._structured = StructuredOutput.of(self.response_format)
        except FormatError as e:
            raise refusal(e.param, str(e)) from None
        tc = self.tool_choice
        if tc is not None and not (isinstance(tc, str) and tc in ("none", "auto")):
            shown = repr(tc[:40]) if isinstance(tc, str) else f"a {str(tc.get('type', 'named'))[:40]!r} choice"
            raise _unsupported("tool_choice", f"{shown} (this model never emits tool calls; 'none' and 'auto' are accepted)")
        fc = self.function_call
        if fc is not None and not (isinstance(fc, str) and fc in ("none", "auto")):
            raise _unsupported("function_call", "forcing a function call")
        if self.modalities is not None and any(m != "text" for m in self.modalities):
            raise _unsupported("modalities", "an output modality other than 'text'")
        if self.audio is not None:
            raise _unsupported("audio", "audio output")
        if self.web_search_options is not None:
            raise _unsupported("web_search_options", "web search")
        if (self.model_extra or {}).get("moderation") is not None:
            raise _unsupported("moderation", "output moderation")
        for name, value in (self.model_extra or {}).items():  # other servers' extras that would change the answer
            if name in ANSWER_CHANGING_EXTRAS and value not in ANSWER_CHANGING_EXTRAS[name]:
                raise _unsupported(name, f"{name}={str(value)[:40]!r} (another server's sampling or output option)")
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise refusal("continue_final_message", "continue_final_message continues the last assistant message; "
                                                        "it cannot be combined with add_generation_prompt=true (send false)")
            if not self.messages or self.messages[-1].role != "assistant":
                raise refusal("continue_final_message", "continue_final_message needs the last message to be the "
                                                        "assistant's (the text to continue)")
        elif not self.add_generation_prompt:
            raise _unsupported("add_generation_prompt", "false without continue_final_message (an answer always "
                                                        "starts a new assistant turn here)")
        if self.top_logprobs and not self.logprobs:
            raise refusal("top_logprobs", "top_logprobs needs logprobs=true")
        rr = self.rerank
        if rr is not None:
            if rr.candidates is not None and rr.candidates < self.n:
                raise refusal("rerank.candidates", f"rerank.candidates ({rr.candidates}) must be at least n ({self.n})")
            if rr.adaptive and self.stream:
                raise refusal("rerank.adaptive", "rerank.adaptive cannot be combined with stream=true")
            if rr.adaptive and rr.prune:
                raise refusal("rerank.prune", "rerank.prune cannot be combined with rerank.adaptive (choose one way "
                                              "to spend fewer tokens)")
            if isinstance(rr.prune, PruneOptions) and rr.prune.min_keep is not None and rr.prune.min_keep < self.n:
                raise refusal("rerank.prune.min_keep", f"rerank.prune.min_keep ({rr.prune.min_keep}) must be at least n ({self.n})")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's current name) or the deprecated ``max_tokens``, whichever is set."""
        return self.max_completion_tokens or self.max_tokens

    def to_sampling_params(self, *, max_tokens: int, logit_bias: tuple[tuple[int, float], ...] = ()) -> SamplingParams:
        """The request as the engine's sampling parameters; ``max_tokens`` (the default applied and checked against
        the limit) and ``logit_bias`` (token ids, checked against the vocabulary) come resolved from the route."""
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              stop=tuple(self.stop or ()), seed=self.seed, logit_bias=logit_bias,
                              frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                              logprobs=(self.top_logprobs or 0) if self.logprobs else None,
                              structured=self._structured, include_stop=self.include_stop_str_in_output)

    @property
    def structured(self) -> StructuredOutput | None:
        """The output format ``response_format`` asks for (None: free text)."""
        return self._structured

    def extra_fields(self) -> list[str]:
        """Fields accepted but not acted on: unknown ones, and declared no-ops that were sent (tools, user)."""
        sent = [k for k in ("tools", "functions", "user") if getattr(self, k) is not None]
        return sorted([*(self.model_extra or {}).keys(), *sent])


class CompletionRequest(BaseModel):
    """``POST /v1/completions`` (OpenAI's legacy completions): raw prompts, no chat template."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of lists of token ids")
    max_tokens: int = Field(16, ge=0, description="0 with echo: the prompt's log-probs only (log-likelihood evaluation)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1, description="Candidates sampled per prompt, of which the n with the highest "
                                                        "mean log-prob per token come back (OpenAI's meaning)")
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    logprobs: int | None = Field(None, ge=0, le=20, description="Top alternatives per token in the legacy logprobs object")
    echo: bool = Field(False, description="Return the prompt before the completion (with its log-probs when asked)")
    include_stop_str_in_output: bool = Field(False, description="vLLM's: the stop string that ended a completion stays in it")
    rerank: RerankOptions | None = Field(None, description="Arbiter's extension: best_of's candidates (or rerank.candidates) "
                                                          "ranked by a head's reward (argmax) instead of mean log-prob")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    suffix: str | None = None
    user: str | None = None

    @field_validator("n", "temperature", "top_p", "max_tokens", "echo", "stream", "frequency_penalty", "presence_penalty",
                     mode="before")
    @classmethod
    def _null_is_default(cls, v: Any, info: ValidationInfo) -> Any:
        return cls.model_fields[str(info.field_name)].default if v is None else v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        v = [] if v is None else [v] if isinstance(v, str) else v
        if any(x == "" for x in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @model_validator(mode="after")
    def _cross_field_rules(self) -> CompletionRequest:
        if self.stream:
            raise _unsupported("stream", "streaming legacy completions (use /v1/chat/completions to stream)")
        if self.suffix:
            raise _unsupported("suffix", "a suffix (insertion)")
        if self.best_of is not None and self.best_of < self.n:
            raise refusal("best_of", f"best_of ({self.best_of}) must be at least n ({self.n})")
        for name, value in (self.model_extra or {}).items():
            if name in ANSWER_CHANGING_EXTRAS and value not in ANSWER_CHANGING_EXTRAS[name]:
                raise _unsupported(name, f"{name}={str(value)[:40]!r}")
        rr = self.rerank
        if rr is not None:
            if rr.select not in (None, "argmax"):
                raise _unsupported("rerank.select", f"{rr.select!r} on /v1/completions (a raw prompt has no answer to "
                                                    "extract: the head's argmax only; vote and verify rules through "
                                                    "/v1/chat/completions)")
            for name in ("adaptive", "prune", "confidence", "budget", "extractor"):
                if getattr(rr, name) not in (None, False):
                    raise _unsupported(f"rerank.{name}", f"rerank.{name} on /v1/completions (through /v1/chat/completions)")
            if rr.candidates is not None and self.best_of is not None and rr.candidates != self.best_of:
                raise refusal("rerank.candidates", "rerank.candidates and best_of both set the candidates: send one")
            if rr.candidates is not None and rr.candidates < self.n:
                raise refusal("rerank.candidates", f"rerank.candidates ({rr.candidates}) must be at least n ({self.n})")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]  # a list of ints is one tokenised prompt
        return list(p)  # type: ignore[arg-type]  # strings or token lists


class ScoreRequest(BaseModel):
    """``POST /v1/score``: rewards for given answers to one conversation (no generation)."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    candidates: list[Text] = Field(min_length=1)
    heads: list[str] | None = Field(None, min_length=1)


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's): a raw ``prompt`` (the tokenizer's own special tokens added unless
    ``add_special_tokens`` is false) or ``messages`` (the chat encoding the chat route uses, ending with the assistant
    header unless ``add_generation_prompt`` is false or ``continue_final_message`` continues the last message)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (vLLM's defaults)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise refusal("prompt", "send exactly one of prompt and messages")
        if self.continue_final_message and self.add_generation_prompt:
            raise refusal("continue_final_message", "continue_final_message cannot be combined with "
                                                    "add_generation_prompt=true (send false)")
        return self


class DetokenizeRequest(BaseModel):
    """``POST /detokenize`` (vLLM's): token ids back to text."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


class LoadHeadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=512, description="Directory relative to ARBITER_HEADS_DIR")
    # The same rule as a head config's name: it must be usable as one URL path segment (PUT/DELETE /v1/admin/heads/{name}).
    name: str | None = Field(None, min_length=1, max_length=64, pattern=rf"^{NAME_PATTERN}$")


class SwapHeadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=512)


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=rf"^{NAME_PATTERN}$", description="The model id clients will send")
    path: str = Field(min_length=1, max_length=512, description="Directory relative to ARBITER_ADAPTERS_DIR")


# --- responses (built by serving.py) ------------------------------------------------------------------


class _Response(BaseModel):
    """A response model that leaves out its optional extension fields (``_omit_if_none``) when they are None,
    so a plain completion carries no ``rerank: null`` and a first chunk no ``role: null``; required-nullable
    fields of the spec (``refusal``, ``logprobs``, ``finish_reason``) are never omitted."""

    _omit_if_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for k in self._omit_if_none:
            if k in out and out[k] is None:
                del out[k]
        return out


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Arbiter's extension: tokens of the extra forward that scored the distinct answers in canonical form (select
    # verify; the prompt once, whose KV cache its answers share, then answer + closing token per answer), not part of
    # prompt / completion tokens.
    verify_tokens: int | None = None

    _omit_if_none = ("verify_tokens",)


class RerankCandidate(_Response):
    index: int
    text: str
    finish_reason: str = Field(description="stop, length, or pruned (dropped at a checkpoint: no final reward)")
    rewards: dict[str, float] = Field(description="Each head's reward of the complete answer (empty when pruned)")
    completion_tokens: int
    partial_rewards: list[PartialReward] | None = Field(
        None, description="Pruning: the picking head's reward of this candidate's prefix at each checkpoint it reached")
    pruned_at: int | None = Field(None, description="Pruning: the checkpoint (tokens) that dropped this candidate")
    confidence: dict[str, float | int | None] | None = Field(
        None, description="The model's own confidence in the answer tokens: mean_logprob, deepconf, self_certainty, "
                          "lowest_group, bottom10_group, tail (higher = more confident; null for an answer of no "
                          "tokens), tokens")
    logprobs: "ChoiceLogprobs | None" = Field(None, description="The candidate's token log-probs, when `logprobs` is asked")

    _omit_if_none = ("partial_rewards", "pruned_at", "confidence", "logprobs")


class PartialReward(BaseModel):
    tokens: int
    reward: float


class PruneCheckpoint(BaseModel):
    tokens: int = Field(description="The checkpoint: tokens generated per candidate")
    live: int = Field(description="Candidates still generating when it was reached")
    pruned: list[int] = Field(description="Indices of the candidates it dropped")


class PruneInfo(BaseModel):
    """What pruning did to a rerank request (``rerank.prune``)."""

    at: list[int] = Field(description="The checkpoints, in tokens")
    keep: float
    min_keep: int
    checkpoints: list[PruneCheckpoint] = Field(description="Checkpoints reached, in order")
    pruned: int = Field(description="Candidates dropped in all")
    pruned_tokens: int = Field(description="Tokens the pruned candidates had generated (counted in usage)")
    tokens_saved_estimate: int = Field(
        description="For each pruned candidate, the survivors' mean completion length less the tokens it had "
                    "generated (at least 0): what finishing it would have cost, as an estimate")


class RerankGroup(_Response):
    answer: str
    votes: int
    weight: float = Field(description="weighted_vote: summed softmax of the rewards; majority_vote and verify: share "
                                      "of votes")
    candidates: list[int]
    canonical: str | None = Field(None, description="verify: the answer as the head scored it")
    canonical_reward: float | None = Field(None, description="verify: the head's reward of the canonical answer")
    score: float | None = Field(None, description="verify: the group score the groups are ranked by")

    _omit_if_none = ("canonical", "canonical_reward", "score")


class VerifyInfo(BaseModel):
    """What answer-level verification spent: the distinct answers scored, the tokens of that forward, its time."""

    answers_scored: int
    tokens: int
    seconds: float


class RerankRule(_Response):
    """The selection rule a rerank response applied, and where it came from."""

    select: str
    extractor: str | None = None
    pattern: str | None = None
    field: str | None = None
    labels: list[str] | None = None
    canonical: str | None = None
    vote_weight: float | None = None
    text_weight: float | None = None
    score: str | None = Field(None, description="The training-free policies: the confidence score ranked by")
    keep: float | None = Field(None, description="deepconf_vote: the share of answered candidates kept")
    source: Literal["request", "head", "default"] = Field(
        description="request: the request's `select`; head: the picking head's own rule; default: argmax")

    _omit_if_none = ("extractor", "pattern", "field", "labels", "canonical", "vote_weight", "text_weight", "score", "keep")


class AdaptiveInfo(BaseModel):
    """How an adaptive rerank request sampled."""

    rounds: int = Field(description="Rounds run")
    stopped: Literal["settled", "max_candidates", "token_budget"] = Field(description="Why sampling stopped")
    candidates: int = Field(description="Candidates sampled")
    max_candidates: int = Field(description="The most it could have sampled")


class RerankInfo(_Response):
    """The extra ``rerank`` field of a response: which heads scored, which candidates were chosen, and how."""

    heads: list[str]
    candidates_scored: int
    policy: str = "argmax"
    rule: RerankRule | None = Field(None, description="The selection rule applied and its source")
    chosen: list[int]
    rewards: list[float] = Field(description="Reward of each returned choice under the picking head")
    groups: list[RerankGroup] | None = Field(None, description="Vote policies: the answer groups, winner first")
    adaptive: AdaptiveInfo | None = Field(None, description="Adaptive rerank: rounds run, why sampling stopped, candidates "
                                                  "sampled, the maximum allowed")
    prune: PruneInfo | None = Field(None, description="Pruning: the checkpoints reached, what each dropped, tokens saved")
    verify: VerifyInfo | None = Field(None, description="select=verify: the extra forward over the canonical answers")
    confidence: ConfidenceInfo | None = Field(None, description="The training-free policies: the score ranked by, "
                                                                "DeepConf's online threshold and what it stopped")
    candidates: list[RerankCandidate] | None = None

    _omit_if_none = ("rule", "groups", "adaptive", "prune", "verify", "confidence", "candidates")


class ConfidenceInfo(BaseModel):
    score: str = Field(description="The confidence score the policy ranked by")
    chosen: list[float] = Field(description="That score of each returned choice")
    threshold: float | None = Field(None, description="DeepConf's online stop: the threshold its warm-up set")
    warmup: int | None = Field(None, description="DeepConf's online stop: candidates sampled in full first")
    stopped: int | None = Field(None, description="DeepConf's online stop: candidates it stopped")
    stopped_tokens: int | None = Field(None, description="DeepConf's online stop: tokens those had generated")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None  # required by the spec (null: this server never refuses)


# What a client sees; the engine's internal "cancelled" never reaches a response (nobody is waiting).
FinishReason = Literal["stop", "length"]


class Choice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str
    rerank: RerankInfo | None = None

    _omit_if_none = ("rerank",)


class CompletionLogprobs(BaseModel):
    """The legacy ``logprobs`` object: per token its text, log-prob, top alternatives and character offset."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str
    rerank: list[CompletionRerank] | None = Field(None, description="With `rerank`: per prompt, the head's pick")

    _omit_if_none = ("rerank",)


class CompletionRerank(BaseModel):
    """Per prompt of a reranked legacy completion: the candidates' rewards under each head (the first picks,
    argmax) and the candidates returned, best first."""

    prompt_index: int
    heads: list[str]
    policy: Literal["argmax"] = "argmax"
    candidates_scored: int
    chosen: list[int] = Field(description="Candidate indices of the returned choices, best first")
    rewards: list[dict[str, float]] = Field(description="Each candidate's reward per head, in candidate order")
    texts: list[str] | None = Field(None, description="Every candidate's text, with return_candidates")


class ChunkDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None

    _omit_if_none = ("role", "content")


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed completion (the ``data:`` payload); ``[DONE]`` ends the stream,
    and a failure after the stream started arrives as an ``ErrorResponse`` payload."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    rerank: RerankInfo | None = None

    _omit_if_none = ("rerank",)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ScoreItem(BaseModel):
    index: int
    rewards: dict[str, float]


class ScoreResponse(BaseModel):
    object: Literal["score.list"] = "score.list"
    model: str
    heads: list[str]
    data: list[ScoreItem]
    best: int
    usage: "ScoreUsage"


class ScoreUsage(BaseModel):
    """Tokens a score request read: the prompt once per candidate plus every candidate (no completion tokens)."""

    prompt_tokens: int
    total_tokens: int


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
    path: str = Field(description="Relative to ARBITER_HEADS_DIR (never the server's absolute layout)")
    metrics: dict[str, Any]
    selection: dict[str, Any] | None = Field(None, description="The head's own selection rule, if it carries one")

    @classmethod
    def of(cls, head: Any) -> "HeadCard":
        """The wire card of a registry entry (``arbiter.heads.LoadedHead``)."""
        c = head.config
        return cls(id=head.name, pooler=c.pooler, layer=c.layer, backbone=c.backbone.model_name, path=head.path,
                   metrics=c.provenance.get("metrics", {}), selection=c.selection.describe() if c.selection else None)


class HeadPlot(BaseModel):
    title: str
    url: str = Field(description="GET it (with the API key) for the PNG")


class HeadModelCard(BaseModel):
    """A head's model card (``README.md`` beside its files, ``arbiter heads card``) and the plots it links."""

    id: str
    object: Literal["head.card"] = "head.card"
    markdown: str | None = Field(description="The card, or null when the head has none")
    plots: list[HeadPlot] = Field(description="PNG plots the card links that this server can serve")


class HeadList(BaseModel):
    object: Literal["list"] = "list"
    data: list[HeadCard]
    default: str | None


class AdapterCard(BaseModel):
    """A loaded adapter as ``/v1/adapters`` and the admin endpoint describe it."""

    id: str
    object: Literal["adapter"] = "adapter"
    path_name: str = Field(description="The adapter directory's name (never its absolute path)")
    modules: int = Field(description="Adapted modules")
    r: int | None = None
    alpha: float | None = None

    @classmethod
    def of(cls, ad: Any) -> "AdapterCard":
        """The wire card of a loaded adapter (``arbiter.generation.adapters.LoadedAdapter``)."""
        from pathlib import Path

        return cls(id=ad.name, path_name=Path(ad.path).name, modules=len(ad.deltas), r=ad.info.get("r"),
                   alpha=ad.info.get("alpha"))


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool


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
    instance: str | None = Field(None, description="host:pid of the process that answered (replicas)")
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


# Models that name a class defined after them
RerankCandidate.model_rebuild()
RerankInfo.model_rebuild()
