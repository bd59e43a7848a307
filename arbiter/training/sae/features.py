"""Raw block outputs, answer-pooled SAE features, and the cached reference features FPO trains from."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..artifacts import atomic_write_text, file_sha256
from .io import sae_digest
from .model import REF_CACHE_VERSION, SparseAutoencoder

log = logging.getLogger("arbiter.training.sae")


# --------------------------------------------------------------------------------------------------------------
# Activations: the raw output of block l


def block_output(model: Any, input_ids: Tensor, attention_mask: Tensor, layer: int, *, stop_early: bool = True) -> Tensor:
    """Raw output of decoder block ``layer`` (SAELens ``blocks.{layer}.hook_resid_post``): [B, T] -> [B, T, d].

    The project's one capture hook (``arbiter.backbone.LayerCapture``) keeps the block's output; with
    ``stop_early`` it then stops the forward, so the later blocks, the final norm and the LM head never run
    (only ``layer + 1`` blocks do). Gradients are NOT disabled here: inside FPO training the result must be
    differentiable w.r.t. the policy; wrap the call in ``torch.no_grad()`` / ``inference_mode()`` otherwise.
    The hook is removed before returning, so gradient-checkpoint recomputation never sees it.
    """
    from arbiter.backbone import LayerCapture, StopForward, base_model

    with LayerCapture(model, layer, stop=stop_early) as cap:
        try:
            base_model(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    if cap.output is None:
        raise RuntimeError(f"block {layer} did not run")
    return cap.output


def pool_answer_features(hidden: Tensor, answer_mask: Tensor, sae: SparseAutoencoder) -> Tensor:
    """SAE features of every answer token, mean-pooled per row over its REAL answer tokens.

    hidden [N, T, d_in] (block l's raw output), answer_mask [N, T] (1 on answer tokens incl. the closing
    <|im_end|>, 0 on prompt and padding) -> [N, d_sae] (float32 or the SAE's dtype).
    Only answer tokens go through the SAE. The divisor is each row's own answer length: the authors' code
    divided by the padded length, which shrinks the features of short answers in a padded batch.
    Differentiable w.r.t. ``hidden`` (the SAE is usually frozen).
    """
    if hidden.dim() != 3 or answer_mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and answer_mask {tuple(answer_mask.shape)} do not fit")
    mask = answer_mask.to(torch.bool)  # [N, T]
    lengths = mask.sum(dim=1)  # [N]
    if (lengths == 0).any():
        bad = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(f"rows {bad} have no answer tokens; cannot pool SAE features over an empty answer")
    rows, cols = mask.nonzero(as_tuple=True)  # [M], [M]: all answer tokens of the batch
    z = sae.encode(hidden[rows, cols])  # [M, d_sae]
    pooled = z.new_zeros(hidden.shape[0], sae.d_sae).index_add(0, rows, z)  # [N, d_sae]
    return pooled / lengths.to(pooled.dtype).unsqueeze(1)  # [N, d_sae]


def pooled_sae_features(
    model: Any, batch: dict[str, Tensor], sae: SparseAutoencoder, layer: int, *, stop_early: bool = True
) -> Tensor:
    """Run ``model`` on a ``collate_pairs``-style batch and return pooled SAE features [N, d_sae].

    batch: input_ids [N, T], attention_mask [N, T], answer_mask [N, T] (right-padded; for collate_pairs
    N = 2B, chosen rows first). Gradients flow to the model unless the caller disables them. Inside an FPO
    step that already runs the policy for its logits, capture the layer during that forward
    (``arbiter.backbone.LayerCapture``) and call :func:`pool_answer_features` instead: one forward, not two.
    """
    for key in ("input_ids", "attention_mask", "answer_mask"):
        if key not in batch:
            raise KeyError(f"pooled_sae_features needs batch[{key!r}] (collate_pairs keys)")
    hidden = block_output(model, batch["input_ids"], batch["attention_mask"], layer, stop_early=stop_early)  # [N, T, d]
    pooled = pool_answer_features(hidden, batch["answer_mask"], sae)  # [N, d_sae]
    if "answer_lengths" in batch:
        # The data API's lengths and the mask must agree, else the pooling divisor is not the answer length.
        expect = batch["answer_lengths"].to(batch["answer_mask"].device)
        if not torch.equal(batch["answer_mask"].sum(1).to(expect.dtype), expect):
            raise ValueError("batch['answer_lengths'] disagrees with batch['answer_mask'].sum(1)")
    return pooled


# --------------------------------------------------------------------------------------------------------------
# Offline reference features


def _weights_digest(model: Any, per_tensor: int = 4096) -> str:
    """Cheap identity of a model's weights: sha256 over names, shapes and the first elements of each tensor."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().reshape(-1)[:per_tensor].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()


def _pairs_digest(tokenized_pairs: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for tp in tokenized_pairs:
        for ids in (tp.prompt_ids, tp.chosen_ids, tp.rejected_ids):
            h.update(len(ids).to_bytes(4, "little"))
            h.update(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def ref_cache_key(backbone: Any, tokenized_pairs: Sequence[Any], sae: SparseAutoencoder, layer: int) -> str:
    """What the cached reference features depend on: model weights, SAE, layer and every token id."""
    fp: Any = getattr(backbone, "fingerprint", None)
    fp = fp.model_dump() if hasattr(fp, "model_dump") else repr(fp)
    parts = {
        "version": REF_CACHE_VERSION,
        "fingerprint": fp,
        "weights": _weights_digest(backbone.model),
        "sae": sae_digest(sae),
        "layer": int(layer),
        "pairs": _pairs_digest(tokenized_pairs),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _read_ref_cache(path: Path, key: str, n_pairs: int, d_sae: int) -> tuple[Tensor, Tensor] | None:
    """The cached features, or None (with a warning) if the file is missing, corrupted or stale."""
    if not path.is_file():
        return None
    sidecar = path.with_name(path.name + ".sha256")
    why = None
    try:
        want = sidecar.read_text().split()[0] if sidecar.is_file() else None
        if want is None:
            why = "no sha256 sidecar"
        elif file_sha256(path) != want:
            why = "sha256 mismatch (file corrupted or partially written)"
        else:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
            if meta.get("key") != key:
                why = "cache key mismatch"
            else:
                t = load_file(str(path))
                chosen, rejected = t.get("chosen"), t.get("rejected")
                if chosen is None or rejected is None or tuple(chosen.shape) != (n_pairs, d_sae) or chosen.shape != rejected.shape:
                    why = "unexpected tensors or shapes"
                else:
                    return chosen, rejected
    except (OSError, SafetensorError, ValueError, IndexError) as e:
        why = f"unreadable ({e})"
    log.warning("reference feature cache %s is unusable: %s; rebuilding it", path, why)
    return None


def _write_ref_cache(path: Path, key: str, chosen: Tensor, rejected: Tensor, layer: int) -> None:
    """safetensors file via temp + rename, then its sha256 sidecar (also atomic). A crash between the two
    leaves a sidecar that does not match, which the reader detects and rebuilds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, tmp,
                  metadata={"key": key, "layer": str(layer), "pairs": str(chosen.shape[0]), "format": "pt"})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        digest = file_sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n")


def precompute_ref_features(
    backbone: Any,
    tokenized_pairs: Sequence[Any],
    sae: SparseAutoencoder,
    layer: int,
    *,
    batch_size: int = 8,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Pooled SAE features of the frozen reference model for every pair: (chosen [P, d_sae], rejected [P, d_sae]).

    The full pooled vector is kept (not only its top-k), because FPO picks the k features by the POLICY's
    values at training time (docs/methods.md). ``backbone`` is an ``arbiter.backbone.Backbone`` holding the
    reference weights (the base model; with LoRA, compute this before attaching the adapter).
    With ``cache_dir`` the result is stored as ``ref_features-<key>.safetensors`` + a ``.sha256`` sidecar,
    keyed by the model weights, SAE, layer and every token id; a corrupted or stale cache is rebuilt.
    Pairs are batched by length (less padding) and the results put back in the input order.
    """
    from arbiter.training.data import collate_pairs

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(tokenized_pairs)
    if n == 0:
        raise ValueError("precompute_ref_features: no pairs")
    path = None
    key = None
    if cache_dir is not None:
        key = ref_cache_key(backbone, tokenized_pairs, sae, layer)
        path = Path(cache_dir) / f"ref_features-{key[:24]}.safetensors"
        cached = _read_ref_cache(path, key, n, sae.d_sae)
        if cached is not None:
            log.info("reference features: loaded %d pairs from %s", n, path)
            return cached

    model = backbone.model
    device = next(model.parameters()).device
    sae_device = next(sae.parameters()).device
    chosen = torch.zeros(n, sae.d_sae, dtype=torch.float32)  # [P, d_sae]
    rejected = torch.zeros(n, sae.d_sae, dtype=torch.float32)  # [P, d_sae]
    order = sorted(range(n), key=lambda i: -(len(tokenized_pairs[i].prompt_ids)
                                              + max(len(tokenized_pairs[i].chosen_ids), len(tokenized_pairs[i].rejected_ids))))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    it: Iterable = batches
    if progress and tqdm is not None:
        it = tqdm(batches, desc="reference SAE features", unit="batch")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx in it:
                batch = collate_pairs([tokenized_pairs[i] for i in idx], pad_id=backbone.end_id)
                hidden = block_output(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), layer)
                pooled = pool_answer_features(hidden.to(sae_device), batch["answer_mask"].to(sae_device), sae)  # [2b, d_sae]
                pooled = pooled.float().cpu()
                b = len(idx)
                ix = torch.tensor(idx)
                chosen[ix] = pooled[:b]  # collate_pairs: chosen rows first, then rejected
                rejected[ix] = pooled[b:]
    finally:
        model.train(was_training)
    if path is not None and key is not None:
        _write_ref_cache(path, key, chosen, rejected, layer)
        log.info("reference features: wrote %s", path)
    return chosen, rejected
