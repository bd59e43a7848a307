"""``ARBITER_ADAPTER`` on the real vLLM engine: the LoRA adapter is served through vLLM's LoRA support (the rewards
come from that adapted forward), and the start-up probe, whose HF reference has the adapter merged, shows vLLM
reads the adapted weights.

The adapter is written in PEFT's file format by hand (adapter_config.json + adapter_model.safetensors; the vLLM
virtualenv has no peft), with a large enough effect that the base model's log-probs of the probe differ from
the adapted model's by far more than the probe's tolerance.
"""

from __future__ import annotations

import ast
import copy
import json

import pytest
import torch

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

from arbiter.testing.fakes import ArbiterProcess  # noqa: E402

pytestmark = pytest.mark.vllm
TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def adapter_dir(backbone, tmp_path_factory):
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("adapters") / "aligned"
    out.mkdir()
    r = 8
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, layer in enumerate(backbone.model.model.layers):
        for name in TARGETS:
            lin = getattr(layer.self_attn, name)
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, lin.in_features, generator=g) * 0.05
            tensors[f"{key}.lora_B.weight"] = torch.randn(lin.out_features, r, generator=g) * 0.05
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": list(TARGETS), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "base_model_name_or_path": "SmolLM2-135M-Instruct"}))
    return out


def _probe_logprob_gap(backbone, adapter_dir) -> float:
    """Mean |log-prob difference| between the base and the adapted HF model on the engine's probe sequence."""
    from arbiter.backbone import encode_chat, merge_lora
    from arbiter.service.engine.vllm import _PROBE_ANSWER, _PROBE_PROMPT

    p, a = encode_chat(backbone.tokenizer, _PROBE_PROMPT, _PROBE_ANSWER, backbone.end_id)
    ids = torch.tensor([p + a])
    merged = copy.deepcopy(backbone.model)
    merge_lora(merged, adapter_dir)
    with torch.inference_mode():
        lp = [torch.log_softmax(m(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
              for m in (backbone.model, merged)]
    return (lp[0] - lp[1]).abs().mean().item()


def test_adapter_is_served_by_vllm_and_matches_the_merged_reference(backbone, adapter_dir, tmp_path):
    gap = _probe_logprob_gap(backbone, adapter_dir)
    assert gap > 0.5, gap  # the adapter changes the model far beyond the probe's tolerance (1e-3)
    env = {"ARBITER_ENGINE": "vllm", "ARBITER_LOG_LEVEL": "info", "ARBITER_THREADS": "2",
           "ARBITER_VLLM_KV_CACHE_GB": "1", "ARBITER_ADAPTER": str(adapter_dir)}
    heads = tmp_path / "heads"
    heads.mkdir()
    with ArbiterProcess(heads, tmp_path / "server.log", env=env, start_timeout_s=900) as srv:
        probe_line = next(ln for ln in srv.log.read_text().splitlines() if "vLLM start-up probe" in ln)
        probe = ast.literal_eval(probe_line.split("vLLM start-up probe: ", 1)[1].split("}", 1)[0] + "}")
        # vLLM with the LoRA agrees with the merged HF reference within the probe's float32 tolerance, far closer
        # than the base model does; the probe heads' rewards (read out of the adapted forward) agree too.
        assert probe["logprob_mae"] <= 1e-3 and probe["logprob_mae"] < gap / 100, (probe, gap)
        assert probe["reward_rel_error"] <= 1e-4, probe
        models = [m["id"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]]
        assert "aligned" in models
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
            "model": "aligned", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "seed": 1})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
