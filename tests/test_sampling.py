"""arbiter.training.sampling: the offline sampler (the serving HF engine) on the real tiny model. That it samples
what the server returns is checked against a live server in test_service_live.py; here: seeding, the global RNG,
and the context check."""

from __future__ import annotations

import pytest
import torch

from arbiter.chat import prompt_ids
from arbiter.generation.base import SamplingParams
from arbiter.training.sampling import sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompts(backbone):
    return [prompt_ids(backbone.tokenizer, [{"role": "user", "content": t}]) for t in ("Name a fruit.", "Name a colour.")]


def test_samples_are_fixed_by_the_seeds_and_leave_the_global_rng_alone(backbone):
    p, params = _prompts(backbone), SamplingParams(max_tokens=6, temperature=1.0)
    torch.manual_seed(5)
    before = torch.rand(2)
    torch.manual_seed(5)
    a = sample(backbone, p, n=2, params=params, seeds=[1, 2], progress=False)
    assert torch.equal(torch.rand(2), before)  # each candidate has its own generator
    b = sample(backbone, p, n=2, params=params, seeds=[1, 2], progress=False)
    c = sample(backbone, p, n=2, params=params, seeds=[7, 8], progress=False)
    ids = [[cand.token_ids for cand in r.candidates] for r in a]
    assert len(a) == 2 and all(len(r.candidates) == 2 for r in a)
    assert ids == [[cand.token_ids for cand in r.candidates] for r in b]
    assert ids != [[cand.token_ids for cand in r.candidates] for r in c]
    assert all(cand.finish_reason in {"stop", "length"} and len(cand.token_ids) <= 6 for r in a for cand in r.candidates)


def test_features_come_with_the_candidates_and_bad_calls_are_refused(backbone):
    p, params = _prompts(backbone), SamplingParams(max_tokens=4, temperature=1.0)
    (r,) = sample(backbone, p[:1], n=2, params=params, seeds=[0], feature_layers=(-1, 12), progress=False)
    for cand in r.candidates:
        assert cand.features is not None and set(cand.features) >= {-1, 12}
        assert cand.features[-1].shape == (backbone.hidden_size,)
    with pytest.raises(ValueError, match="context"):
        sample(backbone, [[backbone.end_id] * backbone.context_length], n=1, params=params, seeds=[0], progress=False)
    with pytest.raises(ValueError, match="seeds"):
        sample(backbone, p, n=1, params=params, seeds=[0], progress=False)
    with pytest.raises(ValueError, match="n must be"):
        sample(backbone, p, n=0, params=params, seeds=[0, 1], progress=False)
