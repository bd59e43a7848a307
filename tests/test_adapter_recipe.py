"""LoRA adapter recipe (``arbiter train adapter``) and offline reference recipe (``arbiter train ref``).

Tiny real data: the 4 shortest hh-rlhf pairs (<= 64 tokens), LoRA r=4, 2 pairs per step, on the real
SmolLM2-135M backbone shared by the session. Every run trains on the ref-annotated parquet file so that
precomputed-reference and adapter-disabled runs see the same pairs in the same order.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from arbiter.training import loop, lora
from arbiter.training.config import ConfigError, load_config
from arbiter.training.data import collate_pairs, load_pairs, save_pairs, tokenize_pairs
from arbiter.training.logprobs import forward_logps
from arbiter.training.recipes import adapter, ref
from arbiter.training.reference import REF, check_ref_tokens
from arbiter.training.sections import DEFAULT_TARGETS

MAX_LEN = 64


# One intra-op torch thread for the whole module (shared fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, backbone):
    """(pairs jsonl, ref-annotated parquet with layers 10/20, the tokenised pairs, ref.run's result)."""
    root = tmp_path_factory.mktemp("adapter_data")
    pairs, _ = load_pairs("hh-rlhf", seed=0)
    chars = lambda p: sum(len(m["content"]) for m in p.prompt) + len(p.chosen) + len(p.rejected)  # noqa: E731
    pairs = sorted(pairs, key=chars)[:200]  # tokenise only candidates that can fit
    tokenized, _ = tokenize_pairs(pairs, backbone.tokenizer, backbone.end_id, max_length=MAX_LEN)
    size = lambda tp: len(tp.prompt_ids) + len(tp.chosen_ids) + len(tp.rejected_ids)  # noqa: E731
    chosen = {(tp.meta["source"], tp.meta["row"]) for tp in sorted(tokenized, key=size)[:4]}
    subset = [p for p in pairs if (p.meta["source"], p.meta["row"]) in chosen]
    assert len(subset) == 4
    src = save_pairs(subset, root / "tiny.jsonl")
    out = root / "tiny_ref.parquet"
    cfg = load_config(ref.CONFIG, None, [f"data.source={src}", f"data.max_length={MAX_LEN}", f"out={out}",
                                         "layers=[10,20]", "progress=false"])
    result = ref.run(cfg, backbone=backbone)
    return src, out, result


def _cfg(tmp_path, data, *overrides):
    return load_config(adapter.CONFIG, None, [
        f"data.source={data}", f"data.max_length={MAX_LEN}", "lora.r=4", "lora.alpha=8", "optim.batch_size=2",
        "optim.lr=1e-3", "optim.schedule=constant", "optim.warmup_steps=0", f"out={tmp_path}",
        "progress=false", *overrides,
    ])


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _lora(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------------------------
# ref.py


def test_ref_columns_equal_base_model_logps(backbone, tiny):
    src, out, result = tiny
    assert result["rows"] == 4 and out.is_file()
    pairs, _ = load_pairs(str(out), seed=0)
    assert all(p.meta[REF.layers] == [10, 20] for p in pairs)
    tokenized, _ = tokenize_pairs(pairs, backbone.tokenizer, backbone.end_id, max_length=MAX_LEN)
    batch = collate_pairs(tokenized, backbone.end_id)
    with torch.no_grad():
        o = forward_logps(backbone.model, batch)
        logps, lengths = o.logps, o.lengths
    b = len(tokenized)
    stored = torch.tensor([tp.meta[REF.chosen_logp] for tp in tokenized] + [tp.meta[REF.rejected_logp] for tp in tokenized])
    torch.testing.assert_close(stored, logps, atol=1e-3, rtol=2e-5)
    assert [tp.meta[REF.chosen_length] for tp in tokenized] == lengths[:b].tolist()
    assert all(len(tp.meta[REF.chosen_layer_logps]) == 2 for tp in tokenized)
    # The reference saw exactly these token ids, on this model.
    check_ref_tokens(tokenized, backbone.fingerprint)
    tampered = tokenized[0]
    tampered.meta[REF.ids_sha] = "0" * 16
    with pytest.raises(ConfigError, match="other token ids"):
        check_ref_tokens([tampered], backbone.fingerprint)


# ------------------------------------------------------------------------------------------------------------
# training


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, backbone, tiny):
    """8 DPO steps on the 4 pairs (precomputed reference), checkpoint every 4 steps, LoRA dropout 0.1."""
    run_dir = tmp_path_factory.mktemp("dpo_run")
    cfg = _cfg(run_dir, tiny[1], "loss=dpo", "optim.max_steps=8", "save_every=4", "keep_checkpoints=3",
               "lora.dropout=0.1", "reference=precomputed")
    result = adapter.run(cfg, backbone=backbone)
    return run_dir, result


def test_dpo_overfits_tiny_set(dpo_run):
    run_dir, result = dpo_run
    hist = _history(run_dir)
    assert [h["step"] for h in hist] == list(range(1, 9))
    assert all(math.isfinite(h["loss"]) for h in hist)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "grad_norm", "lr"):
        assert key in hist[0]
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    first_epoch = (hist[0]["loss"] + hist[1]["loss"]) / 2  # 2 batches of 2 pairs per epoch
    last_epoch = (hist[-2]["loss"] + hist[-1]["loss"]) / 2
    assert last_epoch < 0.5 * first_epoch, (first_epoch, last_epoch)
    assert hist[-1]["rewards/margins"] > 0 and hist[-1]["rewards/accuracies"] == 1.0
    assert result["reference"] == "precomputed" and result["step"] == 8
    # PEFT format, written whole; LoRA B starts at zero, so non-zero B means the adapter trained.
    names = {p.name for p in (run_dir / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", lora.ADAPTER_META_FILE} <= names
    weights = _lora(run_dir)
    b_norms = [t.norm().item() for k, t in weights.items() if "lora_B" in k]
    assert len(b_norms) == 30 * 7 and min(b_norms) > 0
    # The LoRA hyper-parameters the run was configured with are the ones PEFT trained with: read back from
    # PEFT's own adapter_config.json (lora.dropout=0.1, lora.r=4, lora.alpha=8 in _cfg / the fixture).
    peft_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert peft_cfg["lora_dropout"] == pytest.approx(0.1)
    assert peft_cfg["r"] == 4 and peft_cfg["lora_alpha"] == pytest.approx(8)
    assert sorted(peft_cfg["target_modules"]) == sorted(DEFAULT_TARGETS)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-8"]


def test_saved_adapter_loads_with_peft_and_changes_logits(backbone, dpo_run, tiny):
    from peft import PeftModel

    run_dir, _ = dpo_run
    pairs, _ = load_pairs(str(tiny[0]), seed=0)
    tokenized, _ = tokenize_pairs(pairs, backbone.tokenizer, backbone.end_id, max_length=MAX_LEN)
    batch = collate_pairs(tokenized[:1], backbone.end_id)
    with torch.no_grad():
        base = backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    peft_model = PeftModel.from_pretrained(backbone.model, str(run_dir / "adapter"))
    try:
        with torch.no_grad():
            tuned = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with peft_model.disable_adapter():
                off = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        peft_model.unload()
        if hasattr(backbone.model, "peft_config"):
            del backbone.model.peft_config
    assert (tuned - base).abs().max() > 0.1
    torch.testing.assert_close(off, base)
    # The eval entry point: the adapter's implicit reward prefers the chosen answer on its training pairs,
    # where the base model's own log-probs get some pairs wrong.
    acc = lora.adapter_pair_accuracy(backbone, run_dir / "adapter", pairs, beta=0.1, progress=False)
    assert acc["n"] == 4 and acc["accuracy"] == 1.0 and acc["rewards/margins"] > 0
    assert 0.0 <= acc["base_logp_accuracy"] <= 1.0
    # ...and the backbone is the base model again afterwards.
    with torch.no_grad():
        again = backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(again, base)


def test_resume_equals_uninterrupted(tmp_path, backbone, tiny, dpo_run, monkeypatch):
    """Crash right after the step-2 checkpoint, resume, and land on the uninterrupted run's step-4 weights
    (LoRA dropout 0.1, so the restored RNG matters). The constant schedule makes max_steps 4 vs 8 irrelevant."""
    ref_dir, _ = dpo_run
    overrides = ("loss=dpo", "optim.max_steps=4", "save_every=2", "lora.dropout=0.1", "reference=precomputed")
    real_save = loop.save_checkpoint

    def crash_after_step_2(run_dir, step, *a, **kw):
        path = real_save(run_dir, step, *a, **kw)
        if step == 2:
            raise KeyboardInterrupt("simulated crash")
        return path

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        adapter.run(_cfg(tmp_path, tiny[1], *overrides), backbone=backbone)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert not (tmp_path / "adapter").exists()
    # A fresh start into the same directory is refused; --resume continues.
    with pytest.raises(ConfigError, match="resume"):
        adapter.run(_cfg(tmp_path, tiny[1], *overrides), backbone=backbone)
    with pytest.raises(ConfigError, match="config changed"):
        adapter.run(_cfg(tmp_path, tiny[1], *overrides, "optim.lr=2e-3"), resume=True, backbone=backbone)
    adapter.run(_cfg(tmp_path, tiny[1], *overrides), resume=True, backbone=backbone)
    uninterrupted = load_file(str(ref_dir / "checkpoints" / "step-4" / "trainable.safetensors"))
    resumed = load_file(str(tmp_path / "checkpoints" / "step-4" / "trainable.safetensors"))
    assert set(uninterrupted) == set(resumed)
    for k in uninterrupted:
        assert torch.equal(uninterrupted[k], resumed[k]), k
    hist = _history(tmp_path)
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    ref_hist = _history(ref_dir)[:4]
    assert [h["loss"] for h in hist] == [h["loss"] for h in ref_hist]


def test_precomputed_reference_matches_adapter_disabled(tmp_path, backbone, tiny, dpo_run):
    """Same pairs, same order: the offline reference and the adapter-disabled forward give the same losses
    (step 1 is log 2 for both; step 2 checks that the reference values themselves agree)."""
    ref_dir, _ = dpo_run
    cfg = _cfg(tmp_path, tiny[1], "loss=dpo", "optim.max_steps=2", "lora.dropout=0.1", "reference=adapter_disabled")
    result = adapter.run(cfg, backbone=backbone)
    assert result["reference"] == "adapter_disabled"
    online = _history(tmp_path)
    offline = _history(ref_dir)[:2]
    assert len(online) == 2
    for a, b in zip(online, offline):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=2e-4)
        assert a["rewards/chosen"] == pytest.approx(b["rewards/chosen"], rel=1e-4, abs=5e-4)
    assert online[1]["rewards/margins"] != 0  # step 2 really compares two non-trivial rewards


@pytest.mark.parametrize("loss", ["cdpo", "ipo", "simpo", "mipo", "intermediate_dpo"])
def test_each_loss_trains(tmp_path, backbone, tiny, loss):
    """Two steps of one pair each: finite losses, LoRA weights moved, loss-specific metrics logged."""
    cfg = _cfg(tmp_path, tiny[1], f"loss={loss}", "optim.max_steps=2", "optim.batch_size=1")
    result = adapter.run(cfg, backbone=backbone)
    hist = _history(tmp_path)
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist)
    assert min(t.norm().item() for k, t in _lora(tmp_path).items() if "lora_B" in k) > 0
    expected_ref = {"simpo": "none"}.get(loss, "precomputed")
    assert result["reference"] == expected_ref
    if loss == "mipo":
        assert "mipo/K" in hist[0] and result["beta"] == 20.0
    if loss == "intermediate_dpo":
        assert "inter/loss_intermediate" in hist[0]
        assert hist[0]["inter/loss_intermediate"] == pytest.approx(math.log(2), abs=1e-3)
    if loss == "ipo":
        assert hist[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, abs=1e-2)  # h = 0 at step 1


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, backbone, tiny, monkeypatch):
    real = adapter.adapter_loss
    calls = {"n": 0}

    def nan_on_second_step(cfg, pol, ref_values):
        out = real(cfg, pol, ref_values)
        calls["n"] += 1
        if calls["n"] == 2:
            return type(out)(out.losses * float("nan"), out.chosen_rewards, out.rejected_rewards, out.metrics)
        return out

    monkeypatch.setattr(adapter, "adapter_loss", nan_on_second_step)
    cfg = _cfg(tmp_path, tiny[1], "loss=dpo", "optim.max_steps=3", "optim.batch_size=1", "save_every=1")
    with pytest.raises(loop.TrainingDiverged, match=r"step 2.*step-1"):
        adapter.run(cfg, backbone=backbone)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]
    assert not (tmp_path / "adapter").exists()
    # The backbone is left clean (no LoRA layers) even after the failure.
    assert not any("lora" in n for n, _ in backbone.model.named_parameters())


