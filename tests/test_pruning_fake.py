"""Early rejection (``rerank.prune``) through the real app and a live server, with the scripted fake engine: every
partial and final reward is known, so which candidates a checkpoint drops, what the response reports and what the
selection rules then pick are checked exactly (docs/features.md "Pruning"). The fake prunes by the same
``PruneSpec.survivors`` rule as the HF engine (one character = one token); the HF engine's own pruning is tested on
the real model in tests/test_pruning_hf.py.

Script (head A reads feature[0]); checkpoint at 2 tokens:
  0 "aa-yes"   prefix "aa" 0.1   final 0.9
  1 "bb-no"    prefix "bb" 0.8   final 0.2
  2 "cc-yes"   prefix "cc" 0.5   final 0.5
  3 "d"        ends before the checkpoint   final 0.3
"""

from __future__ import annotations

import httpx
import openai
import pytest

from arbiter.testing import served as served_fake
from arbiter.testing.fakes import FakeEngine, Scripted, linear_head, registry_with

MODEL = "fake-backbone"
USER = [{"role": "user", "content": "pick one"}]
SCRIPT = (Scripted("aa-yes", (0.9, 0, 0, 0)), Scripted("bb-no", (0.2, 0, 0, 0)), Scripted("cc-yes", (0.5, 0, 0, 0)),
          Scripted("d", (0.3, 0, 0, 0)))
PREFIXES = {"aa": (0.1, 0, 0, 0), "bb": (0.8, 0, 0, 0), "cc": (0.5, 0, 0, 0)}


class NoPruneEngine(FakeEngine):
    prunes = False  # like the vLLM engine: no partial rewards from a decode loop


def served(engine: FakeEngine | None = None, **settings):
    return served_fake.served(engine or FakeEngine(SCRIPT, prefixes=PREFIXES), registry_with(linear_head("A", [1, 0, 0, 0])),
                              **settings)


def chat(srv, *, n: int = 1, stream: bool = False, **rerank) -> httpx.Response:
    body = {"model": MODEL, "messages": USER, "n": n, "max_tokens": 16, "stream": stream,
            "rerank": {"candidates": 4, "head": "A", **rerank}}
    return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=20)


def test_a_checkpoint_drops_the_weakest_prefixes_and_the_pick_comes_from_the_survivors():
    with served() as srv:
        plain = chat(srv).json()
        assert plain["choices"][0]["message"]["content"] == "aa-yes"  # unpruned, the best final reward wins
        r = chat(srv, prune={"at": [2], "keep": 0.5}, return_candidates=True)
        assert r.status_code == 200, r.text
        out = r.json()
        info = out["rerank"]
        # 3 live at 2 tokens ("d" already ended and survives): ceil(0.5 x 3) = 2 kept, prefix rewards 0.8 and 0.5;
        # "aa" (0.1) goes, although its answer would have scored best: that is the bet pruning makes.
        assert info["prune"] == {"at": [2], "keep": 0.5, "min_keep": 1,
                                 "checkpoints": [{"tokens": 2, "live": 3, "pruned": [0]}], "pruned": 1,
                                 "pruned_tokens": 2, "tokens_saved_estimate": 2}  # survivors' mean (5 + 6 + 1) / 3 = 4, less 2
        assert info["chosen"] == [2] and out["choices"][0]["message"]["content"] == "cc-yes"
        assert info["rewards"] == pytest.approx([0.5])
        assert info["candidates_scored"] == 3
        c = info["candidates"]
        assert [x["finish_reason"] for x in c] == ["pruned", "stop", "stop", "stop"]
        assert c[0]["text"] == "aa" and c[0]["rewards"] == {} and c[0]["pruned_at"] == 2
        assert [x["partial_rewards"] for x in c[:3]] == [[{"tokens": 2, "reward": pytest.approx(v)}] for v in (0.1, 0.8, 0.5)]
        assert c[3]["partial_rewards"] == [] and "pruned_at" not in c[3]
        assert [x["rewards"].get("A") for x in c[1:]] == pytest.approx([0.2, 0.5, 0.3])
        assert out["usage"]["completion_tokens"] == 2 + 5 + 6 + 1  # the work done: the pruned prefix included


