"""Early rejection in the HF engine's decode loop, on the real SmolLM2-135M (docs/features.md "Pruning").

Against independent references, for a shipped head on the final norm (``helpful``) and one on block 20 (``sst2``):
- every partial reward equals the head on a standalone forward over prompt + the candidate's first t tokens, read at
  the last of them (the state the loop held), or with ``close`` over those tokens + the closing token (the extra
  decode step, whose KV column is cut back: the survivors' tokens below prove it changes nothing else);
- the survivors sample exactly the tokens the same seeds give without pruning (the KV cache compacted under them
  leaves them unchanged), a pruned candidate's tokens are the unpruned run's first t, and a survivor's feature equals
  the standalone forward over prompt + answer + the closing token;
- a checkpoint drops the lowest partial rewards, as many as ``PruneSpec.survivors`` says;
and rows freed by pruning admit a waiting job (continuous batching).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arbiter.backbone import forward_features, prompt_ids
from arbiter.generation.base import GenerationJob, PruneSpec, SamplingParams
from arbiter.generation.hf import HFEngine
from arbiter.heads import LoadedHead, head_rewards, load_head

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(backbone):
    return HFEngine(backbone)


def shipped(engine, name: str) -> LoadedHead:
    module, cfg = load_head(ROOT / "heads" / name, expected_backbone=engine.fingerprint)
    return LoadedHead(name, module, cfg, name)


def P(engine, text: str) -> list[int]:
    return prompt_ids(engine.tokenizer, [{"role": "user", "content": text}])


def state_at(engine, ids: list[int], layer: int) -> torch.Tensor:
    """The reference: one plain forward over ``ids``, the head's layer read at the last position; [d]."""
    seq = torch.tensor([ids])
    return forward_features(engine.model, seq, torch.ones_like(seq), torch.tensor([len(ids) - 1]), layer=layer)[0]


@pytest.mark.parametrize("name, close", [("helpful", False), ("sst2", False), ("helpful", True), ("sst2", True)])
def test_pruned_generation_matches_its_references(engine, name, close):
    head = shipped(engine, name)
    layer = head.config.layer
    p = P(engine, "Give me three tips for sleeping better.")
    sp = SamplingParams(max_tokens=20, temperature=1.0, seed=11)
    spec = PruneSpec(at=(3, 8), keep=0.5, min_keep=1, close=close)
    full, pruned = (engine.generate([GenerationJob(p, 8, sp, feature_layers=(layer,), heads=(head,), prune=pr)])[0]
                    for pr in (None, spec))
    assert all(c.partial_rewards is None and c.pruned_at is None for c in full.candidates)
    # A bfloat16 head rounds its input to 8 bits of mantissa: two float32 states equal to 1e-5 may round apart.
    tol = 2e-2 if head.config.feature_dtype == "bfloat16" else 1e-3
    survivors = 0
    for i, (c, f) in enumerate(zip(pruned.candidates, full.candidates)):
        if c.finish_reason == "pruned":
            assert c.pruned_at in spec.at and c.features is None
            assert c.token_ids == f.token_ids[: c.pruned_at], f"candidate {i}: the pruned prefix is not the seed's"
        else:
            survivors += 1
            assert c.token_ids == f.token_ids, f"candidate {i}: a survivor sampled other tokens than without pruning"
            want = state_at(engine, p + c.token_ids + [engine.end_id], layer)
            got = c.features[layer]
            cos = F.cosine_similarity(got.float(), want.float(), dim=0).item()
            assert cos > 0.9999 and abs((got.norm() / want.norm()).item() - 1) < 1e-3, (i, cos)
        for t, r in c.partial_rewards or []:
            prefix = p + f.token_ids[:t] + ([engine.end_id] if close else [])  # closed: as a finished answer
            ref = head_rewards(head.module, state_at(engine, prefix, layer)[None])[0].item()
            assert abs(r - ref) <= tol * max(1.0, abs(ref)), (name, i, t, r, ref)
    # Each checkpoint: the dropped rows had the lowest partial rewards, as many as the rule says.
    dropped_before = 0
    for t in spec.at:
        at_t = [(i, dict(c.partial_rewards or [])[t]) for i, c in enumerate(pruned.candidates)
                if t in dict(c.partial_rewards or [])]
        if not at_t:
            continue
        gone = [r for i, r in at_t if pruned.candidates[i].pruned_at == t]
        kept = [r for i, r in at_t if pruned.candidates[i].pruned_at != t]
        finished = len(pruned.candidates) - len(at_t) - dropped_before
        assert len(kept) == spec.survivors(len(at_t), finished), (t, len(at_t), finished, len(kept))
        assert not gone or not kept or max(gone) <= min(kept), (t, gone, kept)
        dropped_before += len(gone)
    assert dropped_before > 0, "the schedule pruned nothing: the test checks nothing of pruning"
    assert survivors == 8 - dropped_before


def test_rows_freed_by_pruning_admit_a_waiting_job(engine):
    head = shipped(engine, "helpful")
    sp = SamplingParams(max_tokens=24, temperature=1.0, seed=5)
    big = GenerationJob(P(engine, "Write a short poem about autumn leaves."), 8, sp, feature_layers=(-1,), heads=(head,),
                        prune=PruneSpec(at=(4,), keep=0.25, min_keep=1, close=False))
    waiting = GenerationJob(P(engine, "Name a fruit."), 4, SamplingParams(max_tokens=6, seed=1))
    seen: list[int] = []
    admitted: list[int] = []
    delivered: list[str] = []

    def admit(rows: int):
        seen.append(rows)
        if not admitted and rows + waiting.n <= 8:  # a batch of at most 8 rows: room only once pruning freed some
            admitted.append(len(seen))
            return [waiting]
        return []

    engine.generate([big], admit=admit, deliver=lambda job, res: delivered.append("big" if job is big else "waiting"))
    assert seen[:3] == [8, 8, 8] and admitted, seen  # full until the checkpoint at 4 tokens
    assert seen[admitted[0] - 1] == 2, seen  # 8 x 0.25 = 2 rows left: the waiting job's 4 fit
    assert sorted(delivered) == ["big", "waiting"]
