"""The live server held to OpenAI's own published spec (tests/openai_spec.py over OpenAI's schemas).

One real ``arbiter serve`` on SmolLM2-135M with a head and an API key. Every request body sent here is
first validated against the spec's ``CreateChatCompletionRequest`` (so it is a documented request), and
together the bodies use every top-level request field and every message form of the spec (checked against
the spec itself, so a field the spec adds later fails this test until it is handled). Every response (plain,
n > 1, rerank, logprobs, each streamed chunk including the usage chunk, and error bodies) is validated
against the spec's response schemas with zero violations allowed. Fields the server does not implement and
that would change the output must be refused with 400 ``unsupported_parameter`` naming them.
"""

from __future__ import annotations

import json

import httpx
import openai_spec
import pytest

from arbiter.testing.fakes import ArbiterProcess, save_random_head

KEY = "sk-conformance"
AUTH = {"Authorization": f"Bearer {KEY}"}
USER = {"role": "user", "content": "Name a colour."}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def srv(backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance_heads")
    save_random_head(backbone.fingerprint, root / "h", name="h", seed=11)
    with ArbiterProcess(root, root.parent / "conformance_server.log", env={"ARBITER_API_KEY": KEY,
                                                                           "ARBITER_MAX_BODY_BYTES": "65536"}) as s:
        s.model = backbone.name
        yield s


def conforms(schema: str, instance) -> None:
    bad = openai_spec.violations(schema, instance)
    assert not bad, f"{schema} violations:\n" + "\n".join(bad) + f"\n{json.dumps(instance)[:2000]}"


def post(srv, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=kw.pop("headers", AUTH), timeout=120, **kw)


def body(srv, **fields) -> dict:
    out = {"model": srv.model, "messages": [USER], "max_tokens": 4, "seed": 1, **fields}
    conforms("CreateChatCompletionRequest", out)  # a documented request, or the test itself is wrong
    return out


# --- documented requests: every field and every message form ---------------------------------------------

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CUSTOM_TOOL = {"type": "custom", "custom": {"name": "shell", "description": "run a command"}}

MESSAGE_FORMS = [
    {"role": "developer", "content": "Answer briefly."},
    {"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}], "name": "dev"},
    {"role": "system", "content": "You are terse."},
    {"role": "system", "content": [{"type": "text", "text": "You are terse."}], "name": "sys"},
    {"role": "user", "content": "What is the weather in Paris?", "name": "alice"},
    {"role": "user", "content": [{"type": "text", "text": "Paris weather,"}, {"type": "text", "text": " please."}]},
    {"role": "assistant", "content": "Let me check."},
    {"role": "assistant", "content": [{"type": "text", "text": "Checking"}, {"type": "refusal", "refusal": "not that"}]},
    {"role": "assistant", "content": None, "refusal": "I can't help with that."},
    {"role": "assistant", "content": None, "name": "bot", "audio": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"id": "call_2", "type": "custom", "custom": {"name": "shell", "input": "date"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "Mon Dec 1"}]},
    {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}},
    {"role": "function", "name": "get_weather", "content": "21 C"},
    {"role": "function", "name": "get_weather", "content": None},
    {"role": "user", "content": "Thanks. One word: is it warm?"},
]


