"""``arbiter train ref``: precompute the reference model's log-probs (and FPO's SAE features) offline.

    arbiter train ref data.source=hh-rlhf data.max_length=512 out=data/hh_ref.parquet
    arbiter train adapter --loss mipo data.source=data/hh_ref.parquet ...

Runs the base model once over every pair and writes the pairs in TRL's conversational columns
(``prompt`` messages, ``chosen`` / ``rejected`` as one assistant message; the pair's other metadata as
extra columns) plus:

  ref_chosen_logp, ref_rejected_logp      summed answer log-probs under the base model (float)
  ref_chosen_length, ref_rejected_length  answer tokens incl. <|im_end|> (int)
  ref_ids_sha                             hash of the exact prompt/chosen/rejected token ids
  ref_model                               backbone identity (name, shape, vocabulary hash)
  ref_layers, ref_apply_final_norm,       intermediate DPO (``layers=[...]``): per-layer summed log-probs,
  ref_chosen_layer_logps, ...             logit lens (final norm + LM head) on the raw output of each block
  ref_sae, ref_sae_layer,                 FPO (``sae=<dir>``): SAE digest + layer, and the full mean-pooled
  ref_chosen_features, ...                SAE feature vectors (FPO picks its top-k by the POLICY's values)

Adapter training reads these through ``load_pairs`` (they land in ``PreferencePair.meta``), checks that the
token ids and the model match, and then runs no reference forward at all. The file is written to a
temporary sibling and renamed into place (``.jsonl`` or ``.parquet``; parquet is far smaller once SAE
features are included).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from arbiter.training.config import ConfigError
from arbiter.training.logprobs import forward_logps
from arbiter.training.loop import make_accelerator
from arbiter.training.lora import resolve_backbone
from arbiter.training.reference import REF, ids_sha, model_id
from arbiter.training.sections import DataConfig

log = logging.getLogger("arbiter.training.ref")

_PAIR_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class RefConfig:
    out: str = ""  # .jsonl or .parquet (required)
    model: str | None = None
    data: DataConfig = field(default_factory=DataConfig)  # use the same data settings as the training run
    layers: list[int] = field(default_factory=list)  # intermediate DPO blocks (empty: none)
    apply_final_norm: bool = True  # intermediate DPO: logit lens through the final norm (as in training)
    sae: str | None = None  # FPO: SAE directory
    sae_layer: int | None = None  # None: the SAE's own hook layer
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # match the training run (auto: bf16 on CUDA)
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        self.data.validate()
        if not self.out:
            raise ConfigError("out must name the output file (.jsonl or .parquet)")
        if not self.out.endswith((".jsonl", ".parquet")):
            raise ConfigError(f"out must end in .jsonl or .parquet, got {self.out!r}")
        if Path(self.out).exists() and not self.overwrite:
            raise ConfigError(f"{self.out} exists; pass overwrite=true to replace it")
        if any(x < 0 for x in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers must be distinct block indices >= 0, got {self.layers}")
        if self.sae is not None and not Path(self.sae).is_dir():
            raise ConfigError(f"sae={self.sae!r} is not a directory")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda but CUDA is not available")


CONFIG = RefConfig
DESCRIPTION = "precompute the base model's reference log-probs (and FPO's SAE features) into the data file"


def _row(pair: Any) -> dict[str, Any]:
    row = {k: v for k, v in pair.meta.items() if k not in _PAIR_COLUMNS and not k.startswith("ref_")}
    row["prompt"] = pair.prompt
    row["chosen"] = [{"role": "assistant", "content": pair.chosen}]
    row["rejected"] = [{"role": "assistant", "content": pair.rejected}]
    return row


def write_rows(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write rows as JSONL or parquet via a temporary sibling + fsync + rename (never a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(list(rows)), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def reference_rows(
    bb: Any,
    tokenized: Sequence[Any],
    pairs_by_index: Sequence[Any],
    *,
    batch_size: int,
    layers: Sequence[int] = (),
    apply_final_norm: bool = True,
    sae: Any | None = None,
    sae_layer: int | None = None,
    sae_digest: str | None = None,
    autocast: Any = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One no-grad pass of the base model over every pair -> output rows (input order). Pairs are batched by
    length so that little padding is computed."""
    from tqdm.auto import tqdm

    from arbiter.training.data import collate_pairs

    model = bb.model
    mid = model_id(bb.fingerprint)
    n = len(tokenized)
    order = sorted(range(n), key=lambda i: -(len(tokenized[i].prompt_ids)
                                              + max(len(tokenized[i].chosen_ids), len(tokenized[i].rejected_ids))))
    rows: list[dict[str, Any] | None] = [None] * n
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in tqdm(range(0, n, batch_size), desc="reference log-probs", unit="batch", disable=not progress):
                idx = order[s : s + batch_size]
                chunk = [tokenized[i] for i in idx]
                batch = collate_pairs(chunk, bb.end_id)
                with autocast() if autocast is not None else nullcontext():
                    out = forward_logps(model, batch, layers=layers, apply_final_norm=apply_final_norm,
                                        capture_layers=[sae_layer] if sae_layer is not None else ())
                b = len(idx)
                logps = out.logps.float().cpu()  # [2B]
                layer_lp = out.layer_logps.float().cpu() if out.layer_logps is not None else None  # [K, 2B]
                feats = None
                if sae is not None and sae_layer is not None:
                    from arbiter.training.sae import pool_answer_features

                    hidden = out.captured[sae_layer]  # [2B, T, d]
                    feats = pool_answer_features(hidden, batch["answer_mask"].to(hidden.device), sae).float().cpu()
                for j, i in enumerate(idx):
                    tp = chunk[j]
                    row = _row(pairs_by_index[i])
                    row[REF.chosen_logp] = logps[j].item()
                    row[REF.rejected_logp] = logps[b + j].item()
                    row[REF.chosen_length] = len(tp.chosen_ids)
                    row[REF.rejected_length] = len(tp.rejected_ids)
                    row[REF.ids_sha] = ids_sha(tp.prompt_ids, tp.chosen_ids, tp.rejected_ids)
                    row[REF.model] = mid
                    if layer_lp is not None:
                        row[REF.layers] = [int(x) for x in layers]
                        row[REF.apply_final_norm] = bool(apply_final_norm)
                        row[REF.chosen_layer_logps] = layer_lp[:, j].tolist()
                        row[REF.rejected_layer_logps] = layer_lp[:, b + j].tolist()
                    if feats is not None:
                        row[REF.sae] = sae_digest
                        row[REF.sae_layer] = sae_layer
                        row[REF.chosen_features] = feats[j].tolist()
                        row[REF.rejected_features] = feats[b + j].tolist()
                    rows[i] = row
    finally:
        model.train(was_training)
    return [r for r in rows if r is not None]


