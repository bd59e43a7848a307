"""lm-eval 0.4.13's own API models against a live server, unpatched, on local task files (README, "Evaluating with
lm-eval"):

- ``local-completions`` on a multiple-choice log-likelihood task (20 ARC-Challenge items, each option scored by the
  summed log-prob of its tokens after the question, through ``/v1/completions`` with ``echo``): its ``acc`` must
  equal the project's own ``arbiter eval choice`` summed-log-prob accuracy on the same items and the same model,
  an independent computation (one padded forward per batch, no server). lm-eval finds the server's tokenizer by
  itself through vLLM's ``/tokenizer_info`` and ``/tokenize``, which this server serves.
- ``local-chat-completions`` on a generation task, plain and with ``rerank`` passed through ``gen_kwargs``, on the
  scripted fake engine (whose answers and rewards are known).
"""

from __future__ import annotations

import json

import pytest

from arbiter.testing.fakes import DEFAULT_SCRIPT, FakeEngine, linear_head, registry_with
from arbiter.testing.served import served

lm_eval = pytest.importorskip("lm_eval")


def _task(tmp, name: str, rows: list[dict], **cfg) -> None:
    data = tmp / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", f"  data_files: {{test: {json.dumps(str(data))}}}",
             "test_split: test"] + [f"{k}: {json.dumps(v)}" for k, v in cfg.items()]
    (tmp / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def _run(tmp, model: str, url: str, name: str, **kw) -> dict:
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args={"model": kw.pop("model_id"), "base_url": url,
                                                           "num_concurrent": 1, "max_retries": 1},
                                  tasks=[name], task_manager=TaskManager(include_path=str(tmp)), **kw)
    assert out is not None
    return out["results"][name]


@pytest.mark.integration
def test_local_completions_loglikelihood_accuracy_equals_eval_choice(backbone, tmp_path, monkeypatch):
    from arbiter.chat import prompt_ids
    from arbiter.generation.hf import HFEngine
    from arbiter.testing.fakes import save_random_head
    from arbiter.training.data import load_choices
    from arbiter.training.evaluate import eval_choice

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    save_random_head(backbone.fingerprint, tmp_path / "head", name="rand", seed=0)
    mine = eval_choice(head=str(tmp_path / "head"), data="arc_challenge", limit=20, seed=0, backbone=backbone,
                       out=str(tmp_path / "eval"), progress=False)
    questions, _ = load_choices("arc_challenge", limit=20, seed=0)
    tok = backbone.tokenizer
    # The items as lm-eval sees them: the chat-rendered question as context, each option closed by the end-of-turn
    # token as a continuation (what eval choice scores: arbiter.chat.prompt_ids / answer_ids).
    rows = [{"context": tok.decode(prompt_ids(tok, q.prompt)), "options": [o + "<|im_end|>" for o in q.options],
             "gold": q.answer} for q in questions]
    _task(tmp_path, "arbiter_arc", rows, output_type="multiple_choice", doc_to_text="{{context}}",
          doc_to_choice="{{options}}", doc_to_target="{{gold}}", target_delimiter="",
          metric_list=[{"metric": "acc"}])
    with served(HFEngine(backbone), registry_with()) as srv:
        got = _run(tmp_path, "local-completions", f"{srv.url}/v1/completions", "arbiter_arc", model_id=backbone.name)
    assert mine["n"] == 20
    assert got["acc,none"] == pytest.approx(mine["logprob_sum_accuracy"], abs=1e-9), (got, mine)


@pytest.fixture(scope="module")
def fake():
    with served(FakeEngine(), registry_with(linear_head("B", [0.0, 1.0, 0.0, 0.0]))) as s:
        yield s


def test_local_chat_completions_generation_plain_and_reranked(fake, tmp_path):
    rows = [{"question": "Name a colour.", "plain": "alpha", "best": "charlie"}]
    best = max(DEFAULT_SCRIPT, key=lambda s: s.features[1]).text
    assert best == "charlie"  # head B reads feature 1 of the scripted candidates
    for target in ("plain", "best"):
        _task(tmp_path, f"arbiter_gen_{target}", rows, output_type="generate_until", doc_to_text="{{question}}",
              doc_to_target="{{" + target + "}}", generation_kwargs={"until": ["\n\n"], "max_gen_toks": 16},
              metric_list=[{"metric": "exact_match"}])
    url = f"{fake.url}/v1/chat/completions"
    plain = _run(tmp_path, "local-chat-completions", url, "arbiter_gen_plain", model_id="fake-backbone",
                 apply_chat_template=True)
    assert plain["exact_match,none"] == 1.0
    reranked = _run(tmp_path, "local-chat-completions", url, "arbiter_gen_best", model_id="fake-backbone",
                    apply_chat_template=True, gen_kwargs={"rerank": {"candidates": 4, "heads": ["B"]}})
    assert reranked["exact_match,none"] == 1.0
