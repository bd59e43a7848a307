"""Structured outputs (``response_format`` json_object / json_schema; the Responses API's ``text.format``) by
constrained decoding with llguidance (docs/features.md, "Structured outputs").

Fast tests: what cannot be served is a 400 naming the field and the problem, before anything is queued. Integration
tests, on the real model through the HF engine's decode loop: every returned candidate is checked by an independent
validator (the ``jsonschema`` package), in plain, streamed and reranked requests, through the ``openai`` client's own
``parse`` helpers; the same prompt unconstrained gives text that is not JSON (the constraint is what makes it so).
The vLLM engine's side is in tests/test_vllm_engine.py."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai_spec
import pytest

from arbiter.testing.fakes import registry_with
from arbiter.testing.served import served

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative"]},
        "reason": {"type": "string", "maxLength": 60},
    },
    "required": ["sentiment", "reason"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Is this review positive or negative? 'A gorgeous, witty, seductive movie.' "
                                   "Answer in JSON."}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def fake(fake_srv):
    return fake_srv


@pytest.mark.parametrize("fmt, param, says", [
    ({"type": "xml"}, "response_format.type", "'xml'"),
    ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "response_format.json_schema.name", "name"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": SCHEMA}}, "response_format.json_schema.name",
     "name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
     "response_format.json_schema.schema", "strin"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}}}},
     "response_format.json_schema.schema", "none"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "an object"}}, "response_format.json_schema.schema",
     "JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": "yes"}},
     "response_format.json_schema.strict", "boolean"),
])
def test_a_format_that_cannot_be_served_is_a_400_naming_the_problem(fake, fmt, param, says):
    batches = len(fake.engine.batches)
    r = httpx.post(f"{fake.url}/v1/chat/completions", timeout=20,
                   json={"model": "fake-backbone", "messages": ASK, "response_format": fmt})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err
    assert len(fake.engine.batches) == batches  # nothing was queued


def test_an_engine_that_cannot_constrain_refuses_instead_of_ignoring(fake):
    """The scripted fake engine does not constrain decoding: a valid format is refused by name, never served as
    free text."""
    for fmt in (FORMAT, {"type": "json_object"}):
        r = httpx.post(f"{fake.url}/v1/chat/completions", timeout=20,
                       json={"model": "fake-backbone", "messages": ASK, "response_format": fmt})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
        assert r.json()["error"]["code"] == "unsupported_parameter" and "FakeEngine" in r.json()["error"]["message"]


# --- the real model, HF engine ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(backbone):
    from arbiter.generation.hf import HFEngine

    with served(HFEngine(backbone), registry_with()) as s:
        s.model = backbone.name
        yield s


def _chat(srv, **body) -> dict:
    r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=300,
                   json={"model": srv.model, "messages": ASK, "max_tokens": 96, "temperature": 1.0, "seed": 7, **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.integration
def test_every_candidate_of_a_json_schema_request_validates(hf):
    out = _chat(hf, n=6, response_format=FORMAT)
    assert openai_spec.violations("CreateChatCompletionResponse", out) == []
    for c in out["choices"]:
        assert c["finish_reason"] == "stop", c
        answer = json.loads(c["message"]["content"])
        jsonschema.validate(answer, SCHEMA)
        assert list(answer) == ["sentiment", "reason"]  # properties come in the schema's order
    # The control: the same request unconstrained is not JSON of this schema (the grammar is what makes it so).
    free = _chat(hf, n=6)
    def valid(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            return True
        except (ValueError, jsonschema.ValidationError):
            return False
    assert not all(valid(c["message"]["content"]) for c in free["choices"])


@pytest.mark.integration
def test_json_object_gives_objects(hf):
    out = _chat(hf, n=4, max_tokens=160, response_format={"type": "json_object"})
    stopped = [c for c in out["choices"] if c["finish_reason"] == "stop"]
    assert stopped  # a long object may run out of tokens ("length"); a finished one is always an object
    for c in stopped:
        assert isinstance(json.loads(c["message"]["content"]), dict)


@pytest.mark.integration
def test_a_reranked_request_constrains_every_candidate_and_the_extractor_finds_its_field(hf):
    out = _chat(hf, response_format=FORMAT, rerank={"candidates": 6, "select": "deepconf_vote", "extractor": "json_field",
                                                    "field": "sentiment", "return_candidates": True})
    cands = out["rerank"]["candidates"]
    assert len(cands) == 6
    for c in cands:
        jsonschema.validate(json.loads(c["text"]), SCHEMA)
    groups = out["rerank"]["groups"]
    # Every candidate's field was found: the groups hold all six, each under its candidates' own "sentiment".
    assert sorted(i for g in groups for i in g["candidates"]) == list(range(6))
    for g in groups:
        assert all(json.loads(cands[i]["text"])["sentiment"] == g["answer"] for i in g["candidates"]), g
    picked = json.loads(out["choices"][0]["message"]["content"])
    jsonschema.validate(picked, SCHEMA)
    assert picked["sentiment"] == groups[0]["answer"]  # the winning group's answer


@pytest.mark.integration
def test_the_stream_carries_valid_json(hf):
    with httpx.stream("POST", f"{hf.url}/v1/chat/completions", timeout=300,
                      json={"model": hf.model, "messages": ASK, "max_tokens": 96, "seed": 3, "stream": True,
                            "response_format": FORMAT}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.integration
def test_the_openai_clients_parse_helpers(hf):
    """``chat.completions.parse`` and ``responses.parse`` with a pydantic model: the client builds the strict schema
    itself and parses the answer into the model."""
    import openai
    from pydantic import BaseModel

    class Verdict(BaseModel):
        sentiment: str
        stars: int

    client = openai.OpenAI(base_url=f"{hf.url}/v1", api_key="unused", max_retries=0, timeout=300)
    got = client.chat.completions.parse(model=hf.model, messages=ASK, response_format=Verdict, max_tokens=64, seed=1)
    assert got.choices[0].finish_reason == "stop"
    assert isinstance(got.choices[0].message.parsed, Verdict)
    resp = client.responses.parse(model=hf.model, input=ASK[0]["content"], text_format=Verdict, max_output_tokens=64)
    assert isinstance(resp.output_parsed, Verdict)
    assert resp.text.format.type == "json_schema"
