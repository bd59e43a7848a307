"""Joint cDPO + DPH recipe (``arbiter train joint``): trains, regularises towards the prior, saves a loadable head."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from arbiter.training.config import ConfigError, load_config
from arbiter.training.data import load_pairs, save_pairs, tokenize_pairs
from arbiter.training.recipes import joint

MAX_LEN = 64


# One intra-op torch thread for the whole module (shared fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory, backbone):
    """The 2 shortest real hh-rlhf pairs (<= 64 tokens) as a TRL JSONL file."""
    pairs, _ = load_pairs("hh-rlhf", seed=0)
    chars = lambda p: sum(len(m["content"]) for m in p.prompt) + len(p.chosen) + len(p.rejected)  # noqa: E731
    pairs = sorted(pairs, key=chars)[:100]
    tokenized, _ = tokenize_pairs(pairs, backbone.tokenizer, backbone.end_id, max_length=MAX_LEN)
    size = lambda tp: len(tp.prompt_ids) + len(tp.chosen_ids) + len(tp.rejected_ids)  # noqa: E731
    keep = {(tp.meta["source"], tp.meta["row"]) for tp in sorted(tokenized, key=size)[:2]}
    return save_pairs([p for p in pairs if (p.meta["source"], p.meta["row"]) in keep],
                      tmp_path_factory.mktemp("joint_data") / "tiny.jsonl")


def test_joint_trains_and_saves_adapter_and_registry_loadable_head(tmp_path, backbone, tiny_pairs, monkeypatch):
    from arbiter.heads import HeadRegistry

    # Spy on the prior regularisation the recipe applies after every optimiser step.
    calls = []
    real_prior = joint.prior_regularize_

    def spy(params, ref_params, *, lr, lam):
        params, ref_params = list(params), list(ref_params)
        calls.append((len(params), lr, lam, [(p.detach() - r).norm().item() for p, r in zip(params, ref_params)]))
        return real_prior(params, ref_params, lr=lr, lam=lam)

    monkeypatch.setattr(joint, "prior_regularize_", spy)

    cfg = load_config(joint.CONFIG, None, [
        f"data.source={tiny_pairs}", f"data.max_length={MAX_LEN}", "lora.r=4", "lora.alpha=8", "optim.batch_size=2",
        "optim.lr=1e-3", "optim.max_steps=3", "optim.warmup_steps=0", "optim.schedule=constant", "save_every=3",
        "head.name=tiny-joint", "head.pooler=affine_tanh", f"out={tmp_path}", "progress=false",
    ])
    assert (cfg.beta, cfg.cdpo_eps, cfg.dph_eps, cfg.prior_lambda) == (0.6, 0.25, 0.1, 0.5)  # the paper's
    result = joint.run(cfg, backbone=backbone)
    hist = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 3 and all(math.isfinite(h["loss"]) for h in hist)
    for key in ("loss/cdpo", "loss/dph", "dph/chosen", "dph/rejected", "dph/accuracies", "rewards/margins"):
        assert key in hist[0]
    # Step 1: policy == reference, so cDPO is log 2; the total is alpha1 * cDPO + alpha2 * DPH.
    assert hist[0]["loss/cdpo"] == pytest.approx(math.log(2), abs=1e-4)
    assert hist[0]["loss"] == pytest.approx(hist[0]["loss/cdpo"] + hist[0]["loss/dph"], abs=1e-4)
    assert hist[-1]["loss"] < hist[0]["loss"]
    # The head: saved with the backbone's fingerprint, provenance naming the adapter, and the registry loads it.
    reg = HeadRegistry(tmp_path, backbone.fingerprint)
    loaded = reg.load("head")
    assert loaded.name == "tiny-joint" and loaded.config.pooler == "affine_tanh"
    assert loaded.config.backbone == backbone.fingerprint
    assert loaded.config.provenance["adapter"] == str((tmp_path / "adapter").resolve())
    assert loaded.config.provenance["loss"]["cdpo_eps"] == 0.25
    # The adapter (PEFT format) trained: LoRA B starts at zero.
    lora = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert min(t.norm().item() for k, t in lora.items() if "lora_B" in k) > 0
    # The saved head equals the trained one in the final checkpoint (the checkpoint keeps head.* tensors
    # and the prior.* starting weights used for regularisation).
    ckpt = load_file(str(tmp_path / "checkpoints" / "step-3" / "trainable.safetensors"))
    head_state = loaded.module.state_dict()
    for name, t in head_state.items():
        torch.testing.assert_close(ckpt[f"head.{name}"], t)
    assert any(k.startswith("extra.prior.head.") for k in ckpt)
    # The head moved away from its start, but prior regularisation keeps it anchored there.
    start = {k[len("extra.prior.head."):]: v for k, v in ckpt.items() if k.startswith("extra.prior.head.")}
    assert not torch.equal(start["reward.weight"], head_state["reward.weight"])
    assert result["reference"] == "adapter_disabled"
    # Prior regularisation: after each of the 3 steps, once for the LoRA group and once for the head group,
    # with the group's lr and lambda 0.5, on parameters that have moved away from their starting values.
    assert len(calls) == 6 and all(c[1] == 1e-3 and c[2] == 0.5 for c in calls)
    assert {c[0] for c in calls} == {30 * 7 * 2, len(head_state)}
    assert all(max(c[3]) > 0 for c in calls)
    assert not any("lora" in n for n, _ in backbone.model.named_parameters())  # backbone left clean


def test_joint_config_errors():
    with pytest.raises(ConfigError, match="weight decay"):
        load_config(joint.CONFIG, None, ["optim.weight_decay=0.01"])
    with pytest.raises(ConfigError, match="dph_eps"):
        load_config(joint.CONFIG, None, ["dph_eps=0"])
    with pytest.raises(ConfigError, match="head.name"):
        load_config(joint.CONFIG, None, ["head.name=bad name!"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config(joint.CONFIG, None, ["head.pooler=mlp"])


@pytest.mark.parametrize("name", ["joint", "joint_smoke"])
def test_packaged_configs_load(name):
    from pathlib import Path

    cfg = load_config(joint.CONFIG, Path(joint.__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert (cfg.beta, cfg.cdpo_eps, cfg.dph_eps, cfg.prior_lambda, cfg.optim.weight_decay) == (0.6, 0.25, 0.1, 0.5, 0.0)
