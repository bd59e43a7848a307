"""GPU checks (marker `gpu`): skipped without CUDA, never faked.

Run on a CUDA machine with `python -m pytest -m gpu tests/test_gpu.py`.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def cuda_engine(request):
    from arbiter.backbone import load_backbone
    from arbiter.generation.hf import HFEngine

    bb = load_backbone(os.environ.get("ARBITER_MODEL"), device="cuda", dtype=request.param)
    return HFEngine(bb), request.param


def test_cuda_feature_capture_equals_standalone_forward(cuda_engine):
    from arbiter.backbone import prompt_ids
    from arbiter.generation.base import GenerationJob, SamplingParams

    engine, dtype = cuda_engine
    p = prompt_ids(engine.tokenizer, [{"role": "user", "content": "Give me one tip for learning to cook."}])
    res = engine.generate([GenerationJob(p, 4, SamplingParams(max_tokens=24, temperature=0.9, seed=3), feature_layers=(-1, 10))])[0]
    assert len(res.candidates) == 4
    feats = engine.features([p] * 4, [c.token_ids for c in res.candidates], [-1, 10])
    tol = 0.9999 if dtype == "float32" else 0.995  # bf16 batched vs incremental attention differ slightly
    for i, c in enumerate(res.candidates):
        for layer in (-1, 10):
            cos = torch.nn.functional.cosine_similarity(feats[layer][i].float(), c.features[layer].float().cpu(), dim=0)
            assert cos.item() > tol, (dtype, layer, cos.item())


def test_cuda_seed_determinism(cuda_engine):
    from arbiter.backbone import prompt_ids
    from arbiter.generation.base import GenerationJob, SamplingParams

    engine, _ = cuda_engine
    p = prompt_ids(engine.tokenizer, [{"role": "user", "content": "Name three colours."}])
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=11)
    a = engine.generate([GenerationJob(p, 3, sp)])[0]
    b = engine.generate([GenerationJob(p, 3, sp)])[0]
    assert [c.token_ids for c in a.candidates] == [c.token_ids for c in b.candidates]


# --- the training loop's CUDA + bf16 autocast path ---------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_pairs(tmp_path_factory):
    """Eight short real hh-rlhf pairs in a TRL-format file."""
    from arbiter.training.data import load_pairs, save_pairs

    pairs, _ = load_pairs("hh-rlhf", seed=0)
    short = sorted(pairs, key=lambda p: sum(len(m["content"]) for m in p.prompt) + len(p.chosen) + len(p.rejected))[:8]
    return save_pairs(short, tmp_path_factory.mktemp("cuda_data") / "pairs.jsonl")


@pytest.mark.parametrize("recipe,overrides", [
    ("adapter", ["loss=dpo"]),
    ("adapter", ["loss=simpo"]),
    ("joint", ["head.pooler=identity"]),
])
def test_lora_recipes_train_on_cuda_under_bf16_autocast(recipe, overrides, cuda_pairs, tmp_path):
    """A few optimiser steps of each LoRA recipe with device=cuda and precision=auto (bf16 autocast on CUDA):
    the loop runs, the loss stays finite, the weights are float32 and the adapter is written."""
    import json

    from arbiter.training.config import load_config
    from arbiter.training.recipes import adapter, joint

    mod = {"adapter": adapter, "joint": joint}[recipe]
    cfg = load_config(mod.CONFIG, None, [
        f"data.source={cuda_pairs}", "data.max_length=256", "lora.r=4", "lora.alpha=8", "optim.batch_size=2",
        "optim.grad_accum=1", "optim.lr=1e-4", "optim.max_steps=3", "optim.warmup_steps=0", "device=cuda",
        "precision=auto", f"out={tmp_path}", "progress=false", *overrides])
    result = mod.run(cfg)
    hist = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist), hist
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file(), result
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())  # autocast computes in bf16, the weights stay fp32
    assert any("lora_B" in k and w.abs().max() > 0 for k, w in weights.items())  # B starts at zero: it trained
