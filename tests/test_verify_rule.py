"""Answer-level verification (``select: "verify"``, README "Verifying answers"), with hand-computed expectations.

Pure functions first (canonical templates, lettered options, the policy), then through the real app and a live
server with the scripted fake engine: candidates' features are known, and so are those of the canonical answers
the verify pass scores (the fake engine's ``prefixes``), so every reward below is worked by hand.
"""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch

from arbiter.answers import check_canonical, listed_options, render_canonical
from arbiter.heads import SelectionRule
from arbiter.selection import AdaptiveRule, VerifyWeights, select, settled
from arbiter.service.app import create_app
from arbiter.service.settings import Settings
from arbiter.testing.fakes import FakeEngine, Scripted, ServerThread, linear_head, registry_with

# --- canonical forms ----------------------------------------------------------------------------------------


def test_canonical_templates_are_checked_and_rendered():
    check_canonical("{answer}", "label_words")
    check_canonical("Answer: {answer}. {option}", "choice_letter")
    for bad, kind in (("{x}", "label_words"), ("{answer!r}", "label_words"), ("{answer:>4}", "label_words"),
                      ("no field", "label_words"), ("{option}", "label_words"), ("{answer", "label_words")):
        with pytest.raises(ValueError):
            check_canonical(bad, kind)
    opts = ["red", "blue", "green"]
    assert render_canonical("{answer}. {option}", "B", opts) == "B. blue"
    assert render_canonical("{answer}. {option}", "D", opts) is None  # no option D listed: cannot be verified
    assert render_canonical("{answer}. {option}", "B", None) is None
    assert render_canonical("The answer is {answer}.", "positive") == "The answer is positive."
    assert render_canonical("{{literal}} {answer}", "7") == "{literal} 7"


def test_lettered_options_are_read_from_the_prompt():
    prompt = "Which is a colour?\n\nA. red\nB. a dog\nC) ten  \n(D) 4\n\nAnswer with the letter and the option."
    assert listed_options(prompt) == ["red", "a dog", "ten", "4"]
    # The last run of A, B, ... wins (an example listing before the question is not the question's).
    assert listed_options("A. x\nB. y\n\nQ?\nA. one\nB. two\nC. three") == ["one", "two", "three"]
    assert listed_options("no options here") == []
    assert listed_options("A. only one") == []  # one option is no listing
    assert listed_options("A. a\nC. c") == []  # letters must follow in order


def test_a_head_rule_with_verify_needs_a_usable_template():
    with pytest.raises(ValueError, match="canonical"):
        SelectionRule(select="verify", extractor="label_words", labels=["no", "yes"])
    with pytest.raises(ValueError, match="choice_letter"):
        SelectionRule(select="verify", extractor="label_words", labels=["no", "yes"], canonical="{option}")
    r = SelectionRule(select="verify", extractor="choice_letter", canonical="{answer}. {option}", vote_weight=0.5)
    assert r.describe() == {"select": "verify", "extractor": "choice_letter", "canonical": "{answer}. {option}",
                            "vote_weight": 0.5, "text_weight": 0.0}
    assert "vote_weight" not in SelectionRule(select="majority_vote", extractor="last_number").describe()


# --- the policy ------------------------------------------------------------------------------------------------
# Five candidates: answers yes, yes, no, None, no; text rewards 2.0, 1.0, 0.5, 9.0, -1.0.
ANSWERS = ["yes", "yes", "no", None, "no"]
TEXT_R = torch.tensor([2.0, 1.0, 0.5, 9.0, -1.0])[:, None]


