"""Per-token and per-sequence answer log-probabilities: the only place in Arbiter that computes them.

Batches are ``arbiter.training.data.collate_pairs`` / ``collate_texts`` dicts: ``input_ids``,
``attention_mask``, ``answer_mask`` (1 on answer tokens incl. the closing ``<|im_end|>``) and
``end_positions``, all right-padded, [N, T]. For preference pairs N = 2B: chosen rows first, then rejected.

Convention (docs/methods.md): the log-prob of the token at position t is read from the logits at t - 1, so
logp(y) = sum over answer positions t of log_softmax(logits[t - 1])[input_ids[t]], prompt masked out.

Memory: the LM head is applied only to the hidden states that predict an answer token (the prompt and
padding positions are never projected to the vocabulary), in chunks of ``chunk_tokens`` rows, and under
autograd each chunk is recomputed in backward instead of keeping its [chunk, V] logits alive (the cost is
one extra LM-head matmul on answer tokens). The log-softmax is computed in float32 as
``logit[target] - logsumexp(logits)``, which never materialises a [M, V] log-prob tensor.

Everything comes out of ONE decoder pass (:func:`forward_logps`): final-layer log-probs, the final-norm
hidden state at ``end_positions`` (DPH head features, joint recipe), intermediate-layer "logit lens"
log-probs (intermediate DPO) and raw block outputs (SAE features for FPO), captured with forward hooks
(:class:`arbiter.backbone.LayerCapture`) rather than ``output_hidden_states`` so only the asked-for layers
are kept.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from arbiter.backbone import LayerCapture, base_model

__all__ = [
    "ForwardOutput",
    "PROJECTIONS",
    "causal_lm",
    "forward_logps",
    "lm_head_projection",
    "split_pairs",
]

# Named projections for intermediate-layer log-probs. "lm_head" is the logit lens: the model's own LM head
# (docs/methods.md "Intermediate DPO" default). A caller may instead pass any module mapping [M, d] -> [M, V]
# (e.g. a new shared linear layer, see recipes/adapter.py ``intermediate.projection = "linear"``).
PROJECTIONS = ("lm_head",)
DEFAULT_CHUNK_TOKENS = 1024
# Under autograd, recompute the vocabulary projection in backward once a batch's answer logits would hold
# more than this many float32 elements (2^24 = 64 MiB); tiny batches skip the recompute.
_CHECKPOINT_MIN_ELEMENTS = 1 << 24


@dataclass
class ForwardOutput:
    """What one decoder pass yields (float32 unless said otherwise).

    logps:        [N]      summed answer log-probs (final layer)
    lengths:      [N]      answer tokens per row (long), = answer_mask.sum(-1)
    token_logps:  [N, T]   per-token log-prob of input_ids[t] at answer positions, 0 elsewhere (if asked)
    layer_logps:  [K, N]   summed answer log-probs from each requested intermediate layer (if asked)
    end_hidden:   [N, d]   final-norm hidden state at end_positions (if asked; the DPH head feature)
    captured:     layer -> [N, T, d] raw block outputs (model dtype) for ``capture_layers``
    """

    logps: Tensor
    lengths: Tensor
    token_logps: Tensor | None = None
    layer_logps: Tensor | None = None
    end_hidden: Tensor | None = None
    captured: dict[int, Tensor] = field(default_factory=dict)


def causal_lm(model: Any) -> Any:
    """The transformers causal LM under a PEFT wrapper (or the model itself)."""
    inner = getattr(model, "get_base_model", None)
    return inner() if callable(inner) else model


def lm_head_projection(model: Any) -> Callable[[Tensor], Tensor]:
    """hidden [M, d] -> logits [M, V] exactly as the model's own forward computes them from the final hidden.

    Applies Gemma-2 style ``final_logit_softcapping`` when the config has it; other post-LM-head transforms
    (e.g. Cohere's ``logit_scale``) are not handled: those models would need an entry here.
    """
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings (LM head); cannot compute log-probs")
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        return lambda h: torch.tanh(head(h) / cap) * cap
    return head


def _device_of(model: Any) -> torch.device:
    return next(causal_lm(model).parameters()).device


def _target_logps(h: Tensor, targets: Tensor, project: Callable[[Tensor], Tensor]) -> Tensor:
    """log_softmax(project(h)).gather(targets) in float32 without storing log-probs: [m, d], [m] -> [m]."""
    logits = project(h).float()  # [m, V]
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # [m]


def _gathered_logps(
    hidden: Tensor,
    input_ids: Tensor,
    predict: Tensor,
    project: Callable[[Tensor], Tensor],
    *,
    vocab: int,
    chunk_tokens: int,
) -> Tensor:
    """Log-probs of every answer token, flat in row-major order of ``predict``.

    hidden [N, T, d]; predict [N, T - 1] bool (position t - 1 predicts an answer token at t) -> [M] float32.
    """
    h = hidden[:, :-1][predict]  # [M, d] only the positions whose next token is an answer token
    targets = input_ids[:, 1:][predict]  # [M]
    m = h.shape[0]
    use_ckpt = torch.is_grad_enabled() and h.requires_grad and m * vocab > _CHECKPOINT_MIN_ELEMENTS
    pieces = []
    for s in range(0, m, chunk_tokens):
        hc, tc = h[s : s + chunk_tokens], targets[s : s + chunk_tokens]  # [c, d], [c]
        if use_ckpt:
            pieces.append(checkpoint(_target_logps, hc, tc, project, use_reentrant=False))
        else:
            pieces.append(_target_logps(hc, tc, project))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)  # [M]


def forward_logps(
    model: Any,
    batch: dict[str, Tensor],
    *,
    layers: Sequence[int] = (),
    projection: Literal["lm_head"] | nn.Module | Callable[[Tensor], Tensor] = "lm_head",
    apply_final_norm: bool = True,
    end_features: bool = False,
    capture_layers: Sequence[int] = (),
    token_level: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> ForwardOutput:
    """One decoder pass -> answer log-probs and whatever else the recipe needs from the same pass.

    model: a transformers causal LM, or a PEFT model wrapping one (LoRA layers are live unless the caller is
           inside ``model.disable_adapter()``). Grad mode is the caller's: wrap reference passes in no_grad.
    layers: block indices (0-based; the raw output of block l, as ``LayerCapture`` sees it) whose hidden states
           are mapped to the vocabulary by ``projection`` (after the model's final norm if
           ``apply_final_norm``) to give ``layer_logps`` [K, N] (intermediate DPO).
    end_features: also return the final-norm hidden state at ``batch["end_positions"]`` (DPH features).
    capture_layers: blocks whose raw outputs are returned in ``captured`` (SAE input for FPO).
    """
    for key in ("input_ids", "attention_mask", "answer_mask"):
        if key not in batch:
            raise KeyError(f"batch is missing {key!r} (expected a collate_pairs/collate_texts batch)")
    device = _device_of(model)
    input_ids = batch["input_ids"].to(device)  # [N, T]
    attention_mask = batch["attention_mask"].to(device)  # [N, T]
    answer_mask = batch["answer_mask"].to(device).bool()  # [N, T]
    if answer_mask[:, 0].any():
        raise ValueError("an answer token sits at position 0: no logits predict it (the prompt must be non-empty)")

    dec = base_model(model)  # the decoder stack; its output is after the final norm
    num_layers = len(dec.layers) if hasattr(dec, "layers") else None
    want = sorted(set(int(x) for x in layers) | set(int(x) for x in capture_layers))
    for layer in want:
        if layer < 0 or (num_layers is not None and layer >= num_layers):
            raise ValueError(f"layer {layer} is outside [0, {num_layers - 1 if num_layers else '?'}]")

    with ExitStack() as stack:
        caps = {layer: stack.enter_context(LayerCapture(dec, layer)) for layer in want}
        hidden = dec(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # [N,T,d]
    captured = {layer: cap.output for layer, cap in caps.items()}  # layer -> [N, T, d]

    project = lm_head_projection(model)
    vocab = int(causal_lm(model).get_output_embeddings().weight.shape[0])
    predict = answer_mask[:, 1:]  # [N, T-1]
    rows = predict.nonzero(as_tuple=True)[0]  # [M] row of each answer token (row-major, matches boolean indexing)
    n = input_ids.shape[0]

    def summed(tok: Tensor) -> Tensor:  # [M] -> [N]
        return torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)

    tok = _gathered_logps(hidden, input_ids, predict, project, vocab=vocab, chunk_tokens=chunk_tokens)  # [M]
    out = ForwardOutput(logps=summed(tok), lengths=answer_mask.sum(-1))
    if token_level:
        full = torch.zeros(answer_mask.shape, dtype=tok.dtype, device=device)  # [N, T]
        full[:, 1:][predict] = tok
        out.token_logps = full
    if layers:
        if isinstance(projection, str):
            if projection not in PROJECTIONS:
                raise ValueError(f"unknown projection {projection!r}; expected one of {PROJECTIONS} or a module")
            layer_project = project
        else:
            layer_project = projection
        norm = getattr(dec, "norm", None)
        if apply_final_norm and norm is None:
            raise ValueError(f"{type(dec).__name__} has no final norm ('norm'); set apply_final_norm=False")
        per_layer = []
        for layer in layers:
            h = captured[int(layer)]  # [N, T, d]
            if norm is not None and apply_final_norm:
                h = norm(h)
            t = _gathered_logps(h, input_ids, predict, layer_project, vocab=vocab, chunk_tokens=chunk_tokens)
            per_layer.append(summed(t))  # [N]
        out.layer_logps = torch.stack(per_layer)  # [K, N]
    if end_features:
        if "end_positions" not in batch:
            raise KeyError("batch is missing 'end_positions' (needed for head features)")
        from arbiter.heads import end_features as gather_end

        out.end_hidden = gather_end(hidden, batch["end_positions"].to(device))  # [N, d] float32
    out.captured = {k: v for k, v in captured.items() if k in set(int(x) for x in capture_layers)}
    return out


def split_pairs(x: Tensor) -> tuple[Tensor, Tensor]:
    """Split the last dim of a collate_pairs quantity ([..., 2B]) into (chosen [..., B], rejected [..., B])."""
    if x.shape[-1] % 2:
        raise ValueError(f"expected an even number of rows (chosen then rejected), got {x.shape[-1]}")
    b = x.shape[-1] // 2
    return x[..., :b], x[..., b:]
