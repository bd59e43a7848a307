"""The head recipe on real data with the real tiny model: feature cache, training, resume, saved head.

16 short real hh-rlhf (helpful) pairs; their features are computed once per module (one backbone pass of
~3k tokens) and every training run below reads them from the cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

MAX_LEN = 96


@pytest.fixture(scope="module")
def tiny_pairs_file(tmp_path_factory, short_hh_pairs):
    """A TRL-format JSONL of the first 16 pairs of the seeded hh-rlhf order that fit in MAX_LEN tokens."""
    from arbiter.training.data import save_pairs

    keep = short_hh_pairs(16, MAX_LEN, seed=0)
    assert len(keep) == 16
    return save_pairs(keep, tmp_path_factory.mktemp("data") / "tiny_hh.jsonl")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


def make_cfg(data_file, cache_dir, out, **kw):
    from arbiter.training.recipes.head import HeadRecipeConfig

    base = dict(name="tiny", data=[str(data_file)], max_length=MAX_LEN, dev_fraction=0.25, seed=0, lr=1e-2,
                epochs=10, batch_size=4, patience=0, cache_dir=str(cache_dir), out=str(out), progress=False)
    base.update(kw)
    cfg = HeadRecipeConfig(**base)
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def cached(tiny_pairs_file, cache_dir, backbone, tmp_path_factory):
    """Tokenized pairs in the recipe's order and their features, computed once (a cache miss)."""
    from arbiter.training.data.splits import load_tokenized
    from arbiter.training.feature_cache import pair_features

    cfg = make_cfg(tiny_pairs_file, cache_dir, tmp_path_factory.mktemp("unused"))
    tok, report = load_tokenized(cfg, backbone.tokenizer, backbone.end_id)
    feats = pair_features(backbone, tok, layer=-1, max_length=MAX_LEN, cache_dir=cache_dir, progress=False)
    return tok, report, feats


def test_features_cached_once_and_equal_the_service_feature_path(cached, cache_dir, backbone):
    from arbiter.backbone import forward_features
    from arbiter.training.feature_cache import pair_features

    tok, report, feats = cached
    assert report.kept == 16 and report.total == report.kept + sum(report.dropped.values())
    assert feats.status == "miss" and feats.chosen.shape == (16, backbone.hidden_size)
    again = pair_features(backbone, tok, layer=-1, max_length=MAX_LEN, cache_dir=cache_dir, progress=False)
    assert again.status == "hit" and again.seconds == 0 and again.key == feats.key
    assert torch.equal(again.chosen, feats.chosen) and torch.equal(again.rejected, feats.rejected)
    # The cache (prompt run once, answers continued from its KV cache) equals a standalone full forward.
    p = tok[3]
    for answer, cached_row in ((p.chosen_ids, feats.chosen[3]), (p.rejected_ids, feats.rejected[3])):
        ids = torch.tensor([p.prompt_ids + answer])
        ref = forward_features(backbone.model, ids, torch.ones_like(ids), torch.tensor([ids.shape[1] - 1]))[0]
        torch.testing.assert_close(cached_row, ref, atol=2e-4, rtol=1e-4)
    # A different max_length is a different key (it decides which pairs exist), never a false hit.
    other = pair_features(backbone, tok[:1], layer=-1, max_length=MAX_LEN + 1, cache_dir=cache_dir, progress=False)
    assert other.status == "miss" and other.key != feats.key


