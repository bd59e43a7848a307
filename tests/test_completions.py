"""``POST /v1/completions`` (OpenAI's legacy completions) on the live app with the scripted fake engine: raw prompts
(string, strings, token ids), choice order, ``echo`` with the prompt's log-probs (the fake engine's known values),
``max_tokens: 0`` for log-likelihood scoring, ``best_of`` by mean log-prob per token (OpenAI's definition), refusals
by name; every response and request validated against OpenAI's published schemas; the official client."""

from __future__ import annotations

import copy

import httpx
import openai
import openai_spec
import pytest

from arbiter.service.app import create_app
from arbiter.service.settings import Settings
from arbiter.testing.fakes import DEFAULT_SCRIPT, FakeEngine, ServerThread, linear_head, registry_with

# best_of: per-character confidence c gives log-prob -1 / c, so the mean log-prob ranks charlie (4) > alpha (2) > ...
CONF = {"alpha": 2.0, "bravo": 0.5, "charlie": 4.0, "delta": 1.0}


@pytest.fixture(scope="module")
def srv():
    engine = FakeEngine(token_confidence={t: [c] * len(t) for t, c in CONF.items()})
    app = create_app(Settings(), engine=engine, heads=registry_with(linear_head("B", [0.0, 1.0, 0.0, 0.0])),
                     exit_on_engine_death=False)
    with ServerThread(app) as s:
        s.engine = engine
        yield s


def _post(srv, **body):
    body = {"model": "fake-backbone", **body}
    assert not openai_spec.violations("CreateCompletionRequest", body), body  # a documented request
    r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=20)
    if r.status_code == 200:
        out = copy.deepcopy(r.json())
        for c in out["choices"]:
            if body.get("echo") and c["logprobs"]:
                # The one place OpenAI's API (and vLLM) answer outside OpenAI's published schema: an echoed prompt's
                # first token has no log-prob (nothing predicts it), given as null, which the schema's number-only
                # item type does not allow; everything else must conform.
                assert c["logprobs"]["token_logprobs"][0] is None and c["logprobs"]["top_logprobs"][0] is None
                c["logprobs"]["token_logprobs"][0], c["logprobs"]["top_logprobs"][0] = 0.0, {}
        bad = openai_spec.violations("CreateCompletionResponse", out)
        assert not bad, bad
    return r


def _lp(ch: str) -> float:
    return -0.1 * (1 + ord(ch) % 5)  # the fake engine's prompt log-prob of a character token


def test_string_prompts_are_raw_text_and_choices_come_in_prompt_order(srv):
    r = _post(srv, prompt=["Once upon", "a time"], n=2, max_tokens=8).json()
    jobs = srv.engine.batches[-2:]
    assert [bytes(j[0].prompt_ids).decode() for j in jobs] == ["Once upon", "a time"]  # no chat template
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in r["choices"]] == ["alpha", "bravo", "alpha", "bravo"]
    assert r["object"] == "text_completion" and r["usage"]["prompt_tokens"] == len("Once upon") + len("a time")
    r = _post(srv, prompt=[72, 105], max_tokens=3).json()  # token ids: "Hi"
    assert srv.engine.batches[-1][0].prompt_ids == [72, 105] and r["choices"][0]["text"] == "alp"
    assert r["choices"][0]["finish_reason"] == "length"


def test_echo_with_logprobs_and_max_tokens_zero_scores_the_prompt(srv):
    """What lm-eval's log-likelihood requests send: the prompt back with each token's log-prob (None for the first)."""
    batches = len(srv.engine.batches)
    r = _post(srv, prompt="Yes.", max_tokens=0, echo=True, logprobs=1).json()
    c = r["choices"][0]
    assert c["text"] == "Yes." and len(srv.engine.batches) == batches  # nothing generated
    lp = c["logprobs"]
    assert lp["tokens"] == list("Yes.") and lp["text_offset"] == [0, 1, 2, 3]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([_lp(ch) for ch in "es."])
    assert lp["top_logprobs"][1] == {"e": pytest.approx(_lp("e"))}
    assert r["usage"]["completion_tokens"] == 0
    # echo without logprobs: the text only; with generation, the prompt then the completion
    r = _post(srv, prompt="Go: ", max_tokens=5, echo=True).json()
    assert r["choices"][0]["text"] == "Go: alpha" and r["choices"][0]["logprobs"] is None


