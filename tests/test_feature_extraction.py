"""Batched prompt-once feature extraction equals the plain full-sequence forward (``compute_features``, the
service's feature path) for every pair, at the final norm and at an intermediate block, whatever the grouping:
``shared_prompt_features`` (common prefix once, prompts batched, answers continued from the prompt cache in
length-matched sub-batches) and ``packed_pair_features`` (one ``prompt | chosen | rejected`` row per pair under
a 4D mask)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arbiter.training import feature_cache as fc
from arbiter.training.data import load_pairs, tokenize_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pairs(backbone, short_hh_pairs):
    """Real pairs of mixed shapes: hh-rlhf (long prompts, uneven answers) and SST-2 (one shared instruction,
    two-token answers)."""
    hh, _ = tokenize_pairs(short_hh_pairs(5, 128), backbone.tokenizer, backbone.end_id, max_length=128)
    sst, _ = load_pairs("sst2", seed=0)
    sst, _ = tokenize_pairs(sst[:5], backbone.tokenizer, backbone.end_id, max_length=128)
    return hh + sst


_REF: dict[int, torch.Tensor] = {}


def reference(backbone, pairs, layer: int) -> torch.Tensor:
    """Full-sequence features, chosen rows then rejected rows: [2N, d] (computed once per layer)."""
    if layer not in _REF:
        seqs = [list(p.prompt_ids) + list(p.chosen_ids) for p in pairs] + [list(p.prompt_ids) + list(p.rejected_ids) for p in pairs]
        _REF[layer] = fc.compute_features(backbone, seqs, layer=layer, progress=False)
    return _REF[layer]


@pytest.mark.parametrize("layer", [-1, 12])
@pytest.mark.parametrize("batch_tokens", [64, 4096])  # tiny groups (one pair, single-row sub-batches) and one big one
@pytest.mark.parametrize("method", ["shared", "packed"])
def test_prompt_once_features_equal_full_sequence_forward(backbone, pairs, layer, batch_tokens, method):
    chosen, rejected = fc.prompt_once_features(backbone, pairs, layer=layer, method=method, batch_tokens=batch_tokens,
                                               progress=False)
    ref = reference(backbone, pairs, layer)
    got = torch.cat([chosen, rejected])
    cos = F.cosine_similarity(got, ref, dim=1)
    ratio = got.norm(dim=1) / ref.norm(dim=1)
    assert cos.min() > 0.99999 and (ratio - 1).abs().max() < 1e-4, (cos.min().item(), ratio)


def test_groups_and_sub_batches_cover_every_row_once_within_the_budget():
    lengths = [3, 50, 7, 7, 120, 2, 60, 61]
    batches = fc._answer_batches(lengths, batch_tokens=130)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 130 for b in batches)
    # Rows are grouped by length: the 120-token answer never pads the 2- and 3-token ones.
    assert not any(4 in b and (5 in b or 0 in b) for b in batches)
    assert fc._common_prefix_len([[1, 2, 3, 4], [1, 2, 9], [1, 2, 3]]) == 2


def test_auto_packs_long_answers_and_shares_short_ones(pairs):
    hh, sst = pairs[:5], pairs[5:]
    assert fc.extraction_method(hh) == "packed" and fc.extraction_method(sst) == "shared"
    with pytest.raises(ValueError, match="unknown extraction method"):
        fc.prompt_once_features(None, hh, method="fast")


def _alone(backbone, seq: list[int], layer: int) -> torch.Tensor:
    """The independent reference: one unpadded forward of one sequence, read at its last token."""
    ids = torch.tensor([seq])
    return backbone_forward(backbone, ids, layer)


def backbone_forward(backbone, ids: torch.Tensor, layer: int) -> torch.Tensor:
    from arbiter.backbone import forward_features

    return forward_features(backbone.model, ids, torch.ones_like(ids), torch.tensor([ids.shape[1] - 1]), layer=layer)[0]


@pytest.mark.parametrize("layers", [[-1, 12], [12], [3, 20]])  # final + a block; a block alone and two blocks:
def test_the_one_feature_pass_equals_each_sequence_alone(backbone, pairs, layers):  # the forward stops after the deepest
    """Length-sorted, right-padded batches under a small token budget (several batches, single-row ones too), every
    layer from one forward, rows back in input order: each equals that sequence's own unpadded forward."""
    from arbiter.backbone import batched_end_features, length_batches

    seqs = [list(p.prompt_ids) + list(p.chosen_ids) for p in pairs] + [list(p.prompt_ids) + list(p.rejected_ids) for p in pairs]
    budget = 2 * max(len(s) for s in seqs)
    assert len(length_batches([len(s) for s in seqs], budget, 3)) >= 4  # the budget really splits the batch
    seen: list[int] = []
    got = batched_end_features(backbone.model, seqs, layers, batch_tokens=budget, max_batch=3, pad_id=backbone.end_id,
                               progress=seen.append)
    assert sorted(got) == sorted(layers) and sum(seen) == sum(len(s) for s in seqs)
    for layer in layers:
        ref = torch.stack([_alone(backbone, s, layer) for s in seqs])
        err = (got[layer] - ref).norm(dim=1) / ref.norm(dim=1)
        assert err.max() < 1e-4, (layer, err.max().item())