def test_corrupted_cache_is_detected_and_rebuilt(cached, backbone, tmp_path, caplog):
    from arbiter.training.feature_cache import FEATURES_FILE, META_FILE, pair_features

    tok, _, feats = cached
    few = [min(tok, key=lambda p: len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids))]
    first = pair_features(backbone, few, max_length=MAX_LEN, cache_dir=tmp_path, progress=False)
    entry = next(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    f = entry / FEATURES_FILE
    raw = bytearray(f.read_bytes())
    raw[-7] ^= 0xFF  # flip bits inside the tensor data: still a loadable file, wrong numbers
    f.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="arbiter.training.feature_cache"):
        second = pair_features(backbone, few, max_length=MAX_LEN, cache_dir=tmp_path, progress=False)
    assert second.status.startswith("rebuilt") and "sha256 mismatch" in second.status
    assert any("corrupted" in r.message for r in caplog.records)
    torch.testing.assert_close(second.chosen, first.chosen, atol=1e-5, rtol=1e-5)
    assert pair_features(backbone, few, max_length=MAX_LEN, cache_dir=tmp_path, progress=False).status == "hit"
    # An unreadable sidecar is not trusted either; a truncated tensor file neither.
    (entry / META_FILE).write_text("{not json")
    assert pair_features(backbone, few, max_length=MAX_LEN, cache_dir=tmp_path, progress=False).status.startswith("rebuilt")
    f.write_bytes(f.read_bytes()[:50])
    assert pair_features(backbone, few, max_length=MAX_LEN, cache_dir=tmp_path, progress=False).status.startswith("rebuilt")


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_overfits_and_saved_head_scores_like_training(cached, tiny_pairs_file, cache_dir, backbone, tmp_path):
    from arbiter.heads import HeadConfig, HeadRegistry, build_head, head_rewards
    from arbiter.training.checkpoint import seed_everything
    from arbiter.training.recipes.head import run

    tok, _, feats = cached
    # No dev set: the final weights are the head; 16 pairs, 4 steps an epoch, 15 epochs.
    cfg = make_cfg(tiny_pairs_file, cache_dir, tmp_path / "run", dev_fraction=0.0, epochs=15)
    metrics = run(cfg, backbone=backbone)
    assert metrics["feature_cache"] == "hit" and metrics["n_train"] == 16 and metrics["steps"] == 60
    rows = [r for r in _log(tmp_path / "run") if "loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "grad_norm"} <= set(rows[0])
    first_epoch = sum(r["loss"] for r in rows[:4]) / 4
    last_epoch = sum(r["loss"] for r in rows[-4:]) / 4
    assert last_epoch < first_epoch - 0.1, (first_epoch, last_epoch)
    assert metrics["train_accuracy"] >= 0.9
    # A report with PNG plots beside it: the training curves, and (no dev/test split here) the train rewards.
    report = (tmp_path / "run" / "report.md").read_text()
    for png in ("training_curves.png", "train_rewards.png", "train_reliability.png"):
        assert (tmp_path / "run" / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in report

    # Parameters moved away from their seeded initialisation.
    seed_everything(cfg.seed)
    init = build_head(HeadConfig(name="tiny", backbone=backbone.fingerprint, hidden_size=backbone.hidden_size))
    reg = HeadRegistry(tmp_path, backbone.fingerprint)
    loaded = reg.load("run/head")
    assert not torch.allclose(loaded.module.reward.weight, init.reward.weight)
    prov = loaded.config.provenance
    assert prov["loss"] == "dph_contrastive" and prov["eps"] == 0.1 and prov["pooler"] == "identity"
    assert prov["metrics"]["n_train"] == 16 and prov["report"]["kept"] == 16

    # The loaded head scores the cached features exactly as training measured them ...
    r = head_rewards(loaded.module, torch.cat([feats.chosen, feats.rejected]))  # [32]
    acc = (r[:16] > r[16:]).float().mean().item()
    assert acc == pytest.approx(metrics["train_accuracy"])
    # ... and a fresh standalone forward of one answer gives the same reward as its cached feature.
    from arbiter.backbone import forward_features

    p = tok[0]
    ids = torch.tensor([p.prompt_ids + p.chosen_ids])
    f = forward_features(backbone.model, ids, torch.ones_like(ids), torch.tensor([ids.shape[1] - 1]))
    assert head_rewards(loaded.module, f)[0].item() == pytest.approx(r[0].item(), abs=1e-3)


def test_resume_equals_uninterrupted(tiny_pairs_file, cache_dir, backbone, tmp_path):
    from safetensors.torch import load_file

    from arbiter.training.checkpoint import latest_checkpoint
    from arbiter.training.recipes.head import run

    # Dropout makes the global RNG matter; a dev set makes best-weights tracking matter.
    common = dict(dropout=0.1, epochs=5, checkpoint_every=5)
    full = make_cfg(tiny_pairs_file, cache_dir, tmp_path / "a", max_steps=10, **common)
    m_full = run(full, backbone=backbone)
    half = make_cfg(tiny_pairs_file, cache_dir, tmp_path / "b", max_steps=5, **common)
    run(half, backbone=backbone)
    assert latest_checkpoint(tmp_path / "b").name == "step-5"
    m_resumed = run(dataclasses.replace(half, max_steps=10), resume=True, backbone=backbone)

    for k in ("dev_accuracy", "dev_loss", "train_loss", "best_step", "steps"):
        assert m_resumed[k] == m_full[k], k
    a = load_file(str(latest_checkpoint(tmp_path / "a") / "trainable.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "b") / "trainable.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("best.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = load_file(str(tmp_path / "a" / "head" / "head.safetensors"))
    hb = load_file(str(tmp_path / "b" / "head" / "head.safetensors"))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    steps_b = [r["step"] for r in _log(tmp_path / "b") if "step" in r]
    assert steps_b == list(range(1, 11))  # the resumed run logged steps 6..10 after 1..5

    # Restarting without --resume in a used directory is refused (nothing is silently overwritten),
    # and resuming under a changed trajectory-relevant config is refused too.
    from arbiter.training.config import ConfigError

    with pytest.raises(ConfigError, match="--resume"):
        run(half, backbone=backbone)
    with pytest.raises(ConfigError, match="lr"):
        run(dataclasses.replace(half, lr=0.5), resume=True, backbone=backbone)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tiny_pairs_file, cache_dir, backbone, tmp_path,
                                                                    monkeypatch):
    from arbiter.training import batch
    from arbiter.training.checkpoint import latest_checkpoint
    from arbiter.training.loop import TrainingDiverged
    from arbiter.training.recipes.head import run

    real = batch.LOSSES["dph_contrastive"]
    calls = {"n": 0}

    def poisoned(b, *, eps):
        calls["n"] += 1
        out = real(b, eps=eps)
        if calls["n"] == 4:  # the 4th training step
            return dataclasses.replace(out, losses=out.losses * float("nan"))
        return out

    monkeypatch.setitem(batch.LOSSES, "dph_contrastive", poisoned)
    cfg = make_cfg(tiny_pairs_file, cache_dir, tmp_path / "run", dev_fraction=0.0, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\).*optimiser step 4: stopped before the update.*Last good checkpoint: .*step-3"):
        run(cfg, backbone=backbone)
    assert latest_checkpoint(tmp_path / "run").name == "step-3"
    assert not (tmp_path / "run" / "head").exists()


def test_sweep_keeps_best_variant_and_records_all(tiny_pairs_file, cache_dir, backbone, tmp_path):
    from arbiter.heads import load_head
    from arbiter.training.recipes.head import Variant, run

    cfg = make_cfg(tiny_pairs_file, cache_dir, tmp_path / "run", epochs=3, head_dir=str(tmp_path / "heads" / "h"),
                   sweep=[Variant(pooler="identity", loss="dph_separable"), Variant(pooler="affine_tanh", lr=1e-3)])
    metrics = run(cfg, backbone=backbone)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert len(result["variants"]) == 2
    best = max(result["variants"], key=lambda v: (v["dev_accuracy"], -v["dev_loss"]))
    assert metrics["dev_accuracy"] == best["dev_accuracy"]
    _, config = load_head(tmp_path / "heads" / "h", expected_backbone=backbone.fingerprint)
    assert (config.pooler, config.provenance["loss"]) == (best["pooler"], best["loss"])
    assert len(config.provenance["sweep"]) == 2


def test_unusable_data_is_counted_and_refused_with_reasons(tiny_pairs_file, cache_dir, backbone, tmp_path):
    from arbiter.training.data import DataError
    from arbiter.training.data.splits import load_tokenized

    # Every pair is longer than 40 tokens (the chat template alone is ~30): zero usable, reasons counted.
    cfg = make_cfg(tiny_pairs_file, cache_dir, tmp_path, max_length=40)
    with pytest.raises(DataError, match=r"zero usable rows out of 16.*over_length: 16"):
        load_tokenized(cfg, backbone.tokenizer, backbone.end_id, chunk=5)
    # A limit stops tokenizing early; the rest is counted as beyond_limit.
    cfg = make_cfg(tiny_pairs_file, cache_dir, tmp_path, limit=5)
    tok, report = load_tokenized(cfg, backbone.tokenizer, backbone.end_id, chunk=4)
    assert len(tok) == 5 and report.kept == 5 and report.dropped["beyond_limit"] == 11
    assert report.total == report.kept + sum(report.dropped.values())


def test_layer_sweep_trains_each_variant_on_its_layer_and_the_winner_records_it(tiny_pairs_file, cache_dir, backbone, tmp_path):
    """The layer is a sweep dimension: each distinct layer's features are computed (and cached) once, every
    variant trains on its own layer's features, and the head keeps the winner's layer and the feature dtype."""
    from arbiter.heads import load_head
    from arbiter.training.recipes.head import Variant, run

    cfg = make_cfg(tiny_pairs_file, cache_dir, tmp_path / "run", epochs=3, head_dir=str(tmp_path / "heads" / "h"),
                   sweep=[Variant(layer=-1), Variant(layer=12), Variant(layer=12, loss="dph_separable")])
    metrics = run(cfg, backbone=backbone)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert [v["layer"] for v in result["variants"]] == [-1, 12, 12]
    best = max(result["variants"], key=lambda v: (v["dev_accuracy"], -v["dev_loss"]))
    _, config = load_head(tmp_path / "heads" / "h", expected_backbone=backbone.fingerprint)
    assert config.layer == best["layer"] == config.provenance["layer"] and config.feature_dtype == "float32"
    assert metrics["dev_accuracy"] == best["dev_accuracy"]


def test_prefix_aware_training_adds_closed_prefix_copies_and_reports_prefix_accuracy(tiny_pairs_file, cache_dir,
                                                                                     backbone, tmp_path):
    """``prefixes``: each training pair adds closed-prefix copies (random cuts in [prefix_min_tokens, longer - 1]) to
    the training split of the variants that train on them; ``prefix_eval`` accuracy of the winner on test equals the
    saved head on standalone forwards of ``prompt + answer[:k] + <|im_end|>`` (the position pruning reads)."""
    from arbiter.heads import load_head
    from arbiter.training.config import ConfigError
    from arbiter.training.data.splits import load_tokenized, split_indices
    from arbiter.training.recipes.head import Variant, prefix_cuts, run
    from tests.test_feature_extraction import _alone

    with pytest.raises(ConfigError, match="prefixes is 0"):
        make_cfg(tiny_pairs_file, cache_dir, tmp_path / "bad", sweep=[Variant(train_prefixes=True)])
    with pytest.raises(ConfigError, match="prefix_eval"):
        make_cfg(tiny_pairs_file, cache_dir, tmp_path / "bad", prefix_eval=[0])
    cfg = make_cfg(tiny_pairs_file, cache_dir, tmp_path / "run", epochs=3, test_fraction=0.25, prefixes=2,
                   prefix_min_tokens=2, prefix_eval=[3, 6], head_dir=str(tmp_path / "heads" / "h"),
                   sweep=[Variant(train_prefixes=False), Variant(train_prefixes=True, loss="dph_separable")])
    tok, _ = load_tokenized(cfg, backbone.tokenizer, backbone.end_id)
    splits = split_indices(tok, cfg)
    cuts, rows = prefix_cuts(tok, 2, 2, [3, 6], cfg.seed)
    assert (cuts, rows) == prefix_cuts(tok, 2, 2, [3, 6], cfg.seed)  # seeded
    for p, c in zip(tok, cuts):
        longer = max(len(p.chosen_ids), len(p.rejected_ids)) - 1
        assert all(2 <= k <= longer - 1 for k in c[:2]) and list(c[2:]) == [k for k in (3, 6) if k < longer]
    metrics = run(cfg, backbone=backbone)
    from arbiter.training.feature_cache import pair_features

    again = pair_features(backbone, tok, max_length=MAX_LEN, cache_dir=cache_dir, progress=False, cuts=cuts)
    assert again.status == "hit" and again.prefix_chosen is not None and len(again.prefix_chosen) == len(rows)
    other = pair_features(backbone, tok[:2], max_length=MAX_LEN, cache_dir=cache_dir, progress=False, cuts=[(1,), (2,)])
    plain_entry = pair_features(backbone, tok[:2], max_length=MAX_LEN, cache_dir=cache_dir, progress=False)
    assert other.key != plain_entry.key and plain_entry.prefix_chosen is None
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    plain, pref = result["variants"]
    n_copies = sum(kind == "random" and i in splits["train"] for i, _, kind in rows)
    assert n_copies > 0 and [plain["train_prefixes"], pref["train_prefixes"]] == [False, True]
    assert [plain["n_train"], pref["n_train"]] == [len(splits["train"]), len(splits["train"]) + n_copies]
    head, config = load_head(tmp_path / "heads" / "h", expected_backbone=backbone.fingerprint)
    assert config.provenance["prefixes"]["copies"] == 2
    checked = 0
    for k in (3, 6):
        test = [tok[i] for i in splits["test"] if k < max(len(tok[i].chosen_ids), len(tok[i].rejected_ids)) - 1]
        if not test:
            continue
        with torch.no_grad():
            wins = [float(head(_alone(backbone, [*p.prompt_ids, *p.chosen_ids[: min(k, len(p.chosen_ids) - 1)], backbone.end_id], -1)[None]))
                    > float(head(_alone(backbone, [*p.prompt_ids, *p.rejected_ids[: min(k, len(p.rejected_ids) - 1)], backbone.end_id], -1)[None]))
                    for p in test]
        assert metrics[f"n_test_prefix@{k}"] == len(test)
        assert metrics[f"test_prefix_accuracy@{k}"] == pytest.approx(sum(wins) / len(test))
        checked += len(test)
    assert checked >= 4
