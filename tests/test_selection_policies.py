"""Selection policies (``rerank.select``) and answer extractors, with exact expectations.

Pure functions first (``arbiter.service.rerank.select``, ``arbiter.answers``), worked by hand; then through the
real app and a live server with the scripted fake engine, whose rewards are known exactly.
"""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch

from arbiter.answers import extract_choice_letter, extract_json_field, extract_label_word, extractor
from arbiter.heads import SelectionRule
from arbiter.selection import select
from arbiter.testing.fakes import FakeEngine, Scripted, ServerThread, linear_head, registry_with

# Six candidates: answers 7, 7, 9, 9, 9 and one with no number. Rewards (head A = feature[0]):
TEXTS = ["so 7", "The answer is 7.", "it is 9", "9!", "answer: 9", "no idea"]
REWARDS = [2.0, 1.5, 0.1, 0.0, -0.5, 3.0]


def _r(values):
    return torch.tensor(values)[:, None]


def test_argmax_is_the_highest_reward_with_ties_to_the_lower_index():
    sel = select(_r([0.1, 0.5, 0.3, 0.5]), "argmax")
    assert sel.order == [1, 3, 2, 0] and sel.groups is None and sel.policy == "argmax"


def test_majority_vote_counts_answers_and_orders_members_by_reward():
    answers = [extractor("last_number")(t) for t in TEXTS]
    assert answers == ["7", "7", "9", "9", "9", None]
    sel = select(_r(REWARDS), "majority_vote", answers)
    # "9" has 3 votes of 5 answered, "7" has 2; the unanswered candidate 5 (highest reward) comes last.
    assert [g["answer"] for g in sel.groups] == ["9", "7"]
    assert [g["votes"] for g in sel.groups] == [3, 2]
    assert [g["weight"] for g in sel.groups] == pytest.approx([0.6, 0.4])
    assert sel.groups[0]["candidates"] == [2, 3, 4] and sel.order == [2, 3, 4, 0, 1, 5]


def test_weighted_vote_sums_softmax_weights_per_answer():
    answers = [extractor("last_number")(t) for t in TEXTS]
    sel = select(_r(REWARDS), "weighted_vote", answers)
    z = sum(math.exp(r) for r in REWARDS)
    w7 = (math.exp(2.0) + math.exp(1.5)) / z  # 0.4106...
    w9 = (math.exp(0.1) + math.exp(0.0) + math.exp(-0.5)) / z  # 0.1113...
    assert [g["answer"] for g in sel.groups] == ["7", "9"]  # fewer votes, more reward mass
    assert [g["weight"] for g in sel.groups] == pytest.approx([w7, w9], rel=1e-9)
    assert sel.order == [0, 1, 2, 3, 4, 5]


def test_vote_ties_go_to_the_group_with_the_better_best_member():
    # Two answers with one vote each: majority ties, the group whose member has the higher reward wins.
    sel = select(_r([0.2, 0.9]), "majority_vote", ["a", "b"])
    assert [g["answer"] for g in sel.groups] == ["b", "a"] and sel.order == [1, 0]
    # Nobody answered: the vote policies fall back to the argmax order, with no groups.
    sel = select(_r([0.2, 0.9, 0.5]), "weighted_vote", [None, None, None])
    assert sel.order == [1, 2, 0] and sel.groups == []


def test_extractors():
    assert extract_choice_letter("B. a bird") == "B" and extract_choice_letter("(c) x", 3) is None
    assert extract_choice_letter("I think the answer is C") == "C"
    assert extract_json_field('Sure: {"result": {"value": 42}} done', "result.value") == "42"
    assert extract_json_field('{"a": 1', "a") is None and extract_json_field("{\"a\": null}", "a") is None
    rx = extractor("regex", pattern=r"final: (\w+)")
    assert rx("the final: yes") == "yes" and rx("nothing") is None
    with pytest.raises(ValueError, match="exactly one capturing group"):
        extractor("regex", pattern=r"(a)(b)")
    catastrophic = extractor("regex", pattern=r"^(a+)+$")
    assert catastrophic("a" * 40 + "b") is None  # the match times out instead of hanging the server


# --- through the API -----------------------------------------------------------------------------------

SCRIPT = tuple(Scripted(t, (r, 0.0, 0.0, 0.0)) for t, r in zip(TEXTS, REWARDS))
MSG = [{"role": "user", "content": "what is it"}]


def _voter(name, rule):
    """Head A's weights with a selection rule of its own in its config."""
    module, cfg = linear_head(name, [1, 0, 0, 0])
    return module, cfg.model_copy(update={"selection": SelectionRule(**rule)})


