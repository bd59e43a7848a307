"""Structured outputs: OpenAI's ``response_format`` (``json_object``, ``json_schema``) by constrained decoding.

One grammar library serves both engines: llguidance (the ``guidance`` backend of vLLM's structured outputs). A
request's format becomes one llguidance grammar (``LLMatcher.grammar_from_json_schema`` with flexible whitespace,
as vLLM's ``serialize_guidance_grammar`` builds it); the HF engine masks each candidate's next-token logits with
its own matcher inside the decode loop (``Constrainer``), the vLLM engine hands the same schema to vLLM's structured
outputs with the ``guidance`` backend. Chosen over xgrammar (vLLM's ``auto`` default) because it needs no triton
(a ~280 MB wheel on a CPU machine) and computes a mask in tens of microseconds on CPU (docs/features.md,
"Structured outputs").

A schema that cannot compile is refused when the request is read (``StructuredOutput.of`` raises ``ValueError``
naming the problem), before anything is queued.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

# OpenAI's rule for json_schema.name: a-z, A-Z, 0-9, underscores and dashes, at most 64 characters.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The grammar llguidance builds for ``json_object``: any JSON object (vLLM builds the same).
_ANY_OBJECT = '{"type": "object"}'


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf  # noqa: F401  (from_tokenizer)
        import llguidance.torch  # noqa: F401  (fill_next_token_bitmask)
    except ImportError as e:  # a core dependency; only a broken install lacks it
        raise RuntimeError("structured outputs need the llguidance package (pip install llguidance)") from e
    return llguidance


class FormatError(ValueError):
    """A malformed output format: ``param`` names the field (OpenAI's error ``param``), the message the problem."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredOutput:
    """A request's output format. ``schema``: the JSON schema as JSON text, in the request's key order (the grammar
    emits properties in that order; text keeps a ``SamplingParams`` holding it a hashable value); None for
    ``json_object``."""

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None
    name: str | None = None
    strict: bool | None = None

    @classmethod
    def of(cls, response_format: dict[str, Any] | None, *, param: str = "response_format") -> StructuredOutput | None:
        """OpenAI's ``response_format`` (or the Responses API's ``text.format``, flat: ``param`` names it) as a
        format, None for ``text``; ``FormatError`` where it is malformed or its schema does not
        compile."""
        if response_format is None:
            return None
        if not isinstance(response_format, dict):
            raise FormatError(param, "must be an object with a 'type'")
        kind = response_format.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            out = cls("json_object")
        elif kind == "json_schema":
            # Chat completions nest the schema under "json_schema"; the Responses API's text.format is flat.
            spec = response_format.get("json_schema", response_format) if param == "response_format" else response_format
            where = f"{param}.json_schema" if param == "response_format" else param
            if not isinstance(spec, dict):
                raise FormatError(where, "must be an object with a 'name' and a 'schema'")
            name = spec.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                raise FormatError(f"{where}.name", "a name of 1-64 letters, digits, underscores or dashes is required")
            schema = spec.get("schema", {})
            if not isinstance(schema, dict):
                raise FormatError(f"{where}.schema", "must be a JSON Schema object")
            strict = spec.get("strict")
            if strict is not None and not isinstance(strict, bool):
                raise FormatError(f"{where}.strict", "must be a boolean")
            out = cls("json_schema", json.dumps(schema), name, strict)  # key order kept: properties come in it
        else:
            raise FormatError(f"{param}.type", f"type {str(kind)[:40]!r} is not one of 'text', 'json_object', 'json_schema'")
        problem = out.problem()
        if problem:
            where = param if kind == "json_object" else (f"{param}.json_schema.schema" if param == "response_format"
                                                         else f"{param}.schema")
            raise FormatError(where, f"the schema cannot be compiled into a grammar: {problem}")
        return out

    @property
    def schema_dict(self) -> dict[str, Any] | None:
        return None if self.schema is None else json.loads(self.schema)

    def grammar(self) -> str:
        """The llguidance grammar of this format (what vLLM's guidance backend builds from the same request)."""
        return _grammar(self.schema if self.schema is not None else _ANY_OBJECT)

    def problem(self) -> str:
        """Why this format's grammar does not compile ('' when it does): llguidance's own message."""
        return _problem(self.grammar())


@functools.lru_cache(maxsize=256)
def _problem(grammar: str) -> str:
    """Validated once per grammar: a Responses request is read twice (as itself, then as its chat request), and
    clients send the same schema request after request."""
    try:
        is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, TypeError) as e:
        return str(e)
    return "; ".join(messages)[:500] if is_error else ""


@functools.lru_cache(maxsize=256)
def _grammar(schema_json: str) -> str:
    return str(_llguidance().LLMatcher.grammar_from_json_schema(schema_json, defaults={"whitespace_flexible": True}))


class Constrainer:
    """The HF engine's side of constrained decoding: llguidance matchers over the engine's tokenizer, and the masks
    they allow on a batch's logits. Built once per engine (the tokenizer conversion takes ~0.3 s)."""

    def __init__(self, tokenizer: Any, vocab_size: int, end_id: int):
        llg = _llguidance()
        try:
            self.tokenizer = llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=end_id)
        except ValueError as e:  # a slow (Python) tokenizer: llguidance reads fast ones only
            raise RuntimeError(f"structured outputs need a fast tokenizer ({e})") from e
        self.vocab_size = vocab_size
        self.end_id = end_id
        self._words = (vocab_size + 31) // 32
        self._matchers: dict[StructuredOutput, Any] = {}

    def matcher(self, fmt: StructuredOutput) -> Any:
        """A fresh matcher for one candidate (a copy of the compiled one: compiling once per format)."""
        base = self._matchers.get(fmt)
        if base is None:
            base = _llguidance().LLMatcher(self.tokenizer, fmt.grammar(), log_level=0)
            if base.is_error():
                raise ValueError(f"the response format's grammar failed: {base.get_error()}")
            if len(self._matchers) > 64:
                self._matchers.clear()
            self._matchers[fmt] = base
        return base.deep_copy()

    def allowed(self, matchers: Sequence[Any]) -> torch.Tensor:
        """[len(matchers), vocab] bool: the tokens each matcher accepts next."""
        llg = _llguidance()
        bits = torch.full((len(matchers), self._words), -1, dtype=torch.int32)
        for i, m in enumerate(matchers):
            llg.torch.fill_next_token_bitmask(m, bits, i)
        flat = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")[:, : self.vocab_size]
        out = torch.from_numpy(flat.astype(bool))
        # A matcher in an error state allows nothing; end that candidate (its closing token) rather than sample
        # from an empty distribution. Never seen: each sampled token was one its mask allowed.
        out[~out.any(dim=1), self.end_id] = True
        return out