def test_verify_ranks_answers_by_their_canonical_reward():
    sel = select(TEXT_R, "verify", ANSWERS, {"yes": -0.3, "no": 0.4})
    assert sel.order == [2, 4, 0, 1, 3]  # group "no" first (members by text reward), unanswered last
    assert [(g["answer"], g["canonical_reward"], g["score"]) for g in sel.groups] == [("no", 0.4, 0.4),
                                                                                     ("yes", -0.3, -0.3)]
    # vote weight: three "yes" and two "no" votes
    sel = select(torch.tensor([2.0, 1.0, 0.5, 0.7, -1.0])[:, None], "verify", ["yes", "yes", "no", "yes", "no"],
                 {"yes": -0.3, "no": 0.4}, VerifyWeights(vote=2.0))
    yes, no = -0.3 + 2.0 * 3 / 5, 0.4 + 2.0 * 2 / 5  # 0.9 vs 1.2
    assert sel.groups[0]["answer"] == "no" and sel.groups[0]["score"] == pytest.approx(no)
    assert sel.groups[1]["score"] == pytest.approx(yes)
    sel = select(torch.tensor([2.0, 1.0, 0.5, 0.7, -1.0])[:, None], "verify", ["yes", "yes", "no", "yes", "no"],
                 {"yes": -0.3, "no": 0.4}, VerifyWeights(vote=4.0))
    assert sel.groups[0]["answer"] == "yes"  # -0.3 + 2.4 = 2.1 vs 0.4 + 1.6 = 2.0
    # text weight: the group's best member's text reward joins the score: yes -0.3 + 0.5 x 2.0 = 0.7 > 0.4 + 0.25
    sel = select(TEXT_R, "verify", ANSWERS, {"yes": -0.3, "no": 0.4}, VerifyWeights(text=0.5))
    assert sel.order[0] == 0 and sel.groups[0]["score"] == pytest.approx(0.7)
    # An answer that could not be rendered ranks after every verified one, whatever its votes.
    sel = select(TEXT_R, "verify", ["yes", "yes", "yes", None, "no"], {"yes": None, "no": -5.0})
    assert sel.order[0] == 4 and sel.groups[1]["score"] == -math.inf
    # No answer at all: argmax, as for the vote policies.
    assert select(TEXT_R, "verify", [None] * 5, {}).order[0] == 3
    with pytest.raises(ValueError, match="canonical reward"):
        select(TEXT_R, "verify", ANSWERS)


def test_verify_settles_when_the_leading_answer_is_clear():
    rule = AdaptiveRule(round=2, margin=0.5)
    two = torch.tensor([1.0, 0.0])[:, None]
    assert settled(two, "verify", ["yes", "yes"], rule, {"yes": 0.1})  # one answer, two votes
    assert not settled(two, "verify", ["yes", None], rule, {"yes": 0.1})  # one vote is not settled
    assert settled(two, "verify", ["yes", "no"], rule, {"yes": 1.0, "no": 0.4})  # 0.6 > 0.5
    assert not settled(two, "verify", ["yes", "no"], rule, {"yes": 0.8, "no": 0.4})
    assert not settled(two, "verify", ["yes", "yes"], rule, {"yes": None})  # nothing verified


# --- through the API, on the fake engine ---------------------------------------------------------------------
# Candidates (head A reads feature[0]): text rewards 3.0, 2.0, 1.0, 0.5, 4.0. Canonical answers' features
# (the fake engine's known texts): "positive" -> A 0.2, "negative" -> A 0.9; "B. blue" -> 0.7, "A. red" -> 0.1.
SCRIPT = [Scripted("Positive, clearly.", (3.0, 0, 0, 0)), Scripted("Positive.", (2.0, 0, 0, 0)),
          Scripted("It reads negative", (1.0, 0, 0, 0)), Scripted("NEGATIVE!", (0.5, 0, 0, 0)),
          Scripted("hmm", (4.0, 0, 0, 0))]
KNOWN = {"positive": (0.2, 0, 0, 0), "negative": (0.9, 0, 0, 0), "A. red": (0.1, 0, 0, 0), "B. blue": (0.7, 0, 0, 0),
         "C. green": (0.3, 0, 0, 0)}
SENT = {"select": "verify", "extractor": "label_words", "labels": ["negative", "positive"], "canonical": "{answer}"}


