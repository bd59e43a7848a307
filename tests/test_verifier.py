"""``arbiter train verifier`` and its library (``arbiter.training.verifier``): questions, the split by text, the
sample cache, labelling, pairing, best-of-N under the server's selection code; then the recipe on the real model
(a few SST-2 questions), including an interrupted sampling run that resumes where it stopped."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from arbiter.training import verifier as V
from arbiter.training.stats import paired_gain


def _sampled(texts, finish=None, d=3):
    n = len(texts)
    return V.Sampled(list(texts), [[1]] * n, finish or ["stop"] * n, {-1: torch.arange(n * d, dtype=torch.float32).view(n, d)})


def _q(key, gold="positive"):
    return V.Question([{"role": "user", "content": key}], gold, "test", 0, key, key)


def test_question_key_and_split_are_by_text_alone():
    a = [{"role": "system", "content": "x"}, {"role": "user", "content": "  What   IS it?\n"}]
    assert V.question_key(a) == "what is it?"
    keys = [f"question {i}" for i in range(2000)]
    splits = [V.split_of(k, dev_fraction=0.15, test_fraction=0.15) for k in keys]
    # the same text always lands in the same split, whatever else is in the data
    assert splits[:100] == [V.split_of(k, dev_fraction=0.15, test_fraction=0.15) for k in keys[:100]]
    frac = {s: splits.count(s) / len(splits) for s in ("train", "dev", "test")}
    assert abs(frac["test"] - 0.15) < 0.03 and abs(frac["dev"] - 0.15) < 0.03
    assert V.question_seed("q", 0) == V.question_seed("q", 0) != V.question_seed("q", 1)


def test_load_questions_dedups_by_text_and_reads_gold_answers(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [{"question": "2+2?", "answer": 4}, {"question": "2 + 2?", "answer": "4"}, {"question": "2+2?", "answer": 4},
            {"messages": [{"role": "user", "content": "3+3?"}], "answer": "6.0"}, {"question": "no answer"}, [1]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = V.AnswerSpec("last_number", finished_only=True)
    qs, rep = V.load_questions(str(path), spec=spec)
    assert sorted(q.gold for q in qs) == ["4", "4", "6"]  # "2 + 2?" is another text; the exact repeat is dropped
    assert rep.dropped["duplicate_text"] == 1 and rep.dropped["missing_field"] == 1 and rep.dropped["unparseable"] == 1
    sst, _ = V.load_questions("sst2", limit=5)
    assert len(sst) == 5 and all(q.gold in ("negative", "positive") for q in sst)
    assert all(q.text in q.messages[-1]["content"] for q in sst)
    mc, _ = V.load_questions("openbookqa", limit=3)
    assert all(q.gold in "ABCD" and q.text in q.messages[-1]["content"] for q in mc)


def test_labels_unanswered_and_cut_off_candidates_are_wrong():
    s = _sampled(["It is positive.", "negative", "hmm", "Positive!"], ["stop", "stop", "stop", "length"])
    answers, right = V.label(s, "positive", V.SST2_SPEC)
    assert answers == ["positive", "negative", None, "positive"] and right == [True, False, False, True]
    m = _sampled(["so 12", "The answer is 12", "13"], ["stop", "length", "stop"])
    answers, right = V.label(m, "12", V.MATH_SPEC)
    assert answers == ["12", None, "13"] and right == [True, False, False]  # a cut-off solution gave no answer


def test_pairs_are_right_vs_wrong_within_a_question_deduplicated_capped_and_balanced():
    qs = [_q("a"), _q("b"), _q("c")]
    samples = [_sampled(["r1", "R1 ", "r2", "w1", "w2", "w3", ""]), _sampled(["r", "r2"]), _sampled(["w", "w2"])]
    rights = [[True, True, True, False, False, False, False], [True, True], [False, False]]
    pairs, stats = V.make_pairs(qs, samples, rights, per_question=4, seed=0)
    assert stats == {"questions": 3, "with_pairs": 1, "all_right": 1, "all_wrong": 1, "duplicates": 1, "pairs": 4}
    assert all(p.question == 0 and rights[0][p.chosen] and not rights[0][p.rejected] for p in pairs)
    assert len({(p.chosen, p.rejected) for p in pairs}) == 4 and 1 not in {p.chosen for p in pairs}  # "R1 " == "r1"
    assert 6 not in {p.rejected for p in pairs}  # the empty text is never used
    # balanced: 2 right x 3 wrong, 4 pairs -> each right used twice, each wrong at least once
    used = [p.chosen for p in pairs]
    assert sorted(used.count(i) for i in set(used)) == [2, 2] and len({p.rejected for p in pairs}) == 3
    again, _ = V.make_pairs(qs, samples, rights, per_question=4, seed=0)
    assert [(p.chosen, p.rejected) for p in again] == [(p.chosen, p.rejected) for p in pairs]
    everything, _ = V.make_pairs(qs, samples, rights, per_question=100, seed=0)
    assert len(everything) == 2 * 3


def test_best_of_n_by_hand():
    # q0: candidates right, wrong, wrong; the head prefers candidate 2 (wrong) -> argmax loses to n=1
    # q1: n=1 wrong, the head picks candidate 1 (right)
    rewards = [torch.tensor([0.0, 0.1, 2.0]), torch.tensor([0.0, 1.0, -1.0])]
    answers = [["a", "b", "b"], ["x", "y", "x"]]
    rights = [[True, False, False], [False, True, False]]
    t = V.best_of_n(rewards, answers, rights)
    assert t["n=1"]["accuracy"] == 0.5 and t["oracle"]["accuracy"] == 1.0
    assert t["argmax"] | {} == {"accuracy": 0.5, "se": 0.5 ** 0.5 * 0.5, "wins": 1, "losses": 1}
    assert t["majority_vote"]["accuracy"] == 0.0  # "b" and "x" win their votes, both wrong
    assert V.pick_rule(t) == "argmax"  # ties with weighted_vote's 0.5 go to the simpler rule
    assert t["weighted_vote"]["accuracy"] == 0.5


def test_answer_level_pairs_are_gold_vs_the_models_own_wrong_answers_in_canonical_form(tmp_path):
    mc = V.Question([{"role": "user", "content": "Q?\n\nA. red\nB. blue\nC. green\n\nAnswer."}], "B", "x", 0, "q", "Q?")
    row = V.Question([{"role": "user", "content": "Which?"}], "A", "x", 1, "r", "Which?", {"options": ["yes", "no"]})
    bad = V.Question([{"role": "user", "content": "No listing."}], "A", "x", 2, "s", "No listing.")
    answers = [["A", "C", "A", None, "B", "E", "C", "A"], ["B", "A"], ["B"]]
    canon, stats = V.canonical_answers([mc, row, bad], answers, V.CHOICE_SPEC)
    assert canon[0] == {"B": "B. blue", "A": "A. red", "C": "C. green"}  # E names no listed option: left out
    assert canon[1] == {"A": "A. yes", "B": "B. no"}  # the row's own choices
    assert canon[2] == {} and stats["unrendered_gold"] == 1 and stats["unrendered_samples"] == 2
    assert "row 2" in stats["examples"][0]
    pairs, pstats = V.make_answer_pairs([mc, row, bad], answers, canon, per_question=1)
    # the most frequent wrong answer first (A three times, C twice); one pair per question here
    assert [(p.question, p.chosen, p.rejected) for p in pairs] == [(0, "B", "A"), (1, "A", "B")]
    assert pstats == {"questions": 3, "with_pairs": 2, "never_wrong": 0, "gold_unrendered": 1, "pairs": 2,
                      "sampled_pairs": 2, "listed_pairs": 0}
    pairs, _ = V.make_answer_pairs([mc], answers[:1], canon[:1], per_question=5)
    assert [p.rejected for p in pairs] == ["A", "C"]
    # listed negatives: the model's own mistakes first, then the other listed answers; a question never sampled
    # (answer_limit's extra questions) still pairs its gold answer with every other option / label
    more = [["A", "A"], [], []]
    canon, _ = V.canonical_answers([mc, row, bad], more, V.CHOICE_SPEC, listed=True)
    assert canon[0] == {"B": "B. blue", "A": "A. red", "C": "C. green"} and canon[1] == {"A": "A. yes", "B": "B. no"}
    pairs, pstats = V.make_answer_pairs([mc, row, bad], more, canon, per_question=5, spec=V.CHOICE_SPEC)
    assert [(p.question, p.chosen, p.rejected) for p in pairs] == [(0, "B", "A"), (0, "B", "C"), (1, "A", "B")]
    assert (pstats["sampled_pairs"], pstats["listed_pairs"], pstats["gold_unrendered"]) == (1, 2, 1)
    sst = V.Question([{"role": "user", "content": "It was fine."}], "positive", "sst2", 3, "t", "It was fine.")
    canon, _ = V.canonical_answers([sst], [[]], V.SST2_SPEC, listed=True)
    assert canon == [{"positive": "positive", "negative": "negative"}]
    pairs, _ = V.make_answer_pairs([sst], [[]], canon, per_question=3, spec=V.SST2_SPEC)
    assert [(p.chosen, p.rejected) for p in pairs] == [("positive", "negative")]
    num = V.Question([{"role": "user", "content": "2+2?"}], "4", "math", 4, "u", "2+2?")
    assert V.listed_answers(num, V.MATH_SPEC) is None  # an open answer: only the model's own mistakes pair
    # the verify rule with dev-fitted weights, and the paired gain behind the fallback
    rewards = [torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 1.0])]
    ans = [["x", "y", "y"], ["x", "y", "y"]]
    rights = [[False, True, True], [True, False, False]]
    verified = [{"x": 0.1, "y": 0.9}, {"x": 0.5, "y": 0.2}]
    t = V.best_of_n(rewards, ans, rights, verified)
    assert t["verify"]["accuracy"] == 1.0 and t["argmax"]["accuracy"] == 0.0 and t["majority_vote"]["accuracy"] == 0.5
    assert V.pick_rule(t) == "verify"
    w, acc = V.fit_verify_weights(rewards, ans, rights, verified)
    assert (w.vote, w.text, acc) == (0.0, 0.0, 1.0)  # ties go to the smallest weights
    # differences 0, 1, 0, 1: mean 0.5, sample variance 1/3, standard error sqrt(1/3 / 4)
    assert paired_gain([True, True, False, True], [True, False, False, False]) == pytest.approx((0.5, (1 / 12) ** 0.5))


def test_sample_cache_round_trip_and_a_torn_shard(tmp_path):
    c = V.SampleCache(tmp_path, {"x": 1})
    c.add([("e1", _sampled(["a", "b"])), ("e2", _sampled(["c"]))])
    c.add([("e3", _sampled(["d", "e", "f"]))])
    (c.dir / "shard-00009.safetensors").write_bytes(b"not a shard")
    again = V.SampleCache(tmp_path, {"x": 1})
    assert again.load() == 3
    assert again.entries["e3"].texts == ["d", "e", "f"]
    torch.testing.assert_close(again.entries["e2"].features[-1], _sampled(["c"]).features[-1])
    assert V.SampleCache(tmp_path, {"x": 2}).load() == 0  # another setting, another key


# --- the recipe on the real model -----------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tmp_path, name, *overrides):
    from arbiter.training.config import load_config
    from arbiter.training.recipes.verifier import VerifierConfig

    return load_config(VerifierConfig, None, [
        "data=[sst2]", "limit=12", "n=4", "max_tokens=8", "layers=[-1]", "batch_prompts=4", "epochs=3",
        "sweep=[{pooler: identity}, {pooler: affine_tanh, lr: 1.0e-4}]", "dev_fraction=0.3", "test_fraction=0.3",
        f"cache_dir={tmp_path / 'samples'}", f"out={tmp_path / name}", "progress=false", *overrides])


def test_recipe_trains_a_head_with_its_rule_and_resumes_sampling(tmp_path, backbone, monkeypatch):
    from arbiter.heads import load_head, read_config
    from arbiter.training.config import ConfigError
    from arbiter.training.recipes import verifier as R

    real_add = V.SampleCache.add
    calls = {"n": 0}

    def crash_after_one_shard(self, batch):
        real_add(self, batch)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(V.SampleCache, "add", crash_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        R.run(_cfg(tmp_path, "run"), backbone=backbone)
    monkeypatch.setattr(V.SampleCache, "add", real_add)
    with pytest.raises(ConfigError, match="resume"):  # the run dir holds a run (its sweep): --resume continues it
        (tmp_path / "run" / "result.json").write_text("{}")
        R.run(_cfg(tmp_path, "run"), backbone=backbone)
    m = R.run(_cfg(tmp_path, "run"), resume=True, backbone=backbone)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["sampler"]["questions_cached_before"] == 4 and result["sampler"]["questions_sampled"] == 8
    # The resumed samples are the ones an uninterrupted run draws.
    fresh = R.run(_cfg(tmp_path, "fresh", f"cache_dir={tmp_path / 'samples2'}"), backbone=backbone)
    a = V.SampleCache(tmp_path / "samples", {})
    b = V.SampleCache(tmp_path / "samples2", {})
    a.dir, b.dir = next((tmp_path / "samples").iterdir()), next((tmp_path / "samples2").iterdir())
    a.load(), b.load()
    assert {k: v.texts for k, v in a.entries.items()} == {k: v.texts for k, v in b.entries.items()}
    assert fresh["rule"] in V.RULES and (tmp_path / "fresh" / "head" / "head_config.json").is_file()

    head_dir = tmp_path / "run" / "head"
    cfg = read_config(head_dir)
    assert cfg.selection is not None and cfg.selection.select == m["rule"] in V.RULES
    if cfg.selection.select != "argmax":
        assert cfg.selection.extractor == "label_words" and cfg.selection.labels == ["negative", "positive"]
    prov = cfg.provenance
    assert prov["recipe"] == "verifier" and prov["sampling"]["n"] == 4 and prov["labels"]["candidates"] == 48
    load_head(head_dir, expected_backbone=backbone.fingerprint)
    assert (tmp_path / "run" / "report.md").read_text().startswith("# arbiter train verifier")
    # The held-out questions come back from the provenance alone, and none of them was trained on.
    held = V.held_out_questions(prov, "test")
    train = V.held_out_questions(prov, "train")
    assert held and not {q.key for q in held} & {q.key for q in train}
    assert len(held) == prov["splits"]["questions"]["test"]


def test_prefix_aware_verifier_trains_on_closed_prefixes_of_its_samples(tmp_path, backbone):
    """``prefixes``: closed-prefix copies of the training pairs' SAMPLED answers join the training split of the
    variants that train on them (``train_prefixes: false`` leaves a variant on whole answers); ``prefix_eval``
    reports dev accuracy at fixed cuts per variant. (The closed-prefix features themselves are checked against
    standalone forwards in test_feature_extraction.py and test_head_recipe.py.)"""
    from arbiter.training.config import ConfigError
    from arbiter.training.recipes import verifier as R

    with pytest.raises(ConfigError, match="prefixes is 0"):
        _cfg(tmp_path, "bad", "sweep=[{pooler: identity, train_prefixes: true}]").validate()
    cfg = _cfg(tmp_path, "pref", "prefixes=2", "prefix_min_tokens=1", "prefix_eval=[2]", "levels=[text]",
               "sweep=[{pooler: identity, train_prefixes: false}, {pooler: identity}]")
    cfg.validate()
    R.run(cfg, backbone=backbone)
    result = json.loads((tmp_path / "pref" / "result.json").read_text())
    plain, pref = result["variants"]
    assert [plain["train_prefixes"], pref["train_prefixes"]] == [False, True]
    n = [json.loads(line)["final"]["n_train"] for d in sorted((tmp_path / "pref" / "sweep").iterdir())
         for line in (d / "metrics.jsonl").read_text().splitlines() if line.startswith('{"final"')]
    assert len(n) == 2 and n[1] > n[0]  # the copies joined the second variant's training split
    assert "dev_prefix_accuracy@2" in plain and "dev_prefix_accuracy@2" in pref


# --- answer-level verification: a user's JSONL, trained end to end and served --------------------------------
_REVIEWS = [("A warm, funny and beautifully acted film.", "yes"), ("Dull, slow and far too long.", "no"),
            ("I loved every minute of it.", "yes"), ("The plot makes no sense at all.", "no"),
            ("A triumph of storytelling.", "yes"), ("Painfully boring from start to finish.", "no"),
            ("Charming and clever.", "yes"), ("A mess of a movie.", "no"), ("Great fun for the whole family.", "yes"),
            ("I walked out after an hour.", "no"), ("The best film of the year.", "yes"), ("Awful dialogue.", "no"),
            ("Moving and wonderfully shot.", "yes"), ("Forgettable and flat.", "no"), ("A delight.", "yes"),
            ("Tedious and predictable.", "no")]


def test_a_user_jsonl_trains_an_answer_level_verifier_that_the_server_applies(tmp_path, backbone):
    """A user's yes / no task (label words given on the command line as ``labels=[no,yes]``, which YAML 1.1 would
    read as booleans) -> ``arbiter train verifier`` with answer-level pairs -> a head whose rule is ``verify`` ->
    served on the real HF engine: every group's canonical reward equals the head on a standalone forward over
    prompt + canonical answer + closing token, and the pick is the best member of the best-verified group."""
    from arbiter.backbone import forward_features
    from arbiter.generation.hf import HFEngine
    from arbiter.heads import HeadRegistry, head_rewards, load_head, read_config
    from arbiter.testing.served import served
    from arbiter.training.recipes import verifier as R

    data = tmp_path / "reviews.jsonl"
    asks = ("Is this review positive? Answer yes or no.", "Did the reviewer like the film? Answer yes or no.")
    data.write_text("".join(json.dumps({"question": f"{ask}\n\nReview: {t}", "answer": a}) + "\n"
                            for ask in asks for t, a in _REVIEWS))
    cfg = _cfg(tmp_path, "user", f"data=[{data}]", "limit=24", "answer_limit=32", "extractor=label_words",
               "labels=[no,yes]", "levels=[answer, text]", "fallback=false", "temperature=1.5")
    assert cfg.labels == ["no", "yes"]
    m = R.run(cfg, backbone=backbone)
    result = json.loads((tmp_path / "user" / "result.json").read_text())
    assert {v["level"] for v in result["variants"]} == {"answer", "text"}
    ap = result["metrics"]["answer_pairs"]
    assert ap["pairs"] > 0 and ap["template"] == "{answer}"
    head_dir = tmp_path / "user" / "head"
    hc = read_config(head_dir)
    # answer_limit: the 8 rows beyond limit that land in the training split join the answer level unsampled,
    # each gold label paired with the other listed label; every question pairs (a closed set of two labels)
    rows, _ = V.load_questions(str(data), spec=cfg.spec(str(data)))
    extra = [q for q in rows[24:] if V.split_of(q.key, dev_fraction=0.3, test_fraction=0.3) == "train"]
    assert hc.provenance["answer_level"] == {"negatives": "listed", "answer_limit": 32, "extra_train_questions": len(extra)}
    assert len(extra) > 0 and ap["with_pairs"] == 24 + len(extra) and ap["listed_pairs"] > 0
    assert hc.selection is not None and hc.selection.select == m["rule"]
    if m["rule"] != "verify":  # make the head verify, whatever won on these 16 questions: the serving check below
        hc = hc.model_copy(update={"selection": hc.selection.model_copy(
            update={"select": "verify", "extractor": "label_words", "labels": ["no", "yes"], "canonical": "{answer}"})})
    module, _ = load_head(head_dir, expected_backbone=backbone.fingerprint)
    heads = HeadRegistry(None, backbone.fingerprint)
    heads.add(module, hc)
    engine = HFEngine(backbone)
    question = "Is this review positive? Answer yes or no.\n\nReview: A heartfelt, gorgeous film."
    with served(engine, heads) as srv:
        body = {"model": backbone.name, "messages": [{"role": "user", "content": question}], "max_tokens": 8,
                "temperature": 1.5, "seed": 3, "rerank": {"candidates": 6, "heads": [hc.name], "return_candidates": True}}
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120).json()
    info = r["rerank"]
    assert info["policy"] == "verify" and info["rule"]["canonical"] == "{answer}", r
    prompt = engine.encode_prompt([{"role": "user", "content": question}])
    groups = [g for g in info["groups"] if "canonical_reward" in g]
    assert groups, "no candidate answered yes or no: nothing was verified"
    for g in groups:
        seq = torch.tensor([prompt + engine.encode_answer(g["canonical"]) + [engine.end_id]])
        feat = forward_features(engine.model, seq, torch.ones_like(seq), torch.tensor([seq.shape[1] - 1]),
                                layer=hc.layer)
        want = float(head_rewards(module, feat)[0])
        assert g["canonical_reward"] == pytest.approx(want, rel=1e-3, abs=1e-3), g
    best = max(groups, key=lambda g: g["canonical_reward"])
    assert info["chosen"][0] == best["candidates"][0]
    # one score pass: the prompt once, then each canonical answer and its closing token
    assert r["usage"]["verify_tokens"] == len(prompt) + sum(len(engine.encode_answer(g["canonical"])) + 1 for g in groups)