def test_min_keep_and_n_bound_what_a_checkpoint_drops():
    with served() as srv:
        info = chat(srv, n=3, prune={"at": [2], "keep": 0.25}).json()["rerank"]
        # ceil(0.25 x 3) = 1, but 3 must survive and "d" is one: 2 of the 3 live go on.
        assert info["prune"]["checkpoints"] == [{"tokens": 2, "live": 3, "pruned": [0]}]
        assert info["chosen"] == [2, 3, 1]  # survivors by final reward: 0.5, 0.3, 0.2
        info = chat(srv, prune={"at": [2], "keep": 0.25, "min_keep": 4}).json()["rerank"]
        assert info["prune"]["pruned"] == 0 and info["chosen"] == [0]
        info = chat(srv, prune={"at": [2], "keep": 1}).json()["rerank"]  # keep 1: partial rewards recorded, none dropped
        assert info["prune"]["checkpoints"] == [{"tokens": 2, "live": 3, "pruned": []}] and info["chosen"] == [0]


def test_votes_count_only_the_survivors():
    with served() as srv:
        rule = {"select": "majority_vote", "extractor": "regex", "pattern": r"-(\w+)$"}
        # Unpruned: "yes" x2 (aa, cc) against "no" x1.
        assert chat(srv, **rule).json()["rerank"]["groups"][0]["answer"] == "yes"
        # keep 0.3 of 3 live -> ceil(0.9) = 1 (bb, prefix 0.8); "d" has no answer. "no" is the only answer left.
        info = chat(srv, prune={"at": [2], "keep": 0.3}, **rule).json()["rerank"]
        assert info["prune"]["checkpoints"][0]["pruned"] == [0, 2]
        assert [(g["answer"], g["votes"], g["candidates"]) for g in info["groups"]] == [("no", 1, [1])]
        assert info["chosen"] == [1]


def test_the_stream_of_a_pruned_rerank_carries_the_survivors_winner():
    with served() as srv:
        r = chat(srv, stream=True, prune={"at": [2], "keep": 0.5})
        text, rerank = "", None
        for line in r.text.splitlines():
            if line.startswith("data: {"):
                import json

                ev = json.loads(line[6:])
                for ch in ev["choices"]:
                    text += ch["delta"].get("content") or ""
                rerank = ev.get("rerank") or rerank
        assert text == "cc-yes" and rerank is not None and rerank["prune"]["pruned"] == 1


def test_the_server_default_prunes_requests_that_do_not_say_and_false_turns_it_off():
    with served(prune_at="2", prune_keep=0.5) as srv:
        info = chat(srv).json()["rerank"]
        assert info["prune"]["at"] == [2] and info["prune"]["checkpoints"][0]["pruned"] == [0]
        assert "prune" not in chat(srv, prune=False).json()["rerank"]
        # true: the server's schedule; an object's own fields win.
        assert chat(srv, prune=True).json()["rerank"]["prune"]["at"] == [2]
        frac = chat(srv, prune={"at_fraction": [0.125, 0.5]}).json()["rerank"]["prune"]  # of max_tokens 16
        assert frac["at"] == [2, 8] and frac["keep"] == 0.5


@pytest.mark.parametrize("prune, param", [
    ({"at": [8, 2]}, "rerank.prune.at"),
    ({"at": [0]}, "rerank.prune.at"),
    ({"at": [2], "at_fraction": [0.5]}, "rerank.prune"),
    ({"at_fraction": [1.5]}, "rerank.prune.at_fraction"),
    ({"keep": 0}, "rerank.prune.keep"),
    ({"keep": 1.5}, "rerank.prune.keep"),
    ({"min_keep": 1, "at": [2]}, "rerank.prune.min_keep"),  # n = 2 below
    ({"every": 3}, "rerank.prune.every"),
])
def test_bad_prune_options_are_400_naming_the_field(prune, param):
    with served() as srv:
        r = chat(srv, n=2, prune=prune)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param, err


def test_prune_with_adaptive_and_on_an_engine_that_cannot_are_refused():
    with served() as srv:
        r = chat(srv, prune=True, adaptive=True)
        assert r.status_code == 400 and r.json()["error"]["param"] == "rerank.prune"
    with served(NoPruneEngine(SCRIPT)) as srv:
        r = chat(srv, prune={"at": [2]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter", r.text
        assert chat(srv).status_code == 200  # without prune the engine serves as before


def test_the_openai_client_passes_prune_through_extra_body():
    with served() as srv:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=20)
        r = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=16,
                                      extra_body={"rerank": {"candidates": 4, "head": "A", "prune": {"at": [2]}}})
        assert r.choices[0].message.content == "cc-yes"
        assert r.rerank["prune"]["pruned"] == 1