def accepted_bodies(srv) -> list[dict]:
    """Requests the server must answer 200, covering every request field the spec documents."""
    return [
        # Every nullable field as null means "the default". (top_logprobs is not nullable after all: one of the
        # spec's allOf parts declares it a plain integer, so null fails the spec itself.)
        body(srv, max_tokens=None, max_completion_tokens=4, n=None, temperature=None, top_p=None, stream=None,
             logprobs=None, frequency_penalty=None, presence_penalty=None, logit_bias=None,
             stop=None, seed=None, stream_options=None, modalities=None, audio=None, store=None, prediction=None,
             moderation=None, metadata=None, service_tier=None, verbosity=None, reasoning_effort=None,
             safety_identifier=None, prompt_cache_key=None, prompt_cache_retention=None),
        # Structured outputs, honoured by constrained decoding (tests/test_structured_outputs.py validates the JSON).
        body(srv, response_format={"type": "json_object"}, max_completion_tokens=4),
        body(srv, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
             max_completion_tokens=4),
        # Sampler fields, honoured.
        body(srv, n=2, temperature=0.7, top_p=0.9, stop=["\n\n", "###"], logprobs=True, top_logprobs=2,
             logit_bias={"28": 2}, frequency_penalty=0.5, presence_penalty=0.25, max_completion_tokens=4),
        body(srv, temperature=0, stop="\n"),
        # Accepted no-ops: they change neither what the answer is nor its shape here.
        body(srv, metadata={"team": "arbiter"}, store=False, service_tier="auto", verbosity="medium",
             reasoning_effort="low", user="u-1", safety_identifier="s-1", prompt_cache_key="k",
             prompt_cache_retention="in_memory", prompt_cache_options={"mode": "implicit"},
             prediction={"type": "content", "content": "Blue."}, response_format={"type": "text"}, modalities=["text"],
             tools=[TOOL, CUSTOM_TOOL], tool_choice="auto", parallel_tool_calls=True,
             functions=[{"name": "get_weather", "parameters": {"type": "object"}}], function_call="auto"),
        body(srv, tools=[TOOL], tool_choice="none", function_call="none"),
        # Every message form, in one conversation (a full tool round trip, old and new style).
        body(srv, messages=MESSAGE_FORMS),
    ]


def refused_bodies(srv) -> list[tuple[dict, str]]:
    """Documented requests that ask for something this server does not do: (body, the param named)."""
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    file = {"type": "file", "file": {"file_id": "file-1"}}
    return [
        (body(srv, tools=[TOOL], tool_choice="required"), "tool_choice"),
        (body(srv, tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}), "tool_choice"),
        (body(srv, functions=[{"name": "f"}], function_call={"name": "f"}), "function_call"),
        (body(srv, modalities=["text", "audio"]), "modalities"),
        (body(srv, audio={"voice": "alloy", "format": "wav"}), "audio"),
        (body(srv, web_search_options={"search_context_size": "low"}), "web_search_options"),
        (body(srv, moderation={"model": "omni-moderation-latest"}), "moderation"),
        (body(srv, messages=[{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]),
         "messages.0.content.1"),
        (body(srv, messages=[{"role": "user", "content": [audio]}]), "messages.0.content.0"),
        (body(srv, messages=[{"role": "user", "content": [file]}]), "messages.0.content.0"),
    ]


def test_the_bodies_cover_every_documented_request_field_and_message_form(srv):
    used: set[str] = set()
    for b in accepted_bodies(srv) + [b for b, _ in refused_bodies(srv)]:
        used |= set(b)
    assert openai_spec.request_properties() - used == set()
    roles = {m["role"] for m in MESSAGE_FORMS}
    assert roles == {"developer", "system", "user", "assistant", "tool", "function"}
    for m in MESSAGE_FORMS:  # and each one is one of the spec's message schemas
        conforms("CreateChatCompletionRequest", {"model": "m", "messages": [m]})


def test_documented_requests_get_conforming_responses(srv):
    for b in accepted_bodies(srv):
        r = post(srv, b)
        assert r.status_code == 200, (b, r.text)
        out = r.json()
        conforms("CreateChatCompletionResponse", out)
        n = b.get("n") or 1
        assert len(out["choices"]) == n
        for c in out["choices"]:
            assert c["message"]["refusal"] is None and c["finish_reason"] in ("stop", "length")
            if b.get("logprobs"):
                lp = c["logprobs"]["content"]
                assert lp and all(len(x["top_logprobs"]) == b["top_logprobs"] for x in lp)
                assert all(bytes(x["bytes"]).decode("utf-8", "replace") == x["token"] for x in lp)
            else:
                assert c["logprobs"] is None
        if b.get("logprobs"):  # one entry per generated token
            assert sum(len(c["logprobs"]["content"]) for c in out["choices"]) == out["usage"]["completion_tokens"]


