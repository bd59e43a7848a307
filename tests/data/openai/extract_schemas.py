"""Extract the chat-completions schemas (and everything they reference) from OpenAI's OpenAPI document.

    python tests/data/openai/extract_schemas.py <path to openapi.json> > tests/data/openai/chat_schemas.json

The output keeps the spec's schemas verbatim (descriptions dropped to keep it small); tests/openai_spec.py
turns the spec's OpenAPI-3.0-style ``nullable: true`` into JSON Schema null branches when it loads them.
"""

from __future__ import annotations

import json
import sys

ROOTS = ["CreateChatCompletionRequest", "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
         "ErrorResponse", "ListModelsResponse", "Model"]
DROP = {"description", "example", "examples", "x-oaiMeta", "x-oaiExpandable", "title"}


def refs(node, out: set[str]) -> None:
    if isinstance(node, dict):
        r = node.get("$ref")
        if isinstance(r, str) and r.startswith("#/components/schemas/"):
            out.add(r.rsplit("/", 1)[1])
        for v in node.values():
            refs(v, out)
    elif isinstance(node, list):
        for v in node:
            refs(v, out)


def strip(node):
    if isinstance(node, dict):
        # "properties" maps field names to schemas: a field may itself be called "description" or "title".
        return {k: (strip(v) if k != "properties" else {pk: strip(pv) for pk, pv in v.items()})
                for k, v in node.items() if k not in DROP}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(path: str) -> None:
    spec = json.load(open(path))
    schemas = spec["components"]["schemas"]
    keep, todo = set(), list(ROOTS)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        found: set[str] = set()
        refs(schemas[name], found)
        todo += sorted(found - keep)
    out = {"source": "openai/openai-openapi @ f85dbe223d40e1a31cba812ab2d755c7e98a92a3 (2026-08-21), openapi.json, "
                     "API version " + spec["info"]["version"] + "; MIT License, Copyright (c) OpenAI (see LICENSE)",
           "components": {"schemas": {k: strip(schemas[k]) for k in sorted(keep)}}}
    json.dump(out, sys.stdout, indent=None, separators=(",", ":"), sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
