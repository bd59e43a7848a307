"""``arbiter eval`` tasks on a handful of real rows with the real tiny model and a saved head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

MAX_LEN = 96


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory, backbone):
    """A saved head with a fixed random reward vector (scores are arbitrary but deterministic)."""
    from arbiter.heads import HeadConfig, build_head, save_head

    torch.manual_seed(0)
    cfg = HeadConfig(name="evalhead", backbone=backbone.fingerprint, hidden_size=backbone.hidden_size)
    d = tmp_path_factory.mktemp("heads") / "evalhead"
    save_head(build_head(cfg), cfg, d)
    return d


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, short_hh_pairs):
    from arbiter.training.data import save_pairs

    keep = short_hh_pairs(4, MAX_LEN, seed=1)
    return save_pairs(keep, tmp_path_factory.mktemp("data") / "pairs.jsonl")


def _share(x):
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_eval_pairs_writes_json_and_markdown(head_dir, pairs_file, backbone, tmp_path):
    from arbiter.heads import load_head
    from arbiter.training.evaluate import eval_pairs

    rep = eval_pairs(head=str(head_dir), data=str(pairs_file), out=str(tmp_path), max_length=MAX_LEN,
                     cache_dir=str(tmp_path / "cache"), backbone=backbone, progress=False)
    saved = json.loads(open(rep["paths"]["json"]).read())
    assert {"task", "n", "accuracy", "accuracy_se", "mean_margin", "ties", "report", "head_name"} <= set(saved)
    assert saved["n"] == 4 and _share(saved["accuracy"]) and saved["accuracy"] * 4 == round(saved["accuracy"] * 4)
    md = open(rep["paths"]["markdown"]).read()
    assert "reward accuracy" in md
    # PNG plots beside the markdown, linked from it: reward / margin histograms and the reliability diagram.
    for name in ("rewards", "reliability"):
        png = Path(rep["paths"]["markdown"]).parent / saved["plots"][name]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.name})" in md
    assert 0 <= saved["ece"] <= 1
    # The numbers are the head's rewards on the cached features (same path as training).
    from arbiter.training.data import load_pairs, tokenize_pairs
    from arbiter.training.feature_cache import pair_features

    head, _ = load_head(head_dir)
    pairs, _ = load_pairs(str(pairs_file), seed=0)
    tok, _ = tokenize_pairs(pairs, backbone.tokenizer, backbone.end_id, max_length=MAX_LEN)
    f = pair_features(backbone, tok, max_length=MAX_LEN, cache_dir=tmp_path / "cache", progress=False)
    assert f.status == "hit"
    with torch.no_grad():
        margin = head(f.chosen) - head(f.rejected)
    assert saved["accuracy"] == pytest.approx((margin > 0).float().mean().item())
    assert saved["mean_margin"] == pytest.approx(margin.mean().item(), rel=1e-5, abs=1e-5)


def test_eval_choice_head_vs_logprob(head_dir, backbone, tmp_path):
    from arbiter.backbone import answer_ids, forward_features, prompt_ids
    from arbiter.heads import load_head
    from arbiter.training.data import load_choices
    from arbiter.training.evaluate import eval_choice

    rep = eval_choice(head=str(head_dir), data="openbookqa", limit=2, out=str(tmp_path), backbone=backbone,
                      progress=False)
    saved = json.loads(open(rep["paths"]["json"]).read())
    for k in ("head_accuracy", "logprob_accuracy", "logprob_sum_accuracy", "agreement", "chance"):
        assert _share(saved[k]), k
    assert saved["n"] == 2 and saved["chance"] == 0.25
    ex = saved["examples"]
    assert len(ex) == 2
    for e in ex:  # picks are the argmax of the reported scores
        assert e["head_pick"] == max(range(4), key=lambda i: e["rewards"][i])
        assert e["logprob_pick"] == max(range(4), key=lambda i: e["avg_logps"][i])
    assert saved["head_accuracy"] == sum(e["head_pick"] == e["answer"] for e in ex) / 2
    assert saved["logprob_accuracy"] == sum(e["logprob_pick"] == e["answer"] for e in ex) / 2
    # The reward of an option equals the head on a standalone feature forward of that option.
    q = load_choices("openbookqa", limit=2, seed=0)[0][0]
    ids = prompt_ids(backbone.tokenizer, q.prompt) + answer_ids(backbone.tokenizer, q.options[1], backbone.end_id)
    x = torch.tensor([ids])
    head, _ = load_head(head_dir)
    with torch.no_grad():
        r = head(forward_features(backbone.model, x, torch.ones_like(x), torch.tensor([len(ids) - 1])))
    assert r.item() == pytest.approx(ex[0]["rewards"][1], abs=1e-3)


def test_eval_bestofn_tiny(head_dir, backbone, tmp_path):
    from arbiter.training.evaluate import eval_bestofn

    rep = eval_bestofn(head=str(head_dir), data="svamp", n=2, limit=2, max_new_tokens=12, out=str(tmp_path),
                       backbone=backbone, progress=False)
    saved = json.loads(open(rep["paths"]["json"]).read())
    keys = ("pass@1", "sample_accuracy", "head_pick", "weighted_vote", "majority_vote", "oracle", "finished_rate",
            "answered_rate")
    for k in keys:
        assert _share(saved[k]), k
    assert saved["n"] == 2 and saved["n_samples"] == 2
    for k in ("pass@1", "head_pick", "sample_accuracy"):
        assert saved[k] <= saved["oracle"]
    assert all(len(e["rewards"]) == 2 for e in saved["examples"])
    assert "oracle pass@N" in open(rep["paths"]["markdown"]).read()