def test_config_errors_fail_before_the_model_loads(tmp_path, tiny):
    with pytest.raises(ConfigError, match="fpo.sae"):
        load_config(adapter.CONFIG, None, ["loss=fpo"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config(adapter.CONFIG, None, ["loss=kto"])
    with pytest.raises(ConfigError, match="adapter_disabled is not allowed"):
        load_config(adapter.CONFIG, None, ["loss=mipo", "reference=adapter_disabled"])
    # MIPO on data without reference columns: refused with the command to run, and no model is loaded
    # (model= names a directory that does not exist, which would fail differently).
    cfg = load_config(adapter.CONFIG, None, ["loss=mipo", f"data.source={tiny[0]}", f"out={tmp_path}",
                                             "model=/nonexistent"])
    with pytest.raises(ConfigError, match="arbiter train ref"):
        adapter.run(cfg)
    cfg = load_config(adapter.CONFIG, None, ["loss=intermediate_dpo", "reference=precomputed", "intermediate.layers=[5]",
                                             f"data.source={tiny[1]}", f"out={tmp_path}", "model=/nonexistent"])
    with pytest.raises(ConfigError, match="reference layers"):
        adapter.run(cfg)


def test_fpo_trains_with_a_tiny_sae(tmp_path, backbone, tiny):
    from arbiter.training.sae import SparseAutoencoder, save_sae

    torch.manual_seed(0)
    sae = SparseAutoencoder(backbone.hidden_size, 256, activation="topk", k=16, hook_layer=12).init_tied_()
    save_sae(sae, tmp_path / "sae")
    data = tmp_path / "ref_fpo.parquet"
    ref.run(load_config(ref.CONFIG, None, [f"data.source={tiny[0]}", f"data.max_length={MAX_LEN}", f"out={data}",
                                           f"sae={tmp_path / 'sae'}", "progress=false"]), backbone=backbone)
    cfg = _cfg(tmp_path / "run", data, "loss=fpo", f"fpo.sae={tmp_path / 'sae'}", "fpo.top_k=8", "optim.max_steps=3")
    result = adapter.run(cfg, backbone=backbone)
    hist = _history(tmp_path / "run")
    assert result["reference"] == "precomputed"
    assert hist[0]["fpo/mse_chosen"] == pytest.approx(0.0, abs=1e-8)  # policy features == offline reference
    assert hist[-1]["fpo/mse_chosen"] > 0 and all(math.isfinite(h["loss"]) for h in hist)


@pytest.mark.slow
def test_intermediate_dpo_with_a_trained_linear_projection(tmp_path, backbone, tiny):
    cfg = _cfg(tmp_path, tiny[1], "loss=intermediate_dpo", "intermediate.projection=linear", "optim.max_steps=2")
    adapter.run(cfg, backbone=backbone)
    proj = load_file(str(tmp_path / "adapter" / "inter_projection.safetensors"))["weight"]
    assert proj.shape == backbone.model.lm_head.weight.shape
    assert not torch.equal(proj, backbone.model.lm_head.weight.detach())


@pytest.mark.parametrize("name", ["adapter", "adapter_smoke", "adapter_ref"])
def test_packaged_configs_load(name):
    from pathlib import Path

    path = Path(adapter.__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    module = ref if name == "adapter_ref" else adapter
    cfg = load_config(module.CONFIG, path, ["out=/tmp/never-written.parquet"] if module is ref else [])
    assert cfg.data.source == "hh-rlhf"