def test_unimplemented_output_options_are_refused_by_name(srv):
    for b, param in refused_bodies(srv):
        r = post(srv, b)
        assert r.status_code == 400, (b, r.text)
        conforms("ErrorResponse", r.json())
        err = r.json()["error"]
        assert err["code"] == "unsupported_parameter" and err["param"] == param, (param, err)


def test_rerank_and_n_responses_conform(srv):
    b = body(srv, n=2, temperature=1.0, logprobs=True, top_logprobs=1)
    b["rerank"] = {"candidates": 3, "heads": ["h"], "return_candidates": True}
    r = post(srv, b)
    assert r.status_code == 200, r.text
    out = r.json()
    conforms("CreateChatCompletionResponse", out)
    info = out["rerank"]
    assert len(out["choices"]) == 2 and info["candidates_scored"] == 3 and len(info["chosen"]) == 2
    # The chosen candidates' log-probs come back with them.
    for c, idx in zip(out["choices"], info["chosen"]):
        cand = info["candidates"][idx]
        assert c["message"]["content"] == cand["text"]
        assert len(c["logprobs"]["content"]) == cand["completion_tokens"]


def _stream(srv, b: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=b, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        assert ln.startswith("data: ")
        chunks.append(json.loads(ln[len("data: "):]))
    return chunks


@pytest.mark.parametrize("rerank", [False, True])
def test_every_streamed_chunk_conforms_including_the_usage_chunk(srv, rerank):
    b = body(srv, n=2, stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=1)
    if rerank:
        b["rerank"] = {"candidates": 3, "heads": ["h"]}
    chunks = _stream(srv, b)
    for c in chunks:
        conforms("CreateChatCompletionStreamResponse", c)
    *body_chunks, last = chunks
    assert last["choices"] == [] and set(last["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert all(c["usage"] is None for c in body_chunks)  # "null except for the last chunk"
    finished = {ch["index"]: ch["finish_reason"] for c in body_chunks for ch in c["choices"] if ch["finish_reason"]}
    assert set(finished) == {0, 1} and set(finished.values()) <= {"stop", "length"}
    tokens = sum(len(ch["logprobs"]["content"]) for c in body_chunks for ch in c["choices"] if ch.get("logprobs"))
    if not rerank:  # every generated token's log-prob arrives exactly once
        assert tokens == last["usage"]["completion_tokens"]
    else:
        assert tokens > 0


def test_models_and_error_bodies_conform(srv):
    r = httpx.get(f"{srv.url}/v1/models", headers=AUTH)
    assert r.status_code == 200
    conforms("ListModelsResponse", r.json())
    r = httpx.get(f"{srv.url}/v1/models/{srv.model}", headers=AUTH)
    assert r.status_code == 200
    conforms("Model", r.json())
    errors = [
        (httpx.get(f"{srv.url}/v1/models/no-such-model", headers=AUTH), 404),
        (httpx.get(f"{srv.url}/v1/models"), 401),
        (post(srv, {"model": srv.model, "messages": []}), 400),
        (post(srv, {**body(srv), "model": "gpt-nope"}), 404),
        (post(srv, {**body(srv), "temperature": 3}), 400),
        (post(srv, {**body(srv), "logit_bias": {"not-a-token": 1}}), 400),
        (post(srv, {**body(srv), "rerank": {"heads": ["missing"]}}), 404),
        (httpx.post(f"{srv.url}/v1/chat/completions", content=b"{not json", headers={**AUTH, "content-type": "application/json"}), 400),
        (httpx.post(f"{srv.url}/v1/chat/completions", content=b"x" * 70000, headers={**AUTH, "content-type": "application/json"}), 413),
        (httpx.get(f"{srv.url}/v1/no-such-route", headers=AUTH), 404),
    ]
    for r, status in errors:
        assert r.status_code == status, r.text
        conforms("ErrorResponse", r.json())
