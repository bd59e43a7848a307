"""arbiter.training.logprobs against hand computations from the model's own raw logits (real tiny model)."""

import pytest
import torch

from arbiter.training.data import collate_pairs, load_pairs, tokenize_pairs
from arbiter.training.logprobs import (
    forward_logps,
    split_pairs,
)

# One intra-op torch thread for the whole module (shared fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def batch(backbone):
    pairs, _ = load_pairs("hh-rlhf", limit=400, seed=0)
    tokenized, _ = tokenize_pairs(pairs, backbone.tokenizer, backbone.end_id, max_length=64)
    assert len(tokenized) >= 2
    return collate_pairs(tokenized[:2], backbone.end_id)  # [4, T], right-padded, chosen rows first


@pytest.fixture(scope="module")
def raw(backbone, batch):
    """One plain transformers forward: (logits [N, T, V] float32, hidden_states tuple)."""
    with torch.no_grad():
        out = backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True)
    return out.logits.float(), out.hidden_states


@pytest.fixture(scope="module")
def raw_logits(raw):
    return raw[0]


def test_sequence_logps_match_hand_computation(backbone, batch, raw_logits):
    with torch.no_grad():
        o = forward_logps(backbone.model, batch)
        logps, lengths = o.logps, o.lengths
    assert logps.shape == (4,) and logps.dtype == torch.float32
    assert torch.equal(lengths.cpu(), batch["answer_lengths"])
    # Row 0 by hand: for each answer token t, log_softmax of the logits at t - 1, read at input_ids[t].
    ids, mask = batch["input_ids"][0], batch["answer_mask"][0]
    expect = 0.0
    for t in range(1, ids.shape[0]):
        if mask[t]:
            expect += torch.log_softmax(raw_logits[0, t - 1].double(), dim=-1)[ids[t]].item()
    assert mask.sum().item() == batch["answer_lengths"][0].item()
    assert logps[0].item() == pytest.approx(expect, rel=2e-5, abs=1e-3)
    # Every row, vectorised, against the full-vocabulary log-softmax.
    lp = torch.log_softmax(raw_logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    full = (lp * batch["answer_mask"][:, 1:]).sum(-1)
    torch.testing.assert_close(logps, full, atol=1e-3, rtol=2e-5)
    # The prompt is masked out: the sum over ALL positions is much lower.
    assert (lp * batch["attention_mask"][:, 1:]).sum(-1).lt(full - 1.0).all()


def test_per_token_logps_are_aligned_with_input_ids(backbone, batch, raw_logits):
    with torch.no_grad():
        o = forward_logps(backbone.model, batch, token_level=True)
        tok, mask = o.token_logps, batch["answer_mask"].bool()
        seq = forward_logps(backbone.model, batch).logps
    assert tok.shape == batch["input_ids"].shape and torch.equal(mask, batch["answer_mask"].bool())
    assert torch.all(tok[~mask] == 0) and torch.all(tok[mask] < 0)
    torch.testing.assert_close(tok.sum(-1), seq, atol=1e-4, rtol=1e-5)
    n, t = mask.nonzero()[3].tolist()  # some answer token
    expect = torch.log_softmax(raw_logits[n, t - 1], dim=-1)[batch["input_ids"][n, t]]
    assert tok[n, t].item() == pytest.approx(expect.item(), rel=1e-5, abs=1e-5)


def test_padding_does_not_change_a_rows_logps(backbone, batch):
    """A row alone (no padding) and inside the padded batch give the same log-prob."""
    lengths = batch["attention_mask"].sum(-1)
    row = int(lengths.argmin())  # the most padded row
    alone = {k: v[row : row + 1, : int(lengths[row])] if v.dim() == 2 else v[row : row + 1] for k, v in batch.items()}
    with torch.no_grad():
        full = forward_logps(backbone.model, batch).logps
        single = forward_logps(backbone.model, alone).logps
    assert single[0].item() == pytest.approx(full[row].item(), rel=2e-5, abs=1e-3)


def test_layer_logps_logit_lens(backbone, batch, raw):
    last = backbone.num_layers - 1
    hidden = raw[1]
    with torch.no_grad():
        out = forward_logps(backbone.model, batch, layers=[10, last], end_features=True, capture_layers=[10])
        no_norm = forward_logps(backbone.model, batch, layers=[10], apply_final_norm=False).layer_logps
    assert out.layer_logps.shape == (2, 4)
    # The last block + the final norm is exactly what the LM head reads: the final-layer log-probs.
    torch.testing.assert_close(out.layer_logps[1], out.logps, atol=1e-4, rtol=1e-5)
    # An early block is a much worse predictor than the last one (the logit lens is doing something real).
    assert (out.layer_logps[0] < out.logps).all()
    # The captured raw block output is hidden_states[l + 1] (transformers' convention for l < num_layers - 1).
    torch.testing.assert_close(out.captured[10], hidden[11])
    # Logit lens by hand on block 10: final norm + LM head.
    dec = backbone.model.model
    logits = backbone.model.lm_head(dec.norm(hidden[11])).float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out.layer_logps[0], (lp * batch["answer_mask"][:, 1:]).sum(-1), atol=1e-3, rtol=2e-5)
    # Without the norm it is a different (named) option.
    assert not torch.allclose(no_norm[0], out.layer_logps[0], atol=1.0)
    # Head features: the final-norm hidden state at the closing <|im_end|>.
    torch.testing.assert_close(out.end_hidden, hidden[-1][torch.arange(4), batch["end_positions"]])
    assert (batch["input_ids"][torch.arange(4), batch["end_positions"]] == backbone.end_id).all()


