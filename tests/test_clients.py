"""Real clients beyond the ``openai`` package against a live ``arbiter serve``: LangChain's ``ChatOpenAI``
(langchain-openai) and LiteLLM's ``completion`` (``openai/`` provider, custom ``api_base``). Each does a plain
call, a streamed call, a tool-message round trip, and passes the rerank extension through its own extra-body
mechanism; that the server really reranked is read from its Prometheus counter of scored candidates (neither
client keeps unknown response fields in the same place)."""

from __future__ import annotations

import os
import re

import httpx
import pytest

from arbiter.testing.fakes import ArbiterProcess, save_random_head

# LiteLLM fetches a model price list from the network at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

langchain_openai = pytest.importorskip("langchain_openai")
litellm = pytest.importorskip("litellm")
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402

KEY = "sk-clients"
QUESTION = "What is the weather in Paris?"
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                                "required": ["city"]}}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def srv(backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("client_heads")
    save_random_head(backbone.fingerprint, root / "helpful", name="helpful", seed=7)
    with ArbiterProcess(root, root.parent / "clients_server.log", env={"ARBITER_API_KEY": KEY}) as s:
        s.model = backbone.name
        yield s


def scored(srv) -> float:
    text = httpx.get(f"{srv.url}/metrics").text
    m = re.search(r"^arbiter_candidates_scored_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# --- LangChain -----------------------------------------------------------------------------------------


def chat_model(srv, **kw):
    return langchain_openai.ChatOpenAI(model=srv.model, base_url=f"{srv.url}/v1", api_key=KEY, max_tokens=6,
                                       temperature=0.8, seed=3, max_retries=0, timeout=120, **kw)


def test_langchain_plain_and_streaming(srv):
    out = chat_model(srv).invoke([HumanMessage("Name a colour.")])
    assert isinstance(out, AIMessage) and isinstance(out.content, str) and out.content
    assert out.response_metadata["finish_reason"] in ("stop", "length")
    assert out.usage_metadata["output_tokens"] >= 1
    parts = list(chat_model(srv, stream_usage=True).stream([HumanMessage("Name a colour.")]))
    assert len(parts) >= 3  # the role chunk, content deltas, the final chunk
    assert "".join(p.content for p in parts) == out.content  # same seed, same answer
    assert sum((p.usage_metadata or {}).get("output_tokens", 0) for p in parts) == out.usage_metadata["output_tokens"]


def test_langchain_tool_round_trip(srv):
    llm = chat_model(srv).bind_tools([WEATHER_TOOL])
    history = [
        HumanMessage(QUESTION),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}]),
        ToolMessage("18 C and sunny", tool_call_id="call_1"),
    ]
    out = llm.invoke(history)
    assert isinstance(out, AIMessage) and out.content and out.tool_calls == []


def test_langchain_rerank_through_extra_body(srv):
    before = scored(srv)
    out = chat_model(srv, extra_body={"rerank": {"candidates": 3, "heads": ["helpful"]}}).invoke([HumanMessage("Name a colour.")])
    assert out.content
    assert scored(srv) - before == 3


# --- LiteLLM -------------------------------------------------------------------------------------------


def complete(srv, **kw):
    return litellm.completion(model=f"openai/{srv.model}", api_base=f"{srv.url}/v1", api_key=KEY, max_tokens=6,
                              temperature=0.8, seed=3, num_retries=0, timeout=120, **kw)


def test_litellm_plain_and_streaming(srv):
    r = complete(srv, messages=[{"role": "user", "content": "Name a colour."}])
    text = r.choices[0].message.content
    assert isinstance(text, str) and text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1
    stream = complete(srv, messages=[{"role": "user", "content": "Name a colour."}], stream=True)
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(deltas) >= 2 and "".join(deltas) == text  # same seed, same answer


def test_litellm_tool_round_trip(srv):
    messages = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
    ]
    r = complete(srv, messages=messages, tools=[WEATHER_TOOL])
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_litellm_rerank_through_extra_body(srv):
    before = scored(srv)
    r = complete(srv, messages=[{"role": "user", "content": "Name a colour."}],
                 extra_body={"rerank": {"candidates": 4, "heads": ["helpful"], "return_candidates": True}})
    assert r.choices[0].message.content
    assert scored(srv) - before == 4
