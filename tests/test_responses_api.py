"""``POST /v1/responses`` on the live app with the scripted fake engine: text and message-item input with
``instructions`` reach the engine as the chat encoding of the same conversation; the Response object and every
streamed event validate against OpenAI's published schemas (``Response``, ``ResponseStreamEvent``); the ``rerank``
extension rides along; what this server cannot do (stored responses, JSON formats, images, tool forcing) is a 400
naming the field; the official client's ``responses.create`` (plain and streamed) reads it."""

from __future__ import annotations

import json

import httpx
import openai
import openai_spec
import pytest

from arbiter.testing.fakes import FakeTokenizer


@pytest.fixture(scope="module")
def srv(fake_srv):
    return fake_srv


def _post(srv, **body):
    body = {"model": "fake-backbone", **body}
    return httpx.post(f"{srv.url}/v1/responses", json=body, timeout=20)


EVENT_SCHEMA = {t: name for name, sch in openai_spec.components()["schemas"].items() if name.endswith("Event")
                for t in (sch.get("properties", {}).get("type", {}).get("enum") or [])}


def _conforms(schema: str, instance) -> None:
    extra = {k: instance.pop(k) for k in ("rerank",) if k in instance}  # Arbiter's extension field
    bad = openai_spec.violations(schema, instance)
    instance.update(extra)
    assert not bad, bad


def test_text_input_with_instructions_is_the_chat_conversation(srv):
    r = _post(srv, input="Name a colour.", instructions="Be brief.", max_output_tokens=32)
    assert r.status_code == 200, r.text
    out = r.json()
    _conforms("Response", out)
    assert out["object"] == "response" and out["status"] == "completed" and out["id"].startswith("resp_")
    assert out["output"][0]["content"][0]["text"] == "alpha" and out["usage"]["output_tokens"] == 5
    want = FakeTokenizer().apply_chat_template([{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Name a colour."}])
    assert FakeTokenizer().decode(srv.engine.batches[-1][0].prompt_ids) == want
    # message items with text parts; max_output_tokens cuts: an incomplete response, saying why
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
             {"role": "user", "content": "Again?"}]
    out = _post(srv, input=items, max_output_tokens=3).json()
    _conforms("Response", out)
    assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": "max_output_tokens"}
    assert out["output"][0]["content"][0]["text"] == "alp"
    assert "<|im_start|>assistant\nHello.<|im_end|>" in FakeTokenizer().decode(srv.engine.batches[-1][0].prompt_ids)


def test_rerank_rides_along(srv):
    out = _post(srv, input="Pick one.", rerank={"candidates": 4, "heads": ["A"], "return_candidates": True}).json()
    assert out["rerank"]["chosen"] == [1] and out["output"][0]["content"][0]["text"] == "bravo"  # head A: 0.5 first
    _conforms("Response", out)


@pytest.mark.parametrize("rerank", [None, {"candidates": 3, "heads": ["A"]}])
def test_streamed_events_conform_and_carry_the_text(srv, rerank):
    body = {"model": "fake-backbone", "input": "Name a colour.", "stream": True, **({"rerank": rerank} if rerank else {})}
    with httpx.stream("POST", f"{srv.url}/v1/responses", json=body, timeout=20) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for e in events:  # each against its own event schema of the ResponseStreamEvent union (clearer errors)
        _conforms(EVENT_SCHEMA[e["type"]], e)
        _conforms("ResponseStreamEvent", e)
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == events[-1]["response"]["output"][0]["content"][0]["text"] == ("bravo" if rerank else "alpha")


@pytest.mark.parametrize("extra, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"text": {"format": {"type": "json_object"}}}, "text.format"),  # the fake engine does not constrain decoding
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "strin"}}}}, "text.format.schema"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x.invalid/a.png"}]}]},
     "input.0.content.0"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input.0"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"input": []}, "input"),
])
def test_what_cannot_be_served_is_refused_by_name(srv, extra, param):
    r = _post(srv, **{"input": "x", **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_the_official_client_plain_and_streamed(srv):
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    r = client.responses.create(model="fake-backbone", input="Name a colour.", instructions="Be brief.")
    assert r.output_text == "alpha" and r.status == "completed"
    with client.responses.stream(model="fake-backbone", input="Name a colour.") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "alpha"
