"""The heads committed under heads/ load on the embedded backbone and record how they were made: the pair heads
their held-out pair accuracy, the verifier heads their rule and its held-out best-of-N table (the end-to-end
check on text-disjoint questions is benchmarks/bestofn_api.py)."""

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
    assert "sst2_sampled" not in registry.names()  # replaced by the sst2 verifier
    for name in SHIPPED:
        cfg = registry.get(name).config
        assert cfg.feature_dtype in ("float32", "bfloat16")
        if cfg.provenance["recipe"] == "head":
            m = cfg.provenance["metrics"]
            assert 0.5 < m["test_accuracy"] <= 1 and m["n_test"] > 100
            continue
        # Verifier heads: made on the model's own samples, with the rule that won on dev and a held-out table.
        prov = cfg.provenance
        assert prov["recipe"] == "verifier" and cfg.selection is not None
        test = prov["test_best_of_n"]
        # the head's rule in the table: a rule by name, or a training-free fallback by its label (rule_column)
        column = prov["metrics"].get("rule_column") or cfg.selection.select
        assert test["questions"] > 100 and test[column]["accuracy"] >= test["n=1"]["accuracy"]
        if cfg.selection.select in ("confidence", "deepconf_vote", "borda", "cisc"):  # the recipe's fallback wrote it
            assert column != cfg.selection.select and cfg.selection.score is not None, (cfg.name, column)
        assert prov["sampling"]["n"] == 8 and prov["labels"]["candidates"] == 8 * sum(prov["splits"]["questions"].values())


VERIFIERS = {"sst2": ("label_words", "sst2"), "mc": ("choice_letter", "commonsense_qa")}


def test_verifier_heads_carry_the_rule_the_server_applies(registry):
    for name, (extractor, source) in VERIFIERS.items():
        cfg = registry.get(name).config
        assert source in cfg.provenance["data"] and cfg.provenance["answers"]["extractor"] == extractor
        if cfg.selection.select not in ("argmax", "confidence"):  # the rules that read answers
            assert cfg.selection.extractor == extractor


def test_math_head_records_its_sampled_pairs_and_reads_a_finished_right_answer(registry, backbone):
    """heads/math came from the model's own SVAMP samples; on two hand-written answers to a held-aside SVAMP
    problem it prefers the finished right one to an unfinished rambling one."""
    from arbiter.chat import answer_ids, prompt_ids
    from arbiter.generation.hf import HFEngine
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