@pytest.fixture(scope="module")
def srv():
    from arbiter.service.app import create_app
    from arbiter.service.settings import Settings

    heads = registry_with(linear_head("A", [1, 0, 0, 0]),
                          _voter("A_majority", {"select": "majority_vote", "extractor": "last_number"}),
                          _voter("A_weighted", {"select": "weighted_vote", "extractor": "regex", "pattern": r"(\d)"}))
    app = create_app(Settings(), engine=FakeEngine(SCRIPT), heads=heads, exit_on_engine_death=False)
    with ServerThread(app) as s:
        yield s


def _call(srv, **rerank):
    c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=20)
    return c.chat.completions.create(model="fake-backbone", messages=MSG, max_tokens=16,
                                     extra_body={"rerank": {"candidates": 6, **rerank}})


def test_api_argmax_majority_and_weighted_pick_what_the_policies_say(srv):
    r = _call(srv)
    assert r.choices[0].message.content == "no idea" and r.rerank["policy"] == "argmax" and "groups" not in r.rerank
    r = _call(srv, select="majority_vote", extractor="last_number")
    assert r.choices[0].message.content == "it is 9" and r.rerank["chosen"] == [2]
    assert r.rerank["policy"] == "majority_vote"
    assert [(g["answer"], g["votes"], g["candidates"]) for g in r.rerank["groups"]] == [("9", 3, [2, 3, 4]),
                                                                                      ("7", 2, [0, 1])]
    r = _call(srv, select="weighted_vote", extractor="last_number")
    assert r.choices[0].message.content == "so 7" and r.rerank["groups"][0]["answer"] == "7"
    assert r.rerank["rewards"] == pytest.approx([2.0])


