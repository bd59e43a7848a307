"""vLLM's chat extras as vLLM means them, on the live app with the scripted fake engine: ``continue_final_message``
continues the last assistant message (the prompt is the template of the earlier messages, the assistant header and
that text, not closed: checked against the fake tokenizer's own chat template), in plain and rerank requests; the
extras that would change the answer are honoured or refused by name, never ignored; ``extra_body: {}`` sent
literally stays harmless."""

from __future__ import annotations

import httpx
import pytest

from arbiter.testing.fakes import FakeTokenizer

CONVO = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My favourite colour is"}]


@pytest.fixture(scope="module")
def srv(fake_srv):
    return fake_srv


def _post(srv, **body):
    return httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "fake-backbone", "max_tokens": 8, **body}, timeout=20)


@pytest.mark.parametrize("rerank", [None, {"candidates": 3, "heads": ["A"]}])
def test_continue_final_message_continues_the_assistant_text(srv, rerank):
    r = _post(srv, messages=CONVO, continue_final_message=True, add_generation_prompt=False,
              **({"rerank": rerank} if rerank else {}))
    assert r.status_code == 200, r.text
    job = srv.engine.batches[-1][0]
    want = FakeTokenizer().apply_chat_template(CONVO[:1], add_generation_prompt=True) + CONVO[1]["content"]
    assert FakeTokenizer().decode(job.prompt_ids) == want  # no <|im_end|> after the text, no new assistant header
    assert job.n == (3 if rerank else 1)
    # the same conversation without continuation starts a new turn after the closed assistant message
    assert _post(srv, messages=CONVO).status_code == 200
    plain = FakeTokenizer().decode(srv.engine.batches[-1][0].prompt_ids)
    assert plain.endswith("My favourite colour is<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("extra, param", [
    ({"continue_final_message": True}, "continue_final_message"),  # add_generation_prompt stays true: vLLM refuses too
    ({"continue_final_message": True, "add_generation_prompt": False, "messages": CONVO[:1]}, "continue_final_message"),
    ({"add_generation_prompt": False}, "add_generation_prompt"),
    ({"top_k": 40}, "top_k"),
    ({"repetition_penalty": 1.3}, "repetition_penalty"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"ignore_eos": True}, "ignore_eos"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
])
def test_extras_that_change_the_answer_are_refused_by_name(srv, extra, param):
    batches = len(srv.engine.batches)
    r = _post(srv, **{"messages": CONVO[:1], **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]
    assert len(srv.engine.batches) == batches  # refused before any work


def test_neutral_values_of_those_extras_and_a_literal_extra_body_are_harmless(srv):
    r = _post(srv, messages=CONVO[:1], top_k=-1, repetition_penalty=1.0, min_p=0.0, skip_special_tokens=True,
              ignore_eos=False, extra_body={}, priority=0)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_include_stop_str_in_output_keeps_the_stop_string(srv, route):
    """vLLM's include_stop_str_in_output (its_hub's step search sends it): the scripted "alpha" stopped at "ph" is
    "al" without it and "alph" with it; the earliest stop string wins, the longest of those starting there."""
    body = {"model": "fake-backbone", "max_tokens": 8, "stop": ["ph", "p", "a!"],
            **({"messages": CONVO[:1]} if "chat" in route else {"prompt": "Name a colour."})}
    def text(r):
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        return c["message"]["content"] if "chat" in route else c["text"]
    assert text(httpx.post(srv.url + route, json=body, timeout=20)) == "al"
    assert text(httpx.post(srv.url + route, json={**body, "include_stop_str_in_output": True}, timeout=20)) == "alph"