def test_chunked_and_checkpointed_projection_gives_same_values_and_grads(backbone, batch, raw):
    """Small chunks + recompute-in-backward (the memory-sane path) equal one plain projection, values and grads."""
    import arbiter.training.logprobs as lpmod

    project = lpmod.lm_head_projection(backbone.model)
    predict = batch["answer_mask"][:, 1:].bool()
    vocab = backbone.model.lm_head.weight.shape[0]
    results = []
    for chunk, threshold in ((1024, 1 << 40), (7, 0)):  # plain; 7-token chunks, always checkpointed
        hidden = raw[1][-1].detach().clone().requires_grad_(True)  # [N, T, d] final-norm hidden states
        old = lpmod._CHECKPOINT_MIN_ELEMENTS
        lpmod._CHECKPOINT_MIN_ELEMENTS = threshold
        try:
            tok = lpmod._gathered_logps(hidden, batch["input_ids"], predict, project, vocab=vocab, chunk_tokens=chunk)
            (g,) = torch.autograd.grad(tok.sum(), [hidden])
        finally:
            lpmod._CHECKPOINT_MIN_ELEMENTS = old
        results.append((tok.detach(), g))
    assert results[0][0].shape == (int(predict.sum()),)
    # float32 log-probs of magnitude ~7 through other kernels: relative tolerance (measured 1.9e-6 on an AMX Xeon).
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)
    assert results[0][1][:, :-1][~predict].abs().sum() == 0  # no gradient to positions that predict no answer


def test_errors_and_split(backbone, batch):
    bad = dict(batch)
    bad["answer_mask"] = batch["answer_mask"].clone()
    bad["answer_mask"][0, 0] = 1
    with pytest.raises(ValueError, match="position 0"):
        forward_logps(backbone.model, bad)
    with pytest.raises(KeyError, match="answer_mask"):
        forward_logps(backbone.model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    with pytest.raises(ValueError, match="outside"):
        forward_logps(backbone.model, batch, layers=[backbone.num_layers])
    c, r = split_pairs(torch.arange(6.0))
    assert c.tolist() == [0, 1, 2] and r.tolist() == [3, 4, 5]
    c, r = split_pairs(torch.arange(8.0).view(2, 4))
    assert c.tolist() == [[0, 1], [4, 5]]
    with pytest.raises(ValueError, match="even"):
        split_pairs(torch.arange(3.0))