@pytest.mark.parametrize("layers", [[-1, 12], [3, 20]])  # with the final norm; blocks only (the passes stop early)
@pytest.mark.parametrize("budget, max_batch", [(4096, 32), (160, 2)])  # one batch; many, a prompt's answers split
def test_the_shared_prefix_pass_equals_each_sequence_alone(backbone, pairs, layers, budget, max_batch):
    """``shared_prefix_end_features`` (the HF engine's score pass, the verify rule's answers): prompts repeated over
    several answers (3 per prompt, one prompt given once), prompts of different lengths in one batch (the padding of
    a short prompt hidden from its answers), rows back in input order; each equals that sequence's own unpadded
    forward."""
    from arbiter.backbone import shared_prefix_end_features

    pre, suf = [], []
    for p in pairs:
        for a in (p.chosen_ids, p.rejected_ids, list(p.chosen_ids)[:1] + [backbone.end_id]):
            pre.append(list(p.prompt_ids))
            suf.append(list(a))
    pre, suf = pre[:-2], suf[:-2]  # the last prompt has one answer
    order = torch.randperm(len(pre), generator=torch.Generator().manual_seed(0)).tolist()  # prompts interleaved
    pre, suf = [pre[i] for i in order], [suf[i] for i in order]
    seen: list[int] = []
    got = shared_prefix_end_features(backbone.model, pre, suf, layers, batch_tokens=budget, pad_id=backbone.end_id,
                                     max_batch=max_batch, progress=seen.append)
    assert sorted(got) == sorted(layers) and all(got[l].shape == (len(suf), backbone.hidden_size) for l in layers)
    distinct = {tuple(p) for p in pre}
    assert sum(seen) >= sum(len(p) for p in distinct) + sum(len(s) for s in suf)
    if max_batch == 32:  # every prompt ran once
        assert sum(seen) == sum(len(p) for p in distinct) + sum(len(s) for s in suf)
    for layer in layers:
        ref = torch.stack([_alone(backbone, p + s, layer) for p, s in zip(pre, suf)])
        err = (got[layer] - ref).norm(dim=1) / ref.norm(dim=1)
        assert err.max() < 1e-4, (layer, err.max().item())
    with pytest.raises(ValueError, match="prefixes for"):
        shared_prefix_end_features(backbone.model, pre[:1], suf, layers, batch_tokens=budget, pad_id=0)
    with pytest.raises(ValueError, match="empty"):
        shared_prefix_end_features(backbone.model, [pre[0]], [[]], layers, batch_tokens=budget, pad_id=0)

def test_a_block_only_pass_runs_no_deeper_block_and_a_cancelled_pass_stops(backbone, pairs):
    from arbiter.backbone import Cancelled, batched_end_features, decoder_layers

    blocks = decoder_layers(backbone.model)
    ran: list[int] = []
    hooks = [b.register_forward_hook(lambda m, a, o, k=k: ran.append(k)) for k, b in enumerate(blocks)]  # block k ran
    try:
        seqs = [list(pairs[0].prompt_ids) + list(pairs[0].chosen_ids)]
        batched_end_features(backbone.model, seqs, [5], batch_tokens=4096, pad_id=backbone.end_id)
        assert ran == list(range(6))  # blocks 0..5, never 6.. nor the final norm's consumers
        ran.clear()
        polls = []

        def cancelled() -> bool:
            polls.append(1)
            return len(polls) > 3

        with pytest.raises(Cancelled):
            batched_end_features(backbone.model, seqs * 4, [-1], batch_tokens=4096, pad_id=backbone.end_id,
                                 cancelled=cancelled)
        assert ran == [0, 1, 2]  # three blocks ran, the fourth poll stopped the pass
    finally:
        for h in hooks:
            h.remove()
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in blocks)  # the pass removed its hooks


@pytest.mark.parametrize("layer", [-1, 12])
def test_closed_prefixes_in_packed_rows_equal_each_prefix_alone(backbone, pairs, layer):
    """``packed_prefix_features``: the closing token fed after an answer's first k tokens reads what a standalone
    forward of ``prompt + answer[:k] + <|im_end|>`` reads (the position pruning scores a closed prefix at); a cut at
    or past an answer's length keeps it whole (its feature is the full answer's); the full features are unchanged by
    the extra positions; batches of one and several rows agree."""
    hh = pairs[:5]
    cuts = [(1, 3, 10_000), (2,), (), (5, 8), (4,)]
    for budget in (64, 4096):
        c, r, pc, pr = fc.packed_prefix_features(backbone, hh, cuts, layer=layer, batch_tokens=budget, progress=False)
        assert pc.shape == pr.shape == (sum(map(len, cuts)), backbone.hidden_size)
        ref = reference(backbone, pairs, layer)
        got = torch.cat([c, r])
        want = torch.cat([ref[: len(hh)], ref[len(pairs): len(pairs) + len(hh)]])
        assert ((got - want).norm(dim=1) / want.norm(dim=1)).max() < 1e-4
        row = 0
        for p, ks in zip(hh, cuts):
            for k in ks:
                for answer, feat in ((p.chosen_ids, pc[row]), (p.rejected_ids, pr[row])):
                    kept = min(k, len(answer) - 1)
                    alone = _alone(backbone, [*p.prompt_ids, *answer[:kept], backbone.end_id], layer)
                    assert ((feat - alone).norm() / alone.norm()) < 1e-4, (k, kept)
                row += 1
    with pytest.raises(ValueError, match="at least 1"):
        fc.packed_prefix_features(backbone, hh[:1], [(0,)], progress=False)