@pytest.fixture(scope="module")
def srv():
    heads = registry_with(linear_head("A", [1, 0, 0, 0]),
                          _with_rule(linear_head("V", [1, 0, 0, 0]), SENT),
                          _with_rule(linear_head("W", [1, 0, 0, 0]), {**SENT, "vote_weight": 1.0}))
    engine = FakeEngine(SCRIPT, prefixes=KNOWN)
    app = create_app(Settings(), engine=engine, heads=heads, exit_on_engine_death=False)
    with ServerThread(app) as s:
        s.engine = engine
        yield s


def _with_rule(head, rule):
    module, cfg = head
    return module, cfg.model_copy(update={"selection": SelectionRule(**rule)})


def _post(srv, rerank, messages=None, **kw):
    body = {"model": "fake-backbone", "messages": messages or [{"role": "user", "content": "Sentiment?"}],
            "max_tokens": 32, "rerank": {"candidates": 5, "return_candidates": True, **rerank}, **kw}
    return httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=20)


def test_api_verify_picks_the_best_verified_answer_and_reports_each_group(srv):
    r = _post(srv, {"heads": ["V"]}).json()
    info = r["rerank"]
    # negative (0.9) beats positive (0.2): the best member of "negative" by text reward is candidate 2 (1.0 > 0.5),
    # although argmax (candidate 4, "hmm", 4.0) and majority (a 2-2 tie broken by the best member: positive) differ.
    assert r["choices"][0]["message"]["content"] == "It reads negative" and info["chosen"] == [2]
    assert info["policy"] == "verify"
    assert info["rule"] == {"select": "verify", "extractor": "label_words", "labels": ["negative", "positive"],
                            "canonical": "{answer}", "vote_weight": 0.0, "text_weight": 0.0, "source": "head"}
    assert [(g["answer"], g["canonical"], g["votes"], g["candidates"]) for g in info["groups"]] == [
        ("negative", "negative", 2, [2, 3]), ("positive", "positive", 2, [0, 1])]
    assert [g["canonical_reward"] for g in info["groups"]] == pytest.approx([0.9, 0.2])
    assert [g["score"] for g in info["groups"]] == pytest.approx([0.9, 0.2])
    # The extra forward: two distinct answers after the prompt they share (run once), each with its closing token.
    p = r["usage"]["prompt_tokens"]
    want = p + (len("negative") + 1) + (len("positive") + 1)
    assert info["verify"]["answers_scored"] == 2 and info["verify"]["tokens"] == want
    assert r["usage"]["verify_tokens"] == want
    assert r["usage"]["total_tokens"] == p + r["usage"]["completion_tokens"]
    maj = _post(srv, {"heads": ["A"], "select": "majority_vote", "extractor": "label_words",
                      "labels": ["negative", "positive"]}).json()
    assert maj["rerank"]["chosen"] == [0]  # the free rule picks the other answer here
    assert "verify_tokens" not in maj["usage"] and "verify" not in maj["rerank"]


def test_api_verify_from_a_request_and_the_head_weights(srv):
    # Head A has no rule: the request brings the whole verify rule; weights are 0 (A fitted none).
    r = _post(srv, {"heads": ["A"], **SENT}).json()
    assert r["rerank"]["chosen"] == [2] and r["rerank"]["rule"]["source"] == "request"
    # Head W adds 1.0 x vote share (2/4 each): the ranking stays; scores move by 0.5.
    r = _post(srv, {"heads": ["W"]}).json()
    assert [g["score"] for g in r["rerank"]["groups"]] == pytest.approx([1.4, 0.7])
    # n=3: the winning group's members first, then the next group's, best text reward first.
    r = _post(srv, {"heads": ["V"]}, n=3).json()
    assert r["rerank"]["chosen"] == [2, 3, 0]


