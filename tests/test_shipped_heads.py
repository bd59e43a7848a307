"""The heads committed under heads/ load on the embedded backbone, record how they were made, and the task heads
do their task on data they were not trained on (SST-2's official dev split for `sst2`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from arbiter.heads import HeadRegistry

HEADS_DIR = Path(__file__).resolve().parents[1] / "heads"
SHIPPED = {"helpful", "sst2", "mc"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def registry(backbone):
    reg = HeadRegistry(HEADS_DIR, backbone.fingerprint)
    loaded, errors = reg.load_all()
    assert not errors, errors
    return reg


def test_every_shipped_head_loads_and_records_its_making(registry):
    assert SHIPPED <= set(registry.names())
    for name in SHIPPED:
        cfg = registry.get(name).config
        m = cfg.provenance["metrics"]
        assert cfg.provenance["recipe"] == "head" and 0.5 < m["test_accuracy"] <= 1 and m["n_test"] > 100
        assert cfg.feature_dtype in ("float32", "bfloat16")


def test_sst2_head_reads_sentiment_on_the_held_out_dev_split(registry, backbone):
    """40 sentences of SST-2's dev split (never trained on): the head's pick beats chance clearly, also on
    float32 features although it was trained on the features of whatever dtype its config records."""
    from arbiter.chat import answer_ids, prompt_ids
    from arbiter.service.engine.hf import HFEngine
    from arbiter.training.data import load_choices

    engine = HFEngine(backbone)
    head = registry.get("sst2")
    questions, _ = load_choices("sst2/dev", limit=40, seed=0)
    prompts, answers = [], []
    for q in questions:
        p = prompt_ids(backbone.tokenizer, q.prompt)
        for opt in q.options:
            prompts.append(p)
            answers.append(answer_ids(backbone.tokenizer, opt, backbone.end_id, close=False))
    feats = engine.features(prompts, answers, [head.config.layer])[head.config.layer]  # [2Q, d]
    with torch.no_grad():
        r = head.module(feats).view(len(questions), 2)  # [Q, 2] rewards of "negative", "positive"
    acc = (r.argmax(1) == torch.tensor([q.answer for q in questions])).float().mean().item()
    assert acc >= 0.7, acc


def test_math_head_records_its_sampled_pairs_and_reads_a_finished_right_answer(registry, backbone):
    """heads/math came from the model's own SVAMP samples; on two hand-written answers to a held-aside SVAMP
    problem it prefers the finished right one to an unfinished rambling one."""
    from arbiter.chat import answer_ids, prompt_ids
    from arbiter.service.engine.hf import HFEngine
    from arbiter.training.data import load_math, math_prompt

    head = registry.get("math")
    prov = head.config.provenance
    assert prov["recipe"] == "head" and prov["report"]["kept"] == 122 and prov["metrics"]["n_test"] == 18
    problem = load_math("svamp", seed=0)[0][0]  # the first of the seeded order: never sampled for the pairs
    p = prompt_ids(backbone.tokenizer, math_prompt(problem))
    right = f"Let's compute it step by step.\nThe answer is {problem.answer}"
    rambling = "First, we need to think about what the question asks. There are many numbers and we" * 3
    feats = HFEngine(backbone).features([p, p], [answer_ids(backbone.tokenizer, a, backbone.end_id, close=False)
                                                 for a in (right, rambling)], [head.config.layer])[head.config.layer]
    with torch.no_grad():
        r = head.module(feats)
    assert r[0] > r[1], r.tolist()
