"""The reward-column codec of the vLLM engine (arbiter/service/engine/reward_columns.py), without vLLM: what the model
class writes into the logits and what the engine reads back from the raw log-probs, against the heads applied to
the hidden states directly; that the other tokens' distribution is the one without the reserved tokens; and the
column table's pinning under swaps. The same codec inside vLLM is tested by tests/test_vllm_engine.py."""

from __future__ import annotations

import pytest
import torch

from arbiter.heads.registry import LoadedHead
from arbiter.service.engine import reward_columns as rc
from arbiter.testing.fakes import FAKE_FINGERPRINT

D = FAKE_FINGERPRINT.hidden_size


def _head(name: str, seed: int, pooler: str = "affine_tanh") -> LoadedHead:
    from arbiter.heads import HeadConfig, build_head

    cfg = HeadConfig(name=name, backbone=FAKE_FINGERPRINT, pooler=pooler, hidden_size=D)
    m = build_head(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
    return LoadedHead(name, m, cfg, "<memory>")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rewards_read_back_from_the_log_probs_equal_the_heads_on_the_hidden_state(dtype):
    g = torch.Generator().manual_seed(0)
    B, V = 6, 300
    hidden = (torch.randn(B, D, generator=g) * 3).to(dtype)  # [B, d] as the model hands it to compute_logits
    logits = (torch.randn(B, V, generator=g) * 4).to(dtype)  # [B, V]
    heads = [_head("a", 1, "identity"), _head("b", 2), _head("c", 3)]
    cols, ref = [5, 9, 11], 3
    out = rc.write(logits, hidden, [(c, h.module) for c, h in zip(cols, heads)], ref)
    assert out.dtype == torch.float32 and out.shape == (B, V)
    lps = out.log_softmax(-1)  # vLLM's raw_logprobs
    from arbiter.heads import head_rewards

    for b in range(B):
        got = rc.read({t: lps[b, t].item() for t in [*cols, ref]}, cols, ref)
        want = [head_rewards(h.module, hidden[b : b + 1].float())[0].item() for h in heads]
        for x, y in zip(got, want):
            assert abs(x - y) <= 1e-4 * max(1.0, abs(y)), (b, got, want)
    # The reserved tokens carry no probability, and every other token keeps its stock probability given that the
    # reserved ones are never sampled (same normaliser up to float32 rounding).
    reserved = [*cols, ref]
    assert lps[:, reserved].exp().max().item() < 1e-12
    keep = [t for t in range(V) if t not in reserved]
    stock = logits.float()[:, keep].log_softmax(-1)
    assert torch.allclose(lps[:, keep], stock, rtol=0, atol=1e-5)


def test_no_heads_leaves_the_logits_alone_but_in_float32():
    logits = torch.randn(2, 10, dtype=torch.bfloat16)
    out = rc.write(logits, torch.randn(2, D), [], 0)
    assert out.dtype == torch.float32 and torch.equal(out, logits.float())


def test_the_table_pins_heads_across_a_swap_and_recycles_only_idle_columns():
    t = rc.ColumnTable.of([3, 4, 5, 6])  # reference 3, three head columns
    a1, b, c = _head("a", 1), _head("b", 2), _head("c", 3)
    cols_a, changed = t.pin([a1, b])
    assert cols_a == [4, 5] and changed and t.ref == 3
    a2 = _head("a", 4)  # "a" swapped: a new object, a new column; the old one stays for its job
    cols_new, changed = t.pin([a2])
    assert cols_new == [6] and changed
    with pytest.raises(rc.ColumnsExhausted, match="3 reward columns"):
        t.pin([c])  # every column is pinned
    t.unpin(cols_a)  # the old job is done: a1 and b are idle
    v = t.version
    cols_c, changed = t.pin([c])
    assert changed and t.version == v + 1
    assert cols_c == [4]  # the least recently used idle column (a1's), never a pinned one (a2's 6)
    assert t.column_of(a1) is None and t.column_of(a2) == 6 and t.column_of(b) == 5
    again, changed = t.pin([b])
    assert again == [5] and not changed  # already placed: no push needed
    version, placed = t.snapshot()
    assert version == t.version and [c for c, _ in placed] == [4, 5, 6]
    t.unpin([5, 5])
    t.drop(b)
    assert t.column_of(b) is None and 5 in t.free


def test_reserved_ids_are_the_unused_special_tokens():
    class Tok:
        bos_token_id, eos_token_id, pad_token_id, unk_token_id = None, 0, None, None
        added_tokens_decoder = {i: type("T", (), {"special": i < 8})() for i in range(10)}

        def apply_chat_template(self, turns, tokenize=False):
            return "<1>s<2><1>u<2><1>a<2>"

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 50, 2, 1, 51, 2, 1, 52, 2]}

    assert rc.reserved_ids(Tok(), {2}) == [3, 4, 5, 6, 7]  # not EOS 0, the template's 1 and 2, nor non-special 8, 9


def test_the_probe_error_scale_catches_a_feature_off_by_a_tenth_of_a_percent():
    """The vLLM probe's error is relative to max(|r|, |grad r(h)| |h|): for a head that reads the feature along
    itself, a feature 0.1% too long is an error of 1e-3 (fails the float32 tolerance 1e-4); float rounding of a
    feature (1e-7 relative) is far inside it; a reward near zero does not blow the scale up."""
    from arbiter.heads import head_rewards
    from arbiter.service.engine.vllm import _PROBE_TOL, _reward_scale

    g = torch.Generator().manual_seed(0)
    h = torch.randn(D, generator=g) * 5
    head = _head("along", 0, "identity")
    with torch.no_grad():
        head.module.reward.weight.copy_(h[None] / h.norm() ** 2)  # r(h) = 1, grad r = h / |h|^2
    r = head_rewards(head.module, h[None])[0].item()
    scale = _reward_scale(head.module, h, r)
    assert abs(r - 1) < 1e-6 and abs(scale - 1) < 1e-5
    tol = _PROBE_TOL["float32"][1]
    off = head_rewards(head.module, (h * 1.001)[None])[0].item()
    assert abs(off - r) / scale > tol
    near = head_rewards(head.module, (h * (1 + 1e-7))[None])[0].item()
    assert abs(near - r) / scale < tol
    ortho = torch.randn(D, generator=g)
    ortho -= (ortho @ h) / (h @ h) * h  # a feature the head scores 0: the scale stays |grad r| |h|
    assert abs(head_rewards(head.module, ortho[None])[0].item()) < 1e-5
    assert _reward_scale(head.module, ortho, 0.0) == pytest.approx(float(ortho.norm() / h.norm()), rel=1e-4)