def test_a_head_carries_its_rule_and_an_explicit_select_wins(srv):
    # Head A_majority's own rule (majority vote, last number) picks "it is 9" where argmax would pick "no idea".
    r = _call(srv, heads=["A_majority"])
    assert r.choices[0].message.content == "it is 9" and r.rerank["policy"] == "majority_vote"
    assert r.rerank["rule"] == {"select": "majority_vote", "extractor": "last_number", "source": "head"}
    # An explicit select wins over the head's rule; the extractor then still comes from the head.
    r = _call(srv, heads=["A_majority"], select="weighted_vote")
    assert r.choices[0].message.content == "so 7" and r.rerank["rule"]["source"] == "request"
    assert r.rerank["rule"]["extractor"] == "last_number"
    r = _call(srv, heads=["A_majority"], select="argmax")
    assert r.choices[0].message.content == "no idea" and r.rerank["rule"] == {"select": "argmax", "source": "request"}
    # The first head named picks, with its own rule; a head without one is argmax, source "default".
    r = _call(srv, heads=["A_weighted", "A"])
    assert r.rerank["rule"] == {"select": "weighted_vote", "extractor": "regex", "pattern": r"(\d)", "source": "head"}
    assert r.choices[0].message.content == "so 7"
    assert _call(srv, heads=["A"]).rerank["rule"] == {"select": "argmax", "source": "default"}
    # The rule is also applied to streamed rerank, and /v1/heads shows each head's rule.
    c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=20)
    chunks = list(c.chat.completions.create(model="fake-backbone", messages=MSG, max_tokens=16, stream=True,
                                            extra_body={"rerank": {"candidates": 6, "heads": ["A_majority"]}}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "it is 9"
    cards = {h["id"]: h for h in httpx.get(f"{srv.url}/v1/heads", timeout=10).json()["data"]}
    assert cards["A_majority"]["selection"] == {"select": "majority_vote", "extractor": "last_number"}
    assert cards["A"]["selection"] is None


def test_label_words_extractor_in_a_request(srv):
    assert extract_label_word("The sentiment is Positive, not negative.", ["negative", "positive"]) == "positive"
    assert extract_label_word("negatively", ["negative", "positive"]) is None  # whole words only
    assert extract_label_word("pos or neg?", ["negative", "positive"]) is None
    r = _call(srv, select="majority_vote", extractor="label_words", labels=["7", "9"])
    assert r.choices[0].message.content == "it is 9" and [g["answer"] for g in r.rerank["groups"]] == ["9", "7"]
    base = {"model": "fake-backbone", "messages": MSG, "max_tokens": 8}
    resp = httpx.post(f"{srv.url}/v1/chat/completions", timeout=10,
                      json={**base, "rerank": {"candidates": 4, "select": "majority_vote", "extractor": "label_words"}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "rerank.labels", resp.text


def test_a_head_rule_is_validated_when_the_config_is_read():
    with pytest.raises(ValueError, match="needs an extractor"):
        SelectionRule(select="weighted_vote")
    with pytest.raises(ValueError, match="capturing group"):
        SelectionRule(select="majority_vote", extractor="regex", pattern="(a)(b)")
    with pytest.raises(ValueError, match="labels"):
        SelectionRule(select="majority_vote", extractor="label_words")
    assert SelectionRule().describe() == {"select": "argmax"}


def test_api_regex_extractor_and_bad_vote_requests_are_400(srv):
    r = _call(srv, select="majority_vote", extractor="regex", pattern=r"(\d)")
    assert r.choices[0].message.content == "it is 9"
    url = f"{srv.url}/v1/chat/completions"
    base = {"model": "fake-backbone", "messages": MSG, "max_tokens": 8}
    for rerank, param in (({"select": "majority_vote"}, "rerank.extractor"),
                          ({"select": "weighted_vote", "extractor": "regex"}, "rerank.pattern"),
                          ({"select": "weighted_vote", "extractor": "regex", "pattern": "(unclosed"}, "rerank.pattern"),
                          ({"select": "majority_vote", "extractor": "json_field"}, "rerank.field")):
        resp = httpx.post(url, json={**base, "rerank": {"candidates": 4, **rerank}}, timeout=10)
        assert resp.status_code == 400, (rerank, resp.text)
        assert resp.json()["error"]["param"] == param
    resp = httpx.post(url, json={**base, "rerank": {"select": "best"}}, timeout=10)
    assert resp.status_code == 400


# --- adaptive N under a budget ----------------------------------------------------------------------------
# Candidates come in the script's order (round r continues at candidate 2r): rewards 2.0, 1.5 | 0.1, 0.0 | -0.5, 3.0;
# the fake tokenizer is one token per character, so "so 7" + "The answer is 7." are 4 + 16 = 20 tokens.


def _post(srv, rerank, headers=None, **kw):
    body = {"model": "fake-backbone", "messages": MSG, "max_tokens": 16, "rerank": {"candidates": 6, **rerank}, **kw}
    return httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=headers or {}, timeout=20)


def test_adaptive_argmax_stops_once_the_margin_is_reached(srv):
    r = _post(srv, {"adaptive": {"round": 2, "margin": 0.4}, "return_candidates": True}).json()
    assert r["rerank"]["adaptive"] == {"rounds": 1, "stopped": "settled", "candidates": 2, "max_candidates": 6}
    assert r["choices"][0]["message"]["content"] == "so 7" and r["usage"]["completion_tokens"] == 20
    assert [c["text"] for c in r["rerank"]["candidates"]] == TEXTS[:2]
    # margin 1.0 is never beaten (3.0 - 2.0 is not > 1.0): all three rounds run and the best of six wins.
    r = _post(srv, {"adaptive": {"round": 2, "margin": 1.0}}).json()
    assert r["rerank"]["adaptive"] == {"rounds": 3, "stopped": "max_candidates", "candidates": 6, "max_candidates": 6}
    assert r["choices"][0]["message"]["content"] == "no idea" and r["rerank"]["chosen"] == [5]
    assert r["usage"]["completion_tokens"] == sum(len(t) for t in TEXTS)


def test_adaptive_vote_stops_at_a_supermajority_and_tokens_saved_are_counted(srv):
    before = _saved(srv)
    r = _post(srv, {"adaptive": True, "select": "majority_vote", "extractor": "last_number"}).json()
    # Round 1: "7" and "7": 2 of 2 answered votes >= 0.75.
    assert r["rerank"]["adaptive"]["stopped"] == "settled" and r["rerank"]["adaptive"]["candidates"] == 2
    assert r["rerank"]["groups"][0] == {"answer": "7", "votes": 2, "weight": 1.0, "candidates": [0, 1]}
    assert _saved(srv) - before == pytest.approx((6 - 2) * 20 / 2)


def test_budgets_cap_candidates_and_tokens(srv):
    r = _post(srv, {"adaptive": {"margin": 5.0}}, headers={"X-Arbiter-Budget": "tokens=10"}).json()
    assert r["rerank"]["adaptive"] == {"rounds": 1, "stopped": "token_budget", "candidates": 2, "max_candidates": 6}
    r = _post(srv, {"budget": {"candidates": 4}}).json()
    assert r["rerank"]["candidates_scored"] == 4
    r = _post(srv, {"budget": {"candidates": 4}}, headers={"X-Arbiter-Budget": "candidates=3"}).json()
    assert r["rerank"]["candidates_scored"] == 3  # the header overrides the body
    r = _post(srv, {}, headers={"X-Arbiter-Budget": "tokens=40"}).json()
    assert r["rerank"]["candidates_scored"] == 2  # 40 tokens // max_tokens 16
    for headers, rerank, kw, param in (({"X-Arbiter-Budget": "tokens=lots"}, {}, {}, "X-Arbiter-Budget"),
                                       ({}, {"adaptive": True}, {"stream": True}, "rerank.adaptive"),
                                       ({}, {"budget": {"candidates": 1}}, {"n": 2}, "rerank.budget")):
        resp = _post(srv, rerank, headers, **kw)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def _saved(srv) -> float:
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    line = next(ln for ln in text.splitlines() if ln.startswith("arbiter_adaptive_tokens_saved_total"))
    return float(line.split()[-1])
