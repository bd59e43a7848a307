"""OpenAI's published chat-completions (and legacy completions) schemas (tests/data/openai/chat_schemas.json, extracted verbatim from
OpenAI's OpenAPI document) as JSON Schema validators.

The document is OpenAPI 3.1 but marks optional-but-nullable fields OpenAPI-3.0 style (``nullable: true``);
a JSON Schema validator ignores that keyword, so each such schema becomes ``anyOf: [<schema>, null]`` here.
``$ref`` siblings (``{"$ref": ..., "nullable": true}``) get the same treatment.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import jsonschema

PATH = Path(__file__).resolve().parent / "data" / "openai" / "chat_schemas.json"
# The Responses API's schemas (Response, CreateResponse, ResponseStreamEvent and every schema they reference), from
# the same document
RESPONSES_PATH = PATH.with_name("responses_schemas.json")


def _nullable(node):
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: (_nullable(v) if k != "properties" else {pk: _nullable(pv) for pk, pv in v.items()})
           for k, v in node.items()}
    if out.pop("nullable", False) is True:
        out = {"anyOf": [out, {"type": "null"}]}
    return out


@lru_cache(maxsize=1)
def components() -> dict:
    schemas: dict = {}
    for path in (PATH, RESPONSES_PATH):  # the chat (and legacy) schemas, then the Responses API's
        schemas.update(json.loads(path.read_text())["components"]["schemas"])
    return {"schemas": {k: _nullable(v) for k, v in schemas.items()}}


@lru_cache(maxsize=None)
def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": copy.deepcopy(components())}
    return jsonschema.Draft202012Validator(schema)


def violations(name: str, instance) -> list[str]:
    """Every way ``instance`` breaks schema ``name`` (empty when it conforms)."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
            for e in validator(name).iter_errors(instance)]


def request_properties() -> set[str]:
    """Every top-level field of CreateChatCompletionRequest (through its allOf chain)."""
    schemas = components()["schemas"]
    out: set[str] = set()

    def walk(s):
        if "$ref" in s:
            walk(schemas[s["$ref"].rsplit("/", 1)[1]])
        for part in s.get("allOf", []):
            walk(part)
        out.update(s.get("properties", {}))

    walk(schemas["CreateChatCompletionRequest"])
    return out
