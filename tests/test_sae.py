"""Sparse autoencoders for FPO: SAELens layout, activations, pooling, reference cache, training, resume.

Model-dependent tests read early blocks (layer 1-2) of the real SmolLM2-135M so each forward stops after
two or three blocks and the whole file stays fast on two CPU cores.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from arbiter.backbone import base_model, decoder_layers
from arbiter.training import sae as S
from arbiter.training.sae import SAELoadError, SparseAutoencoder, load_sae, save_sae
from arbiter.training.sae import features as SF


def random_sae(d_in=16, d_sae=48, activation="topk", k=4, seed=0, **kw) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae, activation=activation, k=k if activation == "topk" else None, **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae


# ------------------------------------------------------------------------------------------------------------
# The module


def test_topk_gives_exactly_k_nonzeros_and_matches_saelens_formula():
    g = torch.Generator().manual_seed(1)
    sae = SparseAutoencoder(32, 256, activation="topk", k=8).init_tied_(g)
    x = torch.randn(64, 32, generator=g) * 3  # [N, d_in]
    z = sae.encode(x)  # [N, d_sae]
    # Tied init: the 8 largest of 256 projections of a random vector are positive, so exactly k survive ReLU.
    assert ((z != 0).sum(dim=1) == 8).all()
    # SAELens TopKSAE.encode: topk of (x - b_dec) @ W_enc + b_enc, ReLU on the kept values, zeros elsewhere.
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(8, dim=-1)
    manual = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    torch.testing.assert_close(z, manual)
    # With negative pre-activations ReLU removes some of the k: never more than k are active.
    with torch.no_grad():
        sae.b_enc.fill_(-8.0)
    assert ((sae.encode(x) != 0).sum(dim=1) <= 8).all()
    assert ((sae.encode(x) != 0).sum(dim=1) < 8).any()


def test_decoder_rows_unit_norm_and_parallel_grad_removed_after_a_step():
    g = torch.Generator().manual_seed(2)
    sae = SparseAutoencoder(24, 96, activation="topk", k=6).init_tied_(g)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1, generator=g) * 3 + 0.1)  # rows of arbitrary norm
    x = torch.randn(128, 24, generator=g)
    # The projection leaves no gradient component along the rows.
    recon, _ = sae(x)
    (recon - x).pow(2).mean().backward()
    sae.remove_parallel_decoder_grad_()
    w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    assert (sae.W_dec.grad * w).sum(dim=1).abs().max() < 1e-6
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    before = sae.W_dec.detach().clone()
    S.train_step(sae, opt, x)
    norms = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    assert not torch.equal(before / before.norm(dim=1, keepdim=True), sae.W_dec.detach())


def test_nonfinite_loss_stops_before_any_update():
    sae = SparseAutoencoder(8, 32, activation="topk", k=2).init_tied_(torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    x = torch.randn(4, 8)
    x[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        S.train_step(sae, opt, x)
    for k, v in sae.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_auxk_reaches_dead_latents_only():
    g = torch.Generator().manual_seed(3)
    sae = SparseAutoencoder(16, 64, activation="topk", k=4).init_tied_(g)
    x = torch.randn(32, 16, generator=g)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    pre = sae.pre_activations(x)
    residual = (x - sae(x)[0]).detach()
    loss = S.auxk_loss(sae, pre, residual, dead, aux_k=5)
    loss.backward()
    grad_rows = sae.W_dec.grad.abs().sum(dim=1)  # [d_sae]
    assert grad_rows[:10].sum() > 0 and grad_rows[10:].sum() == 0
    assert S.auxk_loss(sae, pre, residual, torch.zeros(64, dtype=torch.bool), aux_k=5).item() == 0.0


# ------------------------------------------------------------------------------------------------------------
# SAELens layout


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "relu"])
def test_save_load_round_trip(tmp_path, activation):
    sae = random_sae(activation=activation, hook_layer=3, model_name="SmolLM2-135M-Instruct")
    out = save_sae(sae, tmp_path / "sae", {"context_size": 512, "dataset_path": "hh-rlhf"})
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == {"topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}[activation]
    assert (cfg["d_in"], cfg["d_sae"], cfg["hook_layer"]) == (16, 48, 3)
    assert cfg["hook_name"] == cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["model_name"] == cfg["metadata"]["model_name"] == "SmolLM2-135M-Instruct"
    assert cfg.get("k") == (4 if activation == "topk" else None)
    loaded = load_sae(out)
    assert (loaded.activation, loaded.k, loaded.hook_layer) == (activation, sae.k, 3)
    x = torch.randn(10, 16)
    for a, b in zip(sae(x), loaded(x)):
        assert torch.equal(a, b)
    for name, t in sae.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name


def _write_saelens_dir(path: Path, cfg: dict, tensors: dict) -> Path:
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def _jumprelu_tensors(d_in=12, d_sae=40, seed=4):
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g),
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_dec": torch.randn(d_in, generator=g),
        "threshold": torch.rand(d_sae, generator=g) * 2.0,
    }


def test_loads_a_saelens_v6_jumprelu_directory_and_applies_the_threshold(tmp_path):
    t = _jumprelu_tensors()
    # What SAELens 6 writes for a Gemma Scope-style JumpReLU SAE (plus keys Arbiter does not use).
    cfg = {
        "d_in": 12, "d_sae": 40, "dtype": "float32", "device": "cuda", "apply_b_dec_to_input": False,
        "normalize_activations": "none", "reshape_activations": "none", "architecture": "jumprelu",
        "metadata": {
            "sae_lens_version": "6.5.0", "sae_lens_training_version": None, "model_name": "gemma-2-2b",
            "hook_name": "blocks.25.hook_resid_post", "hook_head_index": None, "prepend_bos": True,
            "dataset_path": "monology/pile-uncopyrighted", "context_size": 1024, "neuronpedia_id": "gemma-2-2b/25-gemmascope-res-16k",
        },
    }
    sae = load_sae(_write_saelens_dir(tmp_path / "gs", cfg, t))
    assert (sae.activation, sae.hook_layer, sae.model_name, sae.apply_b_dec_to_input) == ("jumprelu", 25, "gemma-2-2b", False)
    x = torch.randn(200, 12, generator=torch.Generator().manual_seed(5))
    pre = x @ t["W_enc"] + t["b_enc"]  # apply_b_dec_to_input = False: no centring
    expect = pre.relu() * (pre > t["threshold"])  # SAELens JumpReLUSAE.encode
    z = sae.encode(x)
    torch.testing.assert_close(z, expect)
    # The threshold really acts: some positive pre-activations are cut.
    assert ((pre > 0) & (z == 0)).any()
    torch.testing.assert_close(sae.decode(z), z @ t["W_dec"] + t["b_dec"])


def test_loads_saelens_v5_flat_configs(tmp_path):
    # SAELens 5.x: hook fields at the top level, log_threshold in older JumpReLU checkpoints.
    t = _jumprelu_tensors()
    t["log_threshold"] = torch.log(t.pop("threshold"))
    cfg = {"architecture": "jumprelu", "d_in": 12, "d_sae": 40, "dtype": "torch.float32", "model_name": "m",
           "hook_name": "blocks.7.hook_resid_pre", "hook_layer": 7, "activation_fn_str": "relu",
           "apply_b_dec_to_input": True, "normalize_activations": None, "finetuning_scaling_factor": False,
           "sae_lens_training_version": "3.13.0", "context_size": 128}
    # SAELens records hook_layer = the block in the hook's name (7); hook_resid_pre of block 7 is the raw output
    # of block 6, which is the layer Arbiter captures.
    sae = load_sae(_write_saelens_dir(tmp_path / "v5j", cfg, t))
    assert sae.hook_layer == 6
    # Saved again, it keeps SAELens's convention (hook_layer 7 beside blocks.7.hook_resid_pre) and reloads.
    again = save_sae(sae, tmp_path / "v5j_again")
    assert json.loads((again / "cfg.json").read_text())["hook_layer"] == 7
    assert load_sae(again).hook_layer == 6
    # A hook_layer that is not the hook name's block is a contradiction, refused.
    with pytest.raises(SAELoadError, match="contradicts"):
        load_sae(_write_saelens_dir(tmp_path / "v5bad", {**cfg, "hook_layer": 6}, t))
    torch.testing.assert_close(sae.threshold.detach(), torch.exp(t["log_threshold"]))
    # A 5.x top-k SAE: architecture "standard" with activation_fn_str "topk" and k in activation_fn_kwargs.
    g = torch.Generator().manual_seed(6)
    tk = {"W_enc": torch.randn(12, 40, generator=g), "b_enc": torch.zeros(40), "W_dec": torch.randn(40, 12, generator=g),
          "b_dec": torch.zeros(12)}
    cfg = {"architecture": "standard", "d_in": 12, "d_sae": 40, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 3}, "hook_name": "blocks.2.hook_resid_post", "hook_layer": 2}
    sae = load_sae(_write_saelens_dir(tmp_path / "v5k", cfg, tk))
    assert (sae.activation, sae.k) == ("topk", 3)
    assert ((sae.encode(torch.randn(5, 12)) != 0).sum(1) <= 3).all()


def test_refuses_pickles_bad_shapes_and_unsupported_configs(tmp_path, monkeypatch):
    def no_torch_load(*a, **k):
        raise AssertionError("load_sae must never call torch.load")

    monkeypatch.setattr(torch, "load", no_torch_load)
    t = _jumprelu_tensors()
    base = {"architecture": "jumprelu", "d_in": 12, "d_sae": 40, "hook_name": "blocks.1.hook_resid_post"}

    pick = tmp_path / "pickled"
    pick.mkdir()
    (pick / "cfg.json").write_text(json.dumps(base))
    (pick / "sae_weights.pt").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(SAELoadError, match="pickle"):
        load_sae(pick)

    bad = dict(t, W_enc=t["W_enc"].T)
    with pytest.raises(SAELoadError, match=r"W_enc has shape \(40, 12\), expected \(12, 40\)"):
        load_sae(_write_saelens_dir(tmp_path / "shape", base, bad))

    no_thr = {k: v for k, v in t.items() if k != "threshold"}
    with pytest.raises(SAELoadError, match=r"missing tensor\(s\) \['threshold'\]"):
        load_sae(_write_saelens_dir(tmp_path / "nothr", base, no_thr))

    with pytest.raises(SAELoadError, match="unexpected tensor"):
        load_sae(_write_saelens_dir(tmp_path / "extra", base, dict(t, r_mag=torch.zeros(40))))

    with pytest.raises(SAELoadError, match="architecture 'gated' is not supported"):
        load_sae(_write_saelens_dir(tmp_path / "gated", dict(base, architecture="gated"), t))

    with pytest.raises(SAELoadError, match="normalize_activations"):
        load_sae(_write_saelens_dir(tmp_path / "norm", dict(base, normalize_activations="layer_norm"), t))

    with pytest.raises(SAELoadError, match="integer k"):
        load_sae(_write_saelens_dir(tmp_path / "nok", dict(base, architecture="topk"), {k: v for k, v in t.items() if k != "threshold"}))

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "cfg.json").write_text(json.dumps(base))
    (garbage / "sae_weights.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SAELoadError, match="not a readable safetensors"):
        load_sae(garbage)

    with pytest.raises(SAELoadError, match="d_in=12 does not match"):
        load_sae(_write_saelens_dir(tmp_path / "ok", base, t), expect_d_in=576)

    with pytest.raises(SAELoadError, match="no cfg.json"):
        load_sae(tmp_path)


# ------------------------------------------------------------------------------------------------------------
# Activations and pooling on the real model


def _pairs(backbone):
    from arbiter.training.data import PreferencePair, tokenize_pairs

    pairs = [
        PreferencePair([{"role": "user", "content": "Name a primary colour."}], "Red.", "Potatoes are vegetables, not colours at all.", {}),
        PreferencePair([{"role": "user", "content": "What is 2 + 2? Answer with the number and a short explanation."}],
                       "4, because two and two make four.", "5", {}),
        PreferencePair([{"role": "user", "content": "Say hello."}], "Hello there! How can I help you today?", "Go away.", {}),
    ]
    tokenized, _ = tokenize_pairs(pairs, backbone.tokenizer, backbone.end_id, max_length=128)
    assert len(tokenized) == 3
    return tokenized


def test_block_output_is_the_raw_block_output_not_the_final_norm(backbone):
    ids = torch.tensor([backbone.tokenizer("The cat sat on the mat.", add_special_tokens=False)["input_ids"]])
    att = torch.ones_like(ids)
    with torch.no_grad():
        dec = base_model(backbone.model)  # the decoder stack: no LM head needed here
        hs = dec(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
        assert torch.equal(S.block_output(backbone.model, ids, att, 1), hs[2])  # hidden_states[l + 1] for l < L - 1
        last = S.block_output(backbone.model, ids, att, backbone.num_layers - 1)
        # hidden_states[L] is after the final norm, not block L-1's raw output (docs/methods.md).
        assert not torch.allclose(last, hs[backbone.num_layers])
        torch.testing.assert_close(dec.norm(last), hs[backbone.num_layers])


def test_pooled_features_divide_by_the_real_answer_length(backbone):
    from arbiter.training.data import collate_pairs

    layer = 2
    tp = _pairs(backbone)
    sae = SparseAutoencoder(backbone.hidden_size, 256, activation="topk", k=8, hook_layer=layer).init_tied_(
        torch.Generator().manual_seed(0))
    batch = collate_pairs(tp, pad_id=backbone.end_id)
    assert (batch["attention_mask"] == 0).any()  # padding is present
    with torch.no_grad():
        pooled = S.pooled_sae_features(backbone.model, batch, sae, layer)  # [6, 256]
        # Manual: each sequence alone (no padding), encode its answer tokens, average over them.
        rows = [(p.prompt_ids, p.chosen_ids) for p in tp] + [(p.prompt_ids, p.rejected_ids) for p in tp]
        manual, padded_len = [], []
        for prompt, answer in rows:
            ids = torch.tensor([prompt + answer])
            h = S.block_output(backbone.model, ids, torch.ones_like(ids), layer)[0]  # [T, d]
            z = sae.encode(h[len(prompt):])  # [|y|, d_sae]
            manual.append(z.sum(0) / len(answer))
            padded_len.append(batch["input_ids"].shape[1] - len(prompt))
        manual = torch.stack(manual)
    torch.testing.assert_close(pooled, manual, atol=2e-4, rtol=1e-4)
    # The authors' padded-length divisor would give visibly different features for the short answers.
    sums = manual * torch.tensor([len(a) for _, a in rows]).unsqueeze(1)
    padded = sums / torch.tensor(padded_len).unsqueeze(1)
    assert not torch.allclose(pooled, padded, atol=1e-3)


def test_pooled_features_are_differentiable_wrt_the_model(backbone):
    from arbiter.training.data import collate_pairs

    layer = 1
    tp = _pairs(backbone)[:1]
    sae = SparseAutoencoder(backbone.hidden_size, 128, activation="topk", k=8, hook_layer=layer).init_tied_(
        torch.Generator().manual_seed(0))
    sae.requires_grad_(False)
    batch = collate_pairs(tp, pad_id=backbone.end_id)
    w = decoder_layers(backbone.model)[0].mlp.down_proj.weight
    # The backbone is shared by the whole session: earlier tests may have frozen it. Ask for the gradient
    # explicitly and put the flag back.
    was = w.requires_grad
    w.requires_grad_(True)
    try:
        pooled = S.pooled_sae_features(backbone.model, batch, sae, layer)
        (grad,) = torch.autograd.grad(pooled.sum(), [w])  # no .grad buffers left on the shared model
    finally:
        w.requires_grad_(was)
    assert grad.abs().sum() > 0


def test_reference_cache_hit_and_corruption_rebuild(backbone, tmp_path, monkeypatch, caplog):
    from arbiter.training.data import collate_pairs

    layer = 1
    tp = _pairs(backbone)
    sae = SparseAutoencoder(backbone.hidden_size, 128, activation="topk", k=8, hook_layer=layer).init_tied_(
        torch.Generator().manual_seed(0))
    chosen, rejected = S.precompute_ref_features(backbone, tp, sae, layer, batch_size=2, cache_dir=tmp_path, progress=False)
    assert chosen.shape == rejected.shape == (3, 128)
    # Same numbers as pooling each pair on its own (the length-sorted batching restores the input order).
    with torch.no_grad():
        for i, p in enumerate(tp):
            one = S.pooled_sae_features(backbone.model, collate_pairs([p], pad_id=backbone.end_id), sae, layer)
            torch.testing.assert_close(chosen[i], one[0], atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(rejected[i], one[1], atol=2e-4, rtol=1e-4)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[1] == files[0] + ".sha256"
    cache = tmp_path / files[0]

    real_block_output = S.block_output

    def must_not_run(*a, **k):
        raise AssertionError("the model ran although the cache is valid")

    monkeypatch.setattr(SF, "block_output", must_not_run)
    c2, r2 = S.precompute_ref_features(backbone, tp, sae, layer, batch_size=2, cache_dir=tmp_path, progress=False)
    assert torch.equal(c2, chosen) and torch.equal(r2, rejected)

    # Corrupt one byte in the tensor data: detected by the sha256 sidecar, rebuilt, sidecar renewed.
    raw = bytearray(cache.read_bytes())
    raw[-5] ^= 0xFF
    cache.write_bytes(bytes(raw))
    calls = []
    monkeypatch.setattr(SF, "block_output", lambda *a, **k: calls.append(1) or real_block_output(*a, **k))
    with caplog.at_level(logging.WARNING, logger="arbiter.training.sae"):
        c3, r3 = S.precompute_ref_features(backbone, tp, sae, layer, batch_size=2, cache_dir=tmp_path, progress=False)
    assert calls, "a corrupted cache must be rebuilt with the model"
    assert "sha256 mismatch" in caplog.text
    torch.testing.assert_close(c3, chosen)
    torch.testing.assert_close(r3, rejected)
    from arbiter.training.artifacts import file_sha256

    assert (tmp_path / (files[0] + ".sha256")).read_text().split()[0] == file_sha256(cache)
    # A different SAE (or layer, or data) is a different cache entry, never a stale hit.
    other = SparseAutoencoder(backbone.hidden_size, 128, activation="topk", k=8).init_tied_(torch.Generator().manual_seed(1))
    assert S.ref_cache_key(backbone, tp, other, layer) != S.ref_cache_key(backbone, tp, sae, layer)
    assert S.ref_cache_key(backbone, tp, sae, 2) != S.ref_cache_key(backbone, tp, sae, layer)


# ------------------------------------------------------------------------------------------------------------
# Training


def test_training_steps_on_real_activations_lower_the_mse(backbone):
    from arbiter.training.sae import TokenSequence, sequence_activations

    texts = [
        "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
        "Paris is the capital of France and sits on the river Seine.",
        "To bake bread you need flour, water, salt and yeast, and some patience.",
        "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    ]
    seqs = [TokenSequence(backbone.tokenizer(t, add_special_tokens=False)["input_ids"], 1) for t in texts]
    x = sequence_activations(backbone.model, seqs, 2, batch_size=4, pad_id=backbone.end_id)  # [n, 576]
    assert x.shape[0] > 40
    scale = float(x.shape[1] ** 0.5 / x.norm(dim=1).mean())
    xs = x * scale
    sae = SparseAutoencoder(x.shape[1], 256, activation="topk", k=8).init_tied_(torch.Generator().manual_seed(0), data_mean=xs.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
    before = S.reconstruction_stats(sae, xs)["mse"]
    for _ in range(25):
        S.train_step(sae, opt, xs)
    after = S.reconstruction_stats(sae, xs)
    assert after["mse"] < 0.6 * before
    assert after["l0"] <= 8
    # Folding the input scale gives an SAE on raw activations with the same relative error and unit decoder rows.
    raw = S.reconstruction_stats(S.fold_input_scale(sae, scale), x)
    assert raw["fve"] == pytest.approx(after["fve"], abs=1e-4)
    torch.testing.assert_close(S.fold_input_scale(sae, scale).W_dec.norm(dim=1), torch.ones(256), atol=1e-5, rtol=0)


def _text_cfg(tmp_path: Path, out: str, steps: int, **over):
    from arbiter.training.config import load_config
    from arbiter.training.recipes import sae as R

    src = tmp_path / "texts.txt"
    if not src.exists():
        lines = [f"Sentence number {i} talks about {w} and how {w} relates to everyday life." for i, w in
                 enumerate(["rivers", "bread", "music", "stars", "trains", "gardens", "chess", "rain", "maps", "bees",
                            "clocks", "ships"])]
        src.write_text("\n".join(lines) + "\n")
    ov = {
        "out": str(tmp_path / out), "data.source": str(src), "data.format": "text", "data.eval_examples": 2,
        "sae.layer": 1, "sae.d_sae": 128, "sae.k": 4, "train.steps": steps, "train.batch_tokens": 20,
        "train.chunk_sequences": 4, "train.model_batch_size": 4, "train.checkpoint_every": 3,
        "train.log_every": 2, "train.dead_tokens": 60, "train.lr": 2e-3, **over,
    }
    return load_config(R.CONFIG, None, [f"{k}={v}" for k, v in ov.items()])


def test_recipe_resume_equals_uninterrupted_run(backbone, tmp_path):
    from arbiter.training.config import ConfigError
    from arbiter.training.recipes import sae as R

    full = R.run(_text_cfg(tmp_path, "full", 7), backbone=backbone)
    R.run(_text_cfg(tmp_path, "split", 4), backbone=backbone)  # stops mid-way (checkpoint at step 4)
    resumed = R.run(_text_cfg(tmp_path, "split", 7), resume=True, backbone=backbone)
    a, b = load_sae(tmp_path / "full" / "sae"), load_sae(tmp_path / "split")  # a run directory also loads
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    assert resumed["eval_mse"] == full["eval_mse"] and resumed["steps"] == full["steps"] == 7
    assert resumed["dead_latents"] == full["dead_latents"]
    def history(run: str) -> list[dict]:  # the logged steps, without their wall-clock times
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")} for x in lines]

    assert [h["step"] for h in history("full")] == [2, 4, 6, 7]
    assert history("full") == history("split")
    assert json.loads((tmp_path / "full" / "result.json").read_text())["eval_mse"] == full["eval_mse"]
    # The saved SAE is SAELens layout and says where it reads.
    cfg = json.loads((tmp_path / "full" / "sae" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"], cfg["hook_name"]) == ("topk", 4, "blocks.1.hook_resid_post")
    assert 0 < full["eval_l0"] <= 4 and full["eval_fve"] <= 1.0
    # A fresh run never silently overwrites a run with checkpoints, and a changed config cannot resume.
    with pytest.raises(ConfigError, match="--resume"):
        R.run(_text_cfg(tmp_path, "full", 7), backbone=backbone)
    with pytest.raises(ConfigError, match="train.lr"):
        R.run(_text_cfg(tmp_path, "full", 8, **{"train.lr": 1e-3}), resume=True, backbone=backbone)


def test_recipe_divergence_stops_before_the_update_and_keeps_the_last_good_checkpoint(backbone, tmp_path, monkeypatch):
    from arbiter.training.checkpoint import latest_checkpoint
    from arbiter.training.loop import TrainingDiverged
    from arbiter.training.recipes import sae as R

    real, calls = R.train_step, {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise FloatingPointError("non-finite SAE loss (mse=nan, aux=0.0)")
        return real(*a, **kw)

    monkeypatch.setattr(R, "train_step", poisoned)
    with pytest.raises(TrainingDiverged, match=r"non-finite SAE loss.*optimiser step 5.*Last good checkpoint: .*step-3"):
        R.run(_text_cfg(tmp_path, "run", 7), backbone=backbone)
    assert latest_checkpoint(tmp_path / "run").name == "step-3" and not (tmp_path / "run" / "sae").exists()
    monkeypatch.setattr(R, "train_step", real)
    assert R.run(_text_cfg(tmp_path, "run", 7), resume=True, backbone=backbone)["steps"] == 7


def test_shipped_configs_validate():
    from arbiter.training.config import ConfigError, load_config
    from arbiter.training.recipes import sae as R

    root = Path(R.__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in root.glob("sae*.yaml"))
    assert "sae.yaml" in names
    for name in names:
        cfg = load_config(R.CONFIG, root / name)
        assert cfg.sae.k >= 1 and cfg.train.steps >= 1
    with pytest.raises(ConfigError, match="sae.k"):
        load_config(R.CONFIG, None, ["sae.k=0"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(R.CONFIG, None, ["sae.width=4"])