def test_api_verify_lettered_options_from_the_prompt_or_choices(srv):
    mc = [Scripted("B. blue", (0.0, 0, 0, 0)), Scripted("A) red", (5.0, 0, 0, 0)), Scripted("The answer is C", (1.0, 0, 0, 0)),
          Scripted("E. nothing", (9.0, 0, 0, 0))]
    heads = registry_with(linear_head("A", [1, 0, 0, 0]))
    engine = FakeEngine(mc, prefixes=KNOWN)
    app = create_app(Settings(), engine=engine, heads=heads, exit_on_engine_death=False)
    rule = {"heads": ["A"], "select": "verify", "extractor": "choice_letter", "canonical": "{answer}. {option}",
            "candidates": 4}
    question = [{"role": "user", "content": "Which is blue?\n\nA. red\nB. blue\nC. green\n\nAnswer with the letter."}]
    with ServerThread(app) as s:
        r = _post(s, rule, messages=question).json()
        groups = {g["answer"]: g for g in r["rerank"]["groups"]}
        assert r["rerank"]["chosen"][0] == 0  # "B. blue" 0.7 > "C. green" 0.3 > "A. red" 0.1; E is not listed
        assert groups["B"]["canonical"] == "B. blue" and groups["B"]["canonical_reward"] == pytest.approx(0.7)
        assert groups["C"]["canonical_reward"] == pytest.approx(0.3)
        # An answer naming no listed option is not verifiable: its group carries no canonical form, reward or score.
        assert not {"canonical", "canonical_reward", "score"} & set(groups["E"])
        assert r["rerank"]["groups"][-1]["answer"] == "E"
        assert r["rerank"]["verify"]["answers_scored"] == 3
        # rerank.choices instead of a listing in the prompt: the same ranking.
        r2 = _post(s, {**rule, "choices": ["red", "blue", "green"]},
                   messages=[{"role": "user", "content": "Which is blue? Answer with the letter."}]).json()
        assert r2["rerank"]["chosen"] == r["rerank"]["chosen"]
        # Neither: a 400 naming rerank.choices, before any generation.
        batches = len(engine.batches)
        bad = _post(s, rule, messages=[{"role": "user", "content": "Which is blue?"}])
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "rerank.choices", bad.text
        assert len(engine.batches) == batches


def test_api_verify_streams_adapts_and_refuses_what_cannot_work(srv):
    c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=20)
    chunks = list(c.chat.completions.create(
        model="fake-backbone", messages=[{"role": "user", "content": "Sentiment?"}], max_tokens=32, stream=True,
        stream_options={"include_usage": True}, extra_body={"rerank": {"candidates": 5, "heads": ["V"]}}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "It reads negative"
    assert chunks[-1].usage.model_extra["verify_tokens"] > 0
    # Adaptive: round 1 (candidates 0, 1) finds only "positive" twice: settled on the only answer found.
    r = _post(srv, {"heads": ["V"], "adaptive": {"round": 2, "margin": 0.5}}).json()
    assert r["rerank"]["adaptive"]["stopped"] == "settled" and r["rerank"]["adaptive"]["candidates"] == 2
    # round 3 needed when the margin is larger than 0.7 (0.9 - 0.2) cannot settle: all 5 sampled, verified once each.
    r = _post(srv, {"heads": ["V"], "adaptive": {"round": 3, "margin": 1.0}}).json()
    assert r["rerank"]["adaptive"]["candidates"] == 5 and r["rerank"]["chosen"] == [2]
    assert r["rerank"]["verify"]["answers_scored"] == 2
    for rerank, param in (({"heads": ["A"], "select": "verify", "extractor": "label_words", "labels": ["a", "b"]},
                           "rerank.canonical"),  # head A carries no canonical form
                          ({"heads": ["A"], **SENT, "canonical": "{option}"}, "rerank.canonical"),
                          ({"heads": ["A"], **SENT, "canonical": "{nope}"}, "rerank.canonical"),
                          ({"heads": ["V"], "prune": True}, "rerank.prune"),
                          ({"heads": ["A"], "select": "verify", "canonical": "{answer}"}, "rerank.extractor")):
        resp = _post(srv, rerank)
        assert resp.status_code == 400, (rerank, resp.text)
        assert resp.json()["error"]["param"] == param, resp.text
