"""Serving an aligned LoRA adapter: merge_lora equals PEFT's own forward, and bad adapters are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch


@pytest.fixture(scope="module")
def peft_adapter(backbone, tmp_path_factory):
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(backbone.model)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # PEFT starts B at zero; give the adapter a real effect
    out = tmp_path_factory.mktemp("adapters") / "aligned"
    pm.save_pretrained(str(out))
    return pm, out


def test_merge_lora_matches_peft_forward(backbone, peft_adapter):
    from arbiter.backbone import merge_lora, prompt_ids

    pm, path = peft_adapter
    ids = torch.tensor([prompt_ids(backbone.tokenizer, [{"role": "user", "content": "Tell me about tea."}])])
    merged = copy.deepcopy(backbone.model)
    info = merge_lora(merged, path)
    assert info["merged_modules"] == 3 * backbone.num_layers and info["name"] == "aligned"
    with torch.inference_mode():
        want = pm(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base = backbone.model(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3  # the adapter changes the model ...
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)  # ... and merging reproduces PEFT exactly


def test_bad_adapters_are_refused(backbone, peft_adapter, tmp_path):
    from arbiter.backbone import AdapterError, merge_lora

    _, path = peft_adapter
    with pytest.raises(AdapterError, match="adapter_config.json and adapter_model.safetensors"):
        merge_lora(copy.deepcopy(backbone.model.model.norm), tmp_path)
    bad = tmp_path / "dora"
    bad.mkdir()
    cfg = json.loads((path / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (bad / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="use_dora"):
        merge_lora(backbone.model, bad)  # refused before any weight is touched