def run(cfg: RefConfig, *, resume: bool = False, backbone: Any | None = None) -> dict[str, Any]:
    """Compute the reference columns for every usable pair and write ``cfg.out``. ``resume`` is accepted for
    the recipe protocol; this pass has no checkpoints (it is a single no-grad sweep)."""
    from arbiter.training.data import load_pairs, tokenize_pairs

    cfg.validate()
    t0 = time.perf_counter()
    # Every pair of the source, without a dev split: the training run splits the written file itself.
    pairs, report = load_pairs(cfg.data.source, limit=cfg.data.limit, seed=cfg.data.seed)
    log.info("data: %s", report.summary())
    bb = resolve_backbone(cfg.model, backbone)
    for layer in cfg.layers:
        if layer >= bb.num_layers:
            raise ConfigError(f"layers: block {layer} does not exist ({bb.num_layers} blocks)")
    sae = sae_layer = digest = None
    if cfg.sae:
        from arbiter.training.sae import load_sae, sae_digest

        sae = load_sae(cfg.sae, expect_d_in=bb.hidden_size)
        sae_layer = cfg.sae_layer if cfg.sae_layer is not None else sae.hook_layer
        if sae_layer is None or not 0 <= sae_layer < bb.num_layers:
            raise ConfigError(f"{cfg.sae}: no usable SAE layer ({sae_layer!r}); set sae_layer")
        digest = sae_digest(sae)
        sae.requires_grad_(False).eval()

    # tokenize_pairs keeps the input order of the pairs it keeps; tag each pair with its index to map back.
    tagged = [type(p)(p.prompt, p.chosen, p.rejected, {**p.meta, "_ref_index": i}) for i, p in enumerate(pairs)]
    tokenized, tok_report = tokenize_pairs(tagged, bb.tokenizer, bb.end_id, max_length=cfg.data.max_length,
                                           truncate_prompt=cfg.data.truncate_prompt)
    log.info("tokenised: %s", tok_report.summary())
    kept_pairs = [pairs[tp.meta["_ref_index"]] for tp in tokenized]
    for tp in tokenized:
        tp.meta.pop("_ref_index", None)

    acc = make_accelerator(cfg.device, cfg.precision)
    home = next(bb.model.parameters()).device  # a caller's backbone goes back where it was
    bb.model.to(acc.device)
    if sae is not None:
        sae.to(acc.device)
    try:
        rows = reference_rows(bb, tokenized, kept_pairs, batch_size=cfg.data.batch_size, layers=cfg.layers,
                              apply_final_norm=cfg.apply_final_norm, sae=sae, sae_layer=sae_layer,
                              sae_digest=digest, autocast=acc.autocast, progress=cfg.progress)
    finally:
        if backbone is not None:
            bb.model.to(home)
    path = write_rows(rows, Path(cfg.out))
    seconds = time.perf_counter() - t0
    tokens = sum(len(tp.prompt_ids) * 2 + len(tp.chosen_ids) + len(tp.rejected_ids) for tp in tokenized)
    result = {
        "out": str(path), "rows": len(rows), "data_report": report.to_dict(), "tokenize_report": tok_report.to_dict(),
        "layers": list(cfg.layers), "sae": cfg.sae, "sae_layer": sae_layer, "seconds": seconds,
        "tokens": tokens, "tokens_per_s": tokens / seconds if seconds > 0 else None, "model": model_id(bb.fingerprint),
    }
    log.info("wrote %d rows to %s in %.1f s", len(rows), path, seconds)
    return result
