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
    from arbiter.service.engine.hf import HFEngine

    bb = load_backbone(os.environ.get("ARBITER_MODEL"), device="cuda", dtype=request.param)
    return HFEngine(bb), request.param


def test_cuda_feature_capture_equals_standalone_forward(cuda_engine):
    from arbiter.backbone import prompt_ids
    from arbiter.service.engine.base import GenerationJob, SamplingParams

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
    from arbiter.service.engine.base import GenerationJob, SamplingParams

    engine, _ = cuda_engine
    p = prompt_ids(engine.tokenizer, [{"role": "user", "content": "Name three colours."}])
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=11)
    a = engine.generate([GenerationJob(p, 3, sp)])[0]
    b = engine.generate([GenerationJob(p, 3, sp)])[0]
    assert [c.token_ids for c in a.candidates] == [c.token_ids for c in b.candidates]
