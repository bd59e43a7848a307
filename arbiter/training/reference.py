"""Precomputed reference columns: the schema ``arbiter train ref`` writes next to each pair and the checks that
a training run may use them (same token ids, same model, same layers / SAE), plus how a run picks its reference
(docs/methods.md "Reference model").

A pair's ``meta`` carries the columns named by :data:`REF` (one frozen :class:`RefColumns`); a loss that needs
no reference (SimPO) ignores them, MIPO and FPO train from them only."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from torch import Tensor

from arbiter.training.config import ConfigError

log = logging.getLogger("arbiter.training.reference")



@dataclass(frozen=True)
class RefColumns:
    """Names of the precomputed reference columns (written by ``arbiter train ref``, read from PreferencePair.meta)."""

    chosen_logp: str = "ref_chosen_logp"
    rejected_logp: str = "ref_rejected_logp"
    chosen_length: str = "ref_chosen_length"
    rejected_length: str = "ref_rejected_length"
    ids_sha: str = "ref_ids_sha"  # hash of the exact token ids the reference saw
    model: str = "ref_model"  # backbone identity (name, vocabulary hash, shape)
    layers: str = "ref_layers"  # intermediate DPO: which blocks
    apply_final_norm: str = "ref_apply_final_norm"
    chosen_layer_logps: str = "ref_chosen_layer_logps"
    rejected_layer_logps: str = "ref_rejected_layer_logps"
    sae: str = "ref_sae"  # FPO: the SAE's digest
    sae_layer: str = "ref_sae_layer"  # FPO: the SAE's layer
    chosen_features: str = "ref_chosen_features"
    rejected_features: str = "ref_rejected_features"

    def names(self) -> tuple[str, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


REF = RefColumns()


def ids_sha(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> str:
    """Identity of the exact token ids a precomputed reference saw (prompt truncation, max_length, tokenizer)."""
    h = hashlib.sha1()
    for ids in (prompt_ids, chosen_ids, rejected_ids):
        h.update(json.dumps(list(ids), separators=(",", ":")).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


def model_id(fingerprint: Any) -> str:
    return f"{fingerprint.model_name}:{fingerprint.num_layers}x{fingerprint.hidden_size}:{fingerprint.vocab_hash[:16]}"


def has_precomputed_ref(pairs: Sequence[Any], keys: Sequence[str] = ()) -> bool:
    want = (REF.chosen_logp, REF.rejected_logp, *keys)
    return bool(pairs) and all(all(k in p.meta for k in want) for p in pairs)


def decide_reference(loss: str, mode: str, pairs: Sequence[Any], source: str) -> str:
    """'none' (SimPO), 'precomputed' or 'adapter_disabled'; errors clearly when the columns are needed but absent.

    ``auto`` uses the precomputed columns only when every pair has all that this loss needs (per-layer
    log-probs for intermediate DPO); otherwise the adapter-disabled model is the reference."""
    from arbiter.training.batch import LOSSES

    entry = LOSSES[loss]
    if not entry.needs_reference:
        return "none"
    present = has_precomputed_ref(pairs)
    if mode == "auto" and loss == "intermediate_dpo" and present and not has_precomputed_ref(pairs, (REF.chosen_layer_logps,)):
        log.warning("%s has reference log-probs but no per-layer ones: using the adapter-disabled reference", source)
        return "adapter_disabled"
    if mode == "precomputed" or entry.precomputed_reference:
        if not present:
            some = sum(REF.chosen_logp in p.meta for p in pairs)
            raise ConfigError(
                f"loss {loss!r} with reference={mode!r} needs precomputed reference log-probs in every pair "
                f"(columns {REF.chosen_logp}/{REF.rejected_logp}); {source!r} has them in {some} of {len(pairs)} pairs. "
                f"Run `arbiter train ref data.source={source} out=<file>.parquet` and train on its output."
            )
        return "precomputed"
    if mode == "adapter_disabled":
        return "adapter_disabled"
    return "precomputed" if present else "adapter_disabled"


def check_ref_columns(pairs: Sequence[Any], *, layers: Sequence[int] | None, apply_final_norm: bool | None,
                      sae_digest: str | None, sae_layer: int | None, need_features: bool = False) -> None:
    """The precomputed columns must match what this run computes (layers, final norm, SAE); fails before training.
    ``need_features`` checks that SAE feature columns exist; with ``sae_digest`` also that they come from
    that SAE and layer."""
    for i, p in enumerate(pairs):
        m = p.meta
        where = f"pair {i} ({m.get('source', '?')})"
        if layers is not None:
            if REF.chosen_layer_logps not in m or REF.layers not in m:
                raise ConfigError(
                    f"{where}: intermediate DPO needs per-layer reference log-probs ({REF.chosen_layer_logps}); "
                    f"precompute them with `arbiter train ref layers=[{','.join(map(str, layers))}]`"
                )
            if [int(x) for x in m[REF.layers]] != [int(x) for x in layers]:
                raise ConfigError(f"{where}: reference layers {m[REF.layers]} differ from intermediate.layers {list(layers)}")
            if bool(m.get(REF.apply_final_norm, True)) != bool(apply_final_norm):
                raise ConfigError(f"{where}: reference apply_final_norm={m.get(REF.apply_final_norm)} differs from this run's")
        if need_features or sae_digest is not None:
            if REF.chosen_features not in m or REF.rejected_features not in m:
                raise ConfigError(
                    f"{where}: FPO needs reference SAE features ({REF.chosen_features}); precompute them with "
                    "`arbiter train ref sae=<dir>`"
                )
        if sae_digest is not None:
            if m.get(REF.sae) != sae_digest:
                raise ConfigError(f"{where}: reference features were computed with another SAE ({m.get(REF.sae)!r})")
            if int(m.get(REF.sae_layer, -1)) != sae_layer:
                raise ConfigError(f"{where}: reference features come from layer {m.get(REF.sae_layer)}, not {sae_layer}")


def check_ref_tokens(tokenized: Sequence[Any], fingerprint: Any) -> None:
    """Precomputed log-probs are only valid for the exact token ids and model they were computed with."""
    want_model = model_id(fingerprint)
    for i, tp in enumerate(tokenized):
        m = tp.meta
        if m.get(REF.model) not in (None, want_model):
            raise ConfigError(f"pair {i}: reference log-probs were computed with {m[REF.model]!r}, this run uses {want_model!r}")
        sha = m.get(REF.ids_sha)
        if sha is not None and sha != ids_sha(tp.prompt_ids, tp.chosen_ids, tp.rejected_ids):
            raise ConfigError(
                f"pair {i} ({m.get('source', '?')}): the precomputed reference saw other token ids (different "
                "tokenizer, max_length or truncate_prompt); recompute it with the same data settings"
            )
        for key, ids in ((REF.chosen_length, tp.chosen_ids), (REF.rejected_length, tp.rejected_ids)):
            if key in m and int(m[key]) != len(ids):
                raise ConfigError(f"pair {i}: {key}={m[key]} but the answer has {len(ids)} tokens")


def precomputed_ref(batch_pairs: Sequence[Any], device: torch.device, *, layers: bool, features: bool) -> dict[str, Tensor]:
    """Reference values of a micro-batch from pair meta, in collate_pairs row order (chosen rows, then rejected)."""
    metas = [tp.meta for tp in batch_pairs]
    out = {
        "logps": torch.tensor([float(m[REF.chosen_logp]) for m in metas] + [float(m[REF.rejected_logp]) for m in metas],
                              dtype=torch.float32, device=device),  # [2B]
    }
    if layers:
        c = torch.tensor([m[REF.chosen_layer_logps] for m in metas], dtype=torch.float32)  # [B, K]
        r = torch.tensor([m[REF.rejected_layer_logps] for m in metas], dtype=torch.float32)  # [B, K]
        out["layer_logps"] = torch.cat([c, r]).T.contiguous().to(device)  # [K, 2B]
    if features:
        c = torch.tensor([m[REF.chosen_features] for m in metas], dtype=torch.float32)  # [B, F]
        r = torch.tensor([m[REF.rejected_features] for m in metas], dtype=torch.float32)  # [B, F]
        out["features"] = torch.cat([c, r]).to(device)  # [2B, F]
    return out