def test_best_of_returns_the_highest_mean_logprob(srv):
    r = _post(srv, prompt="Pick", best_of=4, n=2, max_tokens=16).json()
    assert [c["text"] for c in r["choices"]] == ["charlie", "alpha"]  # mean log-prob -1/4 > -1/2 > -1 > -2
    assert srv.engine.batches[-1][0].n == 4 and r["usage"]["completion_tokens"] == sum(map(len, CONF))


@pytest.mark.parametrize("extra, param", [
    ({"stream": True}, "stream"), ({"suffix": "end"}, "suffix"), ({"best_of": 1, "n": 2}, "best_of"),
    ({"prompt": [999999999]}, "prompt"), ({"max_tokens": 100000}, "max_tokens"),
])
def test_what_cannot_be_served_is_refused_by_name(srv, extra, param):
    r = _post(srv, **{"prompt": "x", **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    for rr, param in (({"select": "majority_vote"}, "rerank.select"), ({"adaptive": True}, "rerank.adaptive"),
                      ({"heads": ["nope"]}, "rerank.heads"), ({"candidates": 3}, "rerank.candidates")):
        body = {"model": "fake-backbone", "prompt": "x", "rerank": rr, **({"best_of": 4} if "candidates" in rr else {})}
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=20)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


def test_rerank_and_best_of_pick_by_the_heads_reward(srv):
    """Arbiter's extension on legacy completions: best_of's candidates ranked by a head (argmax of its reward)
    instead of mean log-prob. Head B reads feature 1 of the scripted candidates: charlie 0.9 > bravo 0.2 >
    alpha 0.0 > delta -0.4 (mean log-prob would give charlie, alpha)."""
    want = {s.text: s.features[1] for s in DEFAULT_SCRIPT}
    for extra in ({"best_of": 4, "rerank": {"head": "B"}}, {"rerank": {"head": "B", "candidates": 4}}):
        r = _post(srv, prompt="Pick", n=2, max_tokens=16, **extra).json()
        assert [c["text"] for c in r["choices"]] == ["charlie", "bravo"]
        info = r["rerank"][0]
        assert info["heads"] == ["B"] and info["candidates_scored"] == 4 and info["chosen"] == [2, 1]
        assert [x["B"] for x in info["rewards"]] == pytest.approx([want[t] for t in ("alpha", "bravo", "charlie", "delta")])
    r = _post(srv, prompt=["One", "Two"], max_tokens=16, rerank={"head": "B", "candidates": 3,
                                                                 "return_candidates": True}).json()
    assert [c["text"] for c in r["choices"]] == ["charlie", "charlie"] and len(r["rerank"]) == 2
    assert r["rerank"][1]["prompt_index"] == 1 and r["rerank"][1]["texts"] == ["alpha", "bravo", "charlie"]


def test_the_official_client(srv):
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="fake-backbone", prompt="Hello", max_tokens=4, logprobs=1)
    assert r.choices[0].text == "alph" and r.choices[0].logprobs.tokens == list("alph")


@pytest.mark.integration
def test_echoed_prompt_logprobs_on_the_real_model_equal_a_standalone_forward(backbone):
    """The HF engine's prompt log-probs (one teacher-forced forward through the worker) against an independent
    plain forward of the model over the same token ids; a greedy completion continues with the model's argmax."""
    import torch

    from arbiter.generation.hf import HFEngine
    from arbiter.testing.served import served

    engine = HFEngine(backbone)
    text = "The capital of France is Paris. The capital of Italy is"
    ids = backbone.tokenizer(text, add_special_tokens=True)["input_ids"]
    with torch.inference_mode():
        logits = backbone.model(input_ids=torch.tensor([ids])).logits[0].float()
    want = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    with served(engine, registry_with()) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": backbone.name, "prompt": text, "max_tokens": 0,
                                                          "echo": True, "logprobs": 2}, timeout=120).json()
        lp = r["choices"][0]["logprobs"]
        assert r["choices"][0]["text"] == text and lp["token_logprobs"][0] is None
        got = lp["token_logprobs"][1:]
        assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) <= 1e-3 * max(1.0, max(map(abs, want)))
        assert all(len(t) == 2 for t in lp["top_logprobs"][1:])
        g = httpx.post(f"{srv.url}/v1/completions", json={"model": backbone.name, "prompt": text, "max_tokens": 1,
                                                          "temperature": 0}, timeout=120).json()
        assert backbone.tokenizer(g["choices"][0]["text"], add_special_tokens=False)["input_ids"][0] == int(logits[-1].argmax())
