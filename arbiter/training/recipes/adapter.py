"""``arbiter train adapter``: align a LoRA adapter with DPO, cDPO, IPO, SimPO, MIPO, FPO or intermediate DPO.

    arbiter train adapter --loss dpo data.source=hh-rlhf data.limit=2000 --out runs/dpo

setup -> train -> save:
  1. config validated (before any model loads), data loaded and split, precomputed reference columns checked;
  2. backbone loaded, pairs tokenised with the shared chat encoding, LoRA (PEFT) attached to
     q/k/v/o/gate/up/down projections;
  3. AdamW + warmup and linear/cosine decay, gradient accumulation, clipping, bf16 autocast on CUDA,
     TRL-named metrics to ``<out>/metrics.jsonl`` (+ tqdm), a checkpoint every ``save_every`` steps
     (``--resume`` continues exactly), a non-finite loss stops the run and keeps the last good checkpoint;
  4. the adapter is written atomically in PEFT format to ``<out>/adapter``
     (adapter_config.json + adapter_model.safetensors, plus arbiter_adapter.json with provenance).

Reference model: the same network with the adapter disabled (``model.disable_adapter()`` under no_grad),
or log-probs precomputed offline by ``arbiter train ref`` and stored with the data (``ref_*`` columns):
then no reference forward runs at all. MIPO and FPO require the precomputed columns (their point is
training with no reference model); SimPO needs no reference.

This module is also the library for the other LoRA recipes (``joint``, ``ref``): the shared config
sections, data preparation, reference handling and the training loop live here.

Distributed: the loop uses ``accelerate.Accelerator``, so ``accelerate launch -m arbiter.cli train adapter``
runs data-parallel without code changes (each process takes its own slice of every global batch; the
policy pass goes through the prepared module so DDP syncs gradients). Exact resume is guaranteed for a
single process; multi-process resume restores rank 0's RNG state on every rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from arbiter.training.artifacts import atomic_dir, atomic_write_json, atomic_write_text
from arbiter.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, seed_everything
from arbiter.training.config import ConfigError
from arbiter.training.logprobs import forward_logps, split_pairs
from arbiter.training.losses import LOSSES, LossOutput, preference_metrics

log = logging.getLogger("arbiter.training.adapter")

ADAPTER_LOSSES = ("dpo", "cdpo", "ipo", "simpo", "mipo", "fpo", "intermediate_dpo")
REF_REQUIRED = ("mipo", "fpo")  # trained from precomputed reference columns only
REF_FREE = ("simpo",)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Precomputed reference columns (written by ``arbiter train ref``, read back from PreferencePair.meta).
REF_CHOSEN, REF_REJECTED = "ref_chosen_logp", "ref_rejected_logp"
REF_CHOSEN_LEN, REF_REJECTED_LEN = "ref_chosen_length", "ref_rejected_length"
REF_IDS_SHA = "ref_ids_sha"  # hash of the exact token ids the reference saw
REF_MODEL = "ref_model"  # backbone identity (name, vocabulary hash, shape)
REF_LAYERS = "ref_layers"  # intermediate DPO: which blocks
REF_LAYER_NORM = "ref_apply_final_norm"
REF_CHOSEN_LAYERS, REF_REJECTED_LAYERS = "ref_chosen_layer_logps", "ref_rejected_layer_logps"
REF_SAE, REF_SAE_LAYER = "ref_sae", "ref_sae_layer"  # FPO: SAE digest and its layer
REF_CHOSEN_FEATS, REF_REJECTED_FEATS = "ref_chosen_features", "ref_rejected_features"

ADAPTER_META_FILE = "arbiter_adapter.json"


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the message names the step and the last good checkpoint."""


# ==============================================================================================================
# Configuration (shared sections first; ``joint`` and ``ref`` reuse them)


@dataclass
class DataConfig:
    source: str = "hh-rlhf"  # a builtin name or a .jsonl/.json/.parquet file (TRL columns, optional ref_*)
    limit: int | None = None  # first N usable pairs after a seeded shuffle
    seed: int = 0
    max_length: int = 512  # prompt + longer answer, in tokens; longer pairs are dropped (and counted)
    truncate_prompt: bool = False  # keep over-long pairs by left-truncating the prompt instead
    dev_fraction: float = 0.0  # held-out pairs (grouped by prompt) for eval_* metrics
    batch_size: int = 8  # pairs per forward in no-grad passes (eval, reference)

    def validate(self) -> None:
        if not self.source:
            raise ConfigError("data.source must name a builtin dataset or a file")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit must be >= 1, got {self.limit}")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length must be >= 8, got {self.max_length}")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ConfigError(f"data.dev_fraction must lie in [0, 1), got {self.dev_fraction}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class LoraSection:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must lie in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module")


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = None  # None: round(warmup_ratio * total steps)
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0  # decay ends at lr * min_lr_ratio
    batch_size: int = 4  # preference pairs per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimiser step
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    epochs: float = 1.0
    max_steps: int | None = None  # optimiser steps; overrides epochs

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("optim.batch_size and optim.grad_accum must be >= 1")
        if self.max_grad_norm < 0:
            raise ConfigError(f"optim.max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError(f"optim.epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"optim.max_steps must be >= 1, got {self.max_steps}")


@dataclass
class CdpoSection:
    eps: float = 0.1  # label-smoothing (assumed flip probability), [0, 0.5]


@dataclass
class SimpoSection:
    gamma: float = 0.5  # target reward margin


@dataclass
class MipoSection:
    modulation: Literal["softplus", "identity"] = "softplus"


@dataclass
class FpoSection:
    alpha: float = 0.5  # weight of the feature-level MSE constraint
    top_k: int = 50  # features compared (the policy's k largest pooled activations)
    sae: str | None = None  # SAE directory (SAELens layout; ``arbiter train sae`` writes one)
    layer: int | None = None  # block whose raw output the SAE reads; None = the SAE's own hook layer


@dataclass
class IntermediateSection:
    # docs/methods.md "Intermediate DPO": the paper's best was layers 11 and 22 of 32; for 30 blocks the same
    # relative depths are blocks 10 and 20 (0-based, raw block outputs).
    layers: list[int] = field(default_factory=lambda: [10, 20])
    weight: float = 0.9  # the paper's 0.9
    weight_on: Literal["intermediate", "final"] = "intermediate"  # L = 0.1 L_DPO + 0.9 L_inter by default
    # "lm_head": logit lens with the model's own LM head (default). "linear": a NEW shared Linear(d, V)
    # initialised from the LM head and trained with the adapter (saved as inter_projection.safetensors);
    # its reference is the frozen LM head, i.e. the projection at initialisation.
    projection: Literal["lm_head", "linear"] = "lm_head"
    apply_final_norm: bool = True  # the model's own final norm before the projection


@dataclass
class AdapterConfig:
    loss: Literal["dpo", "cdpo", "ipo", "simpo", "mipo", "fpo", "intermediate_dpo"] = "dpo"
    beta: float | None = None  # None: the loss function's own default (dpo 0.1, simpo 2.0, mipo 20, ...)
    model: str | None = None  # None: the embedded default (or ARBITER_MODEL)
    reference: Literal["auto", "adapter_disabled", "precomputed"] = "auto"  # auto: precomputed if present
    out: str = "runs/adapter"  # the run directory (CLI: --out)
    overwrite: bool = False  # allow replacing a finished/old run in out (without --resume)
    seed: int = 0
    save_every: int = 0  # checkpoint every N optimiser steps (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 1
    eval_every: int = 0  # dev-set metrics every N steps (needs data.dev_fraction > 0); always at the end
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cdpo: CdpoSection = field(default_factory=CdpoSection)
    simpo: SimpoSection = field(default_factory=SimpoSection)
    mipo: MipoSection = field(default_factory=MipoSection)
    fpo: FpoSection = field(default_factory=FpoSection)
    intermediate: IntermediateSection = field(default_factory=IntermediateSection)

    def validate(self) -> None:
        validate_common(self)
        if self.loss not in ADAPTER_LOSSES:
            raise ConfigError(f"loss must be one of {list(ADAPTER_LOSSES)}, got {self.loss!r}")
        if self.loss in REF_REQUIRED and self.reference == "adapter_disabled":
            raise ConfigError(
                f"loss {self.loss!r} trains from precomputed reference columns only (run `arbiter train ref` "
                "first); reference=adapter_disabled is not allowed for it"
            )
        if not 0.0 <= self.cdpo.eps <= 0.5:
            raise ConfigError(f"cdpo.eps must lie in [0, 0.5], got {self.cdpo.eps}")
        if self.loss == "fpo":
            if not self.fpo.sae:
                raise ConfigError("loss fpo needs fpo.sae (an SAE directory; `arbiter train sae` makes one)")
            if not Path(self.fpo.sae).is_dir():
                raise ConfigError(f"fpo.sae={self.fpo.sae!r} is not a directory")
            if self.fpo.top_k < 1 or self.fpo.alpha < 0:
                raise ConfigError("fpo.top_k must be >= 1 and fpo.alpha >= 0")
        if self.loss == "intermediate_dpo":
            if not self.intermediate.layers or any(x < 0 for x in self.intermediate.layers):
                raise ConfigError(f"intermediate.layers must be non-empty block indices >= 0, got {self.intermediate.layers}")
            if len(set(self.intermediate.layers)) != len(self.intermediate.layers):
                raise ConfigError(f"intermediate.layers has duplicates: {self.intermediate.layers}")
            if not 0.0 <= self.intermediate.weight <= 1.0:
                raise ConfigError(f"intermediate.weight must lie in [0, 1], got {self.intermediate.weight}")


def validate_common(cfg: Any) -> None:
    """Checks shared by every LoRA recipe config (sections validate themselves when loaded from YAML)."""
    for section in ("data", "lora", "optim"):
        getattr(cfg, section).validate()
    if cfg.beta is not None and cfg.beta <= 0:
        raise ConfigError(f"beta must be > 0, got {cfg.beta}")
    if not cfg.out:
        raise ConfigError("out (the run directory) must be set")
    for name in ("save_every", "log_every", "eval_every", "keep_checkpoints"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.log_every < 1:
        raise ConfigError("log_every must be >= 1")
    if cfg.eval_every and cfg.data.dev_fraction == 0:
        raise ConfigError("eval_every needs a dev set: set data.dev_fraction > 0")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available")


CONFIG = AdapterConfig
DESCRIPTION = "align a LoRA adapter with DPO, cDPO, IPO, SimPO, MIPO, FPO or intermediate DPO"


def add_arguments(parser: Any) -> None:
    """``--loss NAME``: the CLI's shortcut for the config key ``loss``."""
    parser.add_argument("--loss", choices=ADAPTER_LOSSES, default=None, help="preference loss (config key 'loss')")


def loss_beta(loss: str, beta: float | None) -> float:
    """The beta a loss runs with: the configured one, else the loss function's own default."""
    if beta is not None:
        return float(beta)
    default = inspect.signature(LOSSES[loss]).parameters["beta"].default
    return float(default)


# ==============================================================================================================
# Data and precomputed reference columns


def ids_sha(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> str:
    """Identity of the exact token ids a precomputed reference saw (prompt truncation, max_length, tokenizer)."""
    h = hashlib.sha1()
    for ids in (prompt_ids, chosen_ids, rejected_ids):
        h.update(json.dumps(list(ids), separators=(",", ":")).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


def model_id(fingerprint: Any) -> str:
    return f"{fingerprint.model_name}:{fingerprint.num_layers}x{fingerprint.hidden_size}:{fingerprint.vocab_hash[:16]}"


def load_preference_data(cfg: DataConfig) -> tuple[list, list, dict]:
    """(train pairs, dev pairs, report dict); logs the data report."""
    from arbiter.training.data import load_pairs
    from arbiter.training.data import split_pairs as split_data

    pairs, report = load_pairs(cfg.source, limit=cfg.limit, seed=cfg.seed)
    log.info("data: %s", report.summary())
    train, dev = split_data(pairs, dev_fraction=cfg.dev_fraction, seed=cfg.seed)
    return train, dev, report.to_dict()


def has_precomputed_ref(pairs: Sequence[Any], keys: Sequence[str] = ()) -> bool:
    want = (REF_CHOSEN, REF_REJECTED, *keys)
    return bool(pairs) and all(all(k in p.meta for k in want) for p in pairs)


def decide_reference(loss: str, mode: str, pairs: Sequence[Any], source: str) -> str:
    """'none' (SimPO), 'precomputed' or 'adapter_disabled'; errors clearly when the columns are needed but absent.

    ``auto`` uses the precomputed columns only when every pair has all that this loss needs (per-layer
    log-probs for intermediate DPO); otherwise the adapter-disabled model is the reference."""
    if loss in REF_FREE:
        return "none"
    present = has_precomputed_ref(pairs)
    if mode == "auto" and loss == "intermediate_dpo" and present and not has_precomputed_ref(pairs, (REF_CHOSEN_LAYERS,)):
        log.warning("%s has reference log-probs but no per-layer ones: using the adapter-disabled reference", source)
        return "adapter_disabled"
    if mode == "precomputed" or loss in REF_REQUIRED:
        if not present:
            some = sum(REF_CHOSEN in p.meta for p in pairs)
            raise ConfigError(
                f"loss {loss!r} with reference={mode!r} needs precomputed reference log-probs in every pair "
                f"(columns {REF_CHOSEN}/{REF_REJECTED}); {source!r} has them in {some} of {len(pairs)} pairs. "
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
            if REF_CHOSEN_LAYERS not in m or REF_LAYERS not in m:
                raise ConfigError(
                    f"{where}: intermediate DPO needs per-layer reference log-probs ({REF_CHOSEN_LAYERS}); "
                    f"precompute them with `arbiter train ref layers=[{','.join(map(str, layers))}]`"
                )
            if [int(x) for x in m[REF_LAYERS]] != [int(x) for x in layers]:
                raise ConfigError(f"{where}: reference layers {m[REF_LAYERS]} differ from intermediate.layers {list(layers)}")
            if bool(m.get(REF_LAYER_NORM, True)) != bool(apply_final_norm):
                raise ConfigError(f"{where}: reference apply_final_norm={m.get(REF_LAYER_NORM)} differs from this run's")
        if need_features or sae_digest is not None:
            if REF_CHOSEN_FEATS not in m or REF_REJECTED_FEATS not in m:
                raise ConfigError(
                    f"{where}: FPO needs reference SAE features ({REF_CHOSEN_FEATS}); precompute them with "
                    "`arbiter train ref sae=<dir>`"
                )
        if sae_digest is not None:
            if m.get(REF_SAE) != sae_digest:
                raise ConfigError(f"{where}: reference features were computed with another SAE ({m.get(REF_SAE)!r})")
            if int(m.get(REF_SAE_LAYER, -1)) != int(sae_layer):
                raise ConfigError(f"{where}: reference features come from layer {m.get(REF_SAE_LAYER)}, not {sae_layer}")


def check_ref_tokens(tokenized: Sequence[Any], fingerprint: Any) -> None:
    """Precomputed log-probs are only valid for the exact token ids and model they were computed with."""
    want_model = model_id(fingerprint)
    for i, tp in enumerate(tokenized):
        m = tp.meta
        if m.get(REF_MODEL) not in (None, want_model):
            raise ConfigError(f"pair {i}: reference log-probs were computed with {m[REF_MODEL]!r}, this run uses {want_model!r}")
        sha = m.get(REF_IDS_SHA)
        if sha is not None and sha != ids_sha(tp.prompt_ids, tp.chosen_ids, tp.rejected_ids):
            raise ConfigError(
                f"pair {i} ({m.get('source', '?')}): the precomputed reference saw other token ids (different "
                "tokenizer, max_length or truncate_prompt); recompute it with the same data settings"
            )
        for key, ids in ((REF_CHOSEN_LEN, tp.chosen_ids), (REF_REJECTED_LEN, tp.rejected_ids)):
            if key in m and int(m[key]) != len(ids):
                raise ConfigError(f"pair {i}: {key}={m[key]} but the answer has {len(ids)} tokens")


def precomputed_ref(batch_pairs: Sequence[Any], device: torch.device, *, layers: bool, features: bool) -> dict[str, Tensor]:
    """Reference values of a micro-batch from pair meta, in collate_pairs row order (chosen rows, then rejected)."""
    metas = [tp.meta for tp in batch_pairs]
    out = {
        "logps": torch.tensor([float(m[REF_CHOSEN]) for m in metas] + [float(m[REF_REJECTED]) for m in metas],
                              dtype=torch.float32, device=device),  # [2B]
    }
    if layers:
        c = torch.tensor([m[REF_CHOSEN_LAYERS] for m in metas], dtype=torch.float32)  # [B, K]
        r = torch.tensor([m[REF_REJECTED_LAYERS] for m in metas], dtype=torch.float32)  # [B, K]
        out["layer_logps"] = torch.cat([c, r]).T.contiguous().to(device)  # [K, 2B]
    if features:
        c = torch.tensor([m[REF_CHOSEN_FEATS] for m in metas], dtype=torch.float32)  # [B, F]
        r = torch.tensor([m[REF_REJECTED_FEATS] for m in metas], dtype=torch.float32)  # [B, F]
        out["features"] = torch.cat([c, r]).to(device)  # [2B, F]
    return out


# ==============================================================================================================
# Model: LoRA attach / detach, the policy module


def resolve_backbone(model_spec: str | None, backbone: Any | None) -> Any:
    if backbone is not None:
        return backbone
    from arbiter.backbone import load_backbone

    return load_backbone(model_spec)


def attach_lora(model: nn.Module, section: LoraSection, *, gradient_checkpointing: bool = False) -> tuple[Any, Callable[[], None]]:
    """Wrap ``model`` with a fresh trainable LoRA adapter; returns (peft model, restore) where ``restore()``
    removes the adapter again and restores requires_grad / train mode (the backbone object is shared)."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in section.target_modules if t not in names]
    if missing:
        raise ConfigError(f"lora.target_modules {missing} do not exist in {type(model).__name__}")
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pcfg = LoraConfig(
        r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
        target_modules=list(section.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, pcfg)

    def restore() -> None:
        base = peft_model.unload()  # removes the LoRA layers (no merge): the base weights are untouched
        if hasattr(base, "peft_config"):
            del base.peft_config
        if gradient_checkpointing:
            base.gradient_checkpointing_disable()
        for n, p in base.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
        base.train(was_training)

    return peft_model, restore


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


class PolicyModule(nn.Module):
    """Everything the policy pass trains, as one module whose forward is the whole pass (so that
    accelerate/DDP sees one module and syncs the gradients of LoRA, head and projection alike)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[int] = (),
        projection: nn.Module | None = None,
        apply_final_norm: bool = True,
        head: nn.Module | None = None,
        detach_head_features: bool = False,
        sae: nn.Module | None = None,
        sae_layer: int | None = None,
    ):
        super().__init__()
        self.model = model
        self.layers = list(layers)
        self.projection = projection
        self.apply_final_norm = apply_final_norm
        self.head = head
        self.detach_head_features = detach_head_features
        self.sae = sae
        self.sae_layer = sae_layer

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = forward_logps(
            self.model, batch,
            layers=self.layers,
            projection=self.projection if self.projection is not None else "lm_head",
            apply_final_norm=self.apply_final_norm,
            end_features=self.head is not None,
            capture_layers=[self.sae_layer] if self.sae is not None else (),
        )
        res = {"logps": out.logps, "lengths": out.lengths}  # [2B], [2B]
        if self.layers:
            res["layer_logps"] = out.layer_logps  # [K, 2B]
        if self.head is not None:
            feats = out.end_hidden.detach() if self.detach_head_features else out.end_hidden  # [2B, d]
            res["head_rewards"] = self.head(feats).float()  # [2B]
        if self.sae is not None:
            from arbiter.training.sae import pool_answer_features

            hidden = out.captured[self.sae_layer]  # [2B, T, d]
            mask = batch["answer_mask"].to(hidden.device)
            res["features"] = pool_answer_features(hidden, mask, self.sae).float()  # [2B, F]
        return res


def reference_pass(peft_model: Any, batch: dict[str, Tensor], *, layers: Sequence[int] = (),
                   apply_final_norm: bool = True) -> dict[str, Tensor]:
    """The base model's log-probs: the same network with the adapter disabled, no grad."""
    with torch.no_grad(), peft_model.disable_adapter():
        out = forward_logps(peft_model, batch, layers=layers, apply_final_norm=apply_final_norm)
    res = {"logps": out.logps}
    if layers:
        res["layer_logps"] = out.layer_logps
    return res


def adapter_loss(cfg: AdapterConfig, pol: dict[str, Tensor], ref: dict[str, Tensor] | None) -> LossOutput:
    """Dispatch to ``LOSSES[cfg.loss]`` with the right inputs. pol/ref hold collate_pairs-ordered tensors."""
    beta = loss_beta(cfg.loss, cfg.beta)
    pc, pr = split_pairs(pol["logps"])  # [B], [B]
    lc, lr = split_pairs(pol["lengths"])  # [B], [B]
    if cfg.loss == "simpo":
        return LOSSES["simpo"](pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=beta, gamma=cfg.simpo.gamma)
    assert ref is not None
    rc, rr = split_pairs(ref["logps"].to(pc.device))
    if cfg.loss == "dpo":
        return LOSSES["dpo"](pc, pr, rc, rr, beta=beta)
    if cfg.loss == "cdpo":
        return LOSSES["cdpo"](pc, pr, rc, rr, beta=beta, eps=cfg.cdpo.eps)
    if cfg.loss == "ipo":
        return LOSSES["ipo"](pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, beta=beta)
    if cfg.loss == "mipo":
        return LOSSES["mipo"](pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, beta=beta,
                              modulation=cfg.mipo.modulation)
    if cfg.loss == "fpo":
        fc, fr = pol["features"].chunk(2, dim=0)  # [B, F] each
        gc, gr = ref["features"].to(fc.device).chunk(2, dim=0)
        return LOSSES["fpo"](pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr,
                             policy_chosen_features=fc, policy_rejected_features=fr,
                             ref_chosen_features=gc, ref_rejected_features=gr,
                             beta=beta, alpha=cfg.fpo.alpha, top_k=cfg.fpo.top_k)
    if cfg.loss == "intermediate_dpo":
        kc, kr = split_pairs(pol["layer_logps"])  # [K, B]
        jc, jr = split_pairs(ref["layer_logps"].to(kc.device))
        return LOSSES["intermediate_dpo"](pc, pr, rc, rr, layer_policy_chosen_logps=kc, layer_policy_rejected_logps=kr,
                                          layer_ref_chosen_logps=jc, layer_ref_rejected_logps=jr, beta=beta,
                                          inter_weight=cfg.intermediate.weight, weight_on=cfg.intermediate.weight_on)
    raise ConfigError(f"unknown adapter loss {cfg.loss!r}")


def step_metrics(out: LossOutput, pol: dict[str, Tensor]) -> dict[str, float]:
    """TRL-named scalars for one micro-batch: loss, rewards/*, logps/chosen, logps/rejected (+ loss extras)."""
    metrics = preference_metrics(out)
    pc, pr = split_pairs(pol["logps"].detach())
    metrics["logps/chosen"] = pc.float().mean().item()
    metrics["logps/rejected"] = pr.float().mean().item()
    return metrics


# ==============================================================================================================
# The training loop (shared with the joint recipe)


def lr_lambda(total: int, warmup: int, schedule: str, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base lr at optimiser step s (0-based): linear warmup reaching 1 at step ``warmup - 1``,
    then cosine/linear decay to ``min_ratio`` at the last step, or constant."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_accelerator(device: str, precision: str) -> Any:
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and device != "cpu"
    if precision == "auto":
        mixed = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    else:
        mixed = "bf16" if precision == "bf16" else "no"
    return Accelerator(cpu=not cuda, mixed_precision=mixed)


@dataclass
class LoopSpec:
    """What :func:`train_loop` needs from a recipe."""

    cfg: Any
    accelerator: Any
    policy: nn.Module  # prepared PolicyModule
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trainables: dict[str, nn.Parameter]  # checkpointed tensors, by stable name
    train: list  # TokenizedPair
    dev: list
    pad_id: int
    total_steps: int
    compute: Callable[[dict[str, Tensor], list, bool], tuple[LossOutput, dict[str, float]]]
    after_step: Callable[[], None] | None = None
    extra_state: dict[str, Tensor] = field(default_factory=dict)  # also checkpointed (e.g. prior weights)


def micro_batches_per_epoch(n: int, batch_size: int, world: int) -> int:
    if world == 1:
        return math.ceil(n / batch_size)
    return n // (batch_size * world)


def micro_batch(n: int, m: int, *, batch_size: int, seed: int, rank: int, world: int) -> list[int]:
    """Pair indices of global micro-batch ``m`` for this process; the order is a seeded permutation per epoch."""
    per_epoch = micro_batches_per_epoch(n, batch_size, world)
    epoch, i = divmod(m, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    start = (i * world + rank) * batch_size
    return perm[start : start + batch_size].tolist()


def total_optimizer_steps(n_train: int, optim: OptimConfig, world: int) -> int:
    per_epoch = micro_batches_per_epoch(n_train, optim.batch_size, world)
    if per_epoch < 1:
        raise ConfigError(
            f"{n_train} training pairs do not fill one batch of {optim.batch_size} pairs x {world} processes"
        )
    if optim.max_steps is not None:
        return optim.max_steps
    return max(1, math.ceil(optim.epochs * per_epoch / optim.grad_accum))


def build_optimizer(groups: list[dict], optim: OptimConfig, total: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    warmup = optim.warmup_steps if optim.warmup_steps is not None else round(optim.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup, optim.schedule, optim.min_lr_ratio))
    return opt, sched


_RESUME_FREE_KEYS = {"save_every", "keep_checkpoints", "log_every", "eval_every", "progress", "overwrite"}


def _config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def prepare_out_dir(cfg: Any, resume: bool) -> Path:
    """Refuse to silently mix runs: a new run needs an empty out_dir (or overwrite=true)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        return out
    existing = [p for p in ("checkpoints", "adapter", "metrics.jsonl") if (out / p).exists()]
    if existing:
        if not cfg.overwrite:
            raise ConfigError(
                f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                "overwrite=true to replace it, or choose another out directory"
            )
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint we continue from."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_text(path, "".join(x + "\n" for x in keep))


def _mean_metrics(items: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in items for k in d})
    return {k: float(np.mean([d[k] for d in items if k in d])) for k in keys}


def evaluate(spec: LoopSpec, pairs: list, prefix: str = "eval_") -> dict[str, float]:
    """Mean metrics over ``pairs`` in no-grad eval mode (dropout off), prefixed like TRL (eval_loss, ...)."""
    from arbiter.training.data import collate_pairs

    if not pairs:
        return {}
    acc = spec.accelerator
    was = spec.policy.training
    spec.policy.eval()
    bs = spec.cfg.data.batch_size
    rows, weights = [], []
    try:
        with torch.no_grad():
            for s in range(acc.process_index * bs, len(pairs), bs * acc.num_processes):
                chunk = pairs[s : s + bs]
                with acc.autocast():
                    _, metrics = spec.compute(collate_pairs(chunk, spec.pad_id), chunk, False)
                rows.append(metrics)
                weights.append(len(chunk))
    finally:
        spec.policy.train(was)
    keys = sorted({k for d in rows for k in d})
    local = torch.tensor([[sum(w * d.get(k, 0.0) for d, w in zip(rows, weights)) for k in keys] + [sum(weights)]],
                         dtype=torch.float64, device=acc.device)
    total = acc.reduce(local, "sum")[0] if acc.num_processes > 1 else local[0]
    n = total[-1].item()
    return {f"{prefix}{k}": (total[i].item() / n) for i, k in enumerate(keys)}


def train_loop(spec: LoopSpec, out_dir: Path, *, resume: bool) -> dict[str, Any]:
    """Optimiser steps with accumulation, clipping, logging, checkpoints, exact resume and divergence stop."""
    from tqdm.auto import tqdm

    from arbiter.training.data import collate_pairs

    cfg, acc = spec.cfg, spec.accelerator
    optim: OptimConfig = cfg.optim
    main = acc.is_main_process
    metrics_path = out_dir / "metrics.jsonl"
    cfg_dict = dataclasses.asdict(cfg)
    step = 0
    history: list[dict[str, Any]] = []
    resumed_metrics: dict[str, Any] = {}

    ckpt_path = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt_path is None:
        log.warning("--resume: no checkpoint under %s; starting from scratch", out_dir)
    if ckpt_path is not None:
        peek = json.loads((ckpt_path / "state.json").read_text())
        diff = [d for d in _config_diff(peek.get("config", {}), cfg_dict) if d.split(":")[0] not in _RESUME_FREE_KEYS]
        if diff:
            raise ConfigError(f"cannot resume {ckpt_path}: the config changed ({'; '.join(diff)})")
        ckpt = load_checkpoint(ckpt_path, restore_rng=True)  # RNG restored last, right before the loop
        names = set(spec.trainables) | {f"extra.{k}" for k in spec.extra_state}
        if set(ckpt.tensors) != names:
            raise ValueError(f"{ckpt_path}: checkpoint tensors do not match this run's trainable parameters")
        with torch.no_grad():
            for name, p in spec.trainables.items():
                p.copy_(ckpt.tensors[name].to(p.device, p.dtype))
            for name, t in spec.extra_state.items():
                t.copy_(ckpt.tensors[f"extra.{name}"].to(t.device, t.dtype))
        spec.optimizer.load_state_dict(ckpt.optimizer["optimizer"])
        spec.scheduler.load_state_dict(ckpt.optimizer["scheduler"])
        step = ckpt.step
        resumed_metrics = dict(ckpt.state.get("metrics") or {})
        if main:
            _truncate_metrics(metrics_path, step)
        log.info("resumed from %s (step %d of %d)", ckpt_path, step, spec.total_steps)

    n = len(spec.train)
    per_epoch = micro_batches_per_epoch(n, optim.batch_size, acc.num_processes)
    params = [p for p in spec.trainables.values()]
    last_good = ckpt_path

    def checkpoint(at: int, metrics: dict[str, Any]) -> Path | None:
        path = None
        if main:
            tensors = dict(spec.trainables) | {f"extra.{k}": v for k, v in spec.extra_state.items()}
            path = save_checkpoint(
                out_dir, at, tensors,
                {"optimizer": spec.optimizer.state_dict(), "scheduler": spec.scheduler.state_dict()},
                {"micro": at * optim.grad_accum, "epoch": at * optim.grad_accum / per_epoch, "config": cfg_dict,
                 "metrics": metrics},
                keep=cfg.keep_checkpoints,
            )
        acc.wait_for_everyone()
        return path or latest_checkpoint(out_dir)

    spec.policy.train()
    bar = tqdm(total=spec.total_steps, initial=step, desc=f"train {getattr(cfg, 'loss', 'joint')}",
               unit="step", disable=not (main and cfg.progress))
    last: dict[str, Any] = resumed_metrics  # a resumed, already finished run reports its last step
    try:
        while step < spec.total_steps:
            t0 = time.perf_counter()
            micro_metrics = []
            nonfinite = 0.0
            for a in range(optim.grad_accum):
                m = step * optim.grad_accum + a
                idx = micro_batch(n, m, batch_size=optim.batch_size, seed=cfg.seed, rank=acc.process_index,
                                  world=acc.num_processes)
                chunk = [spec.train[i] for i in idx]
                batch = collate_pairs(chunk, spec.pad_id)
                sync = a == optim.grad_accum - 1
                with nullcontext() if sync else acc.no_sync(spec.policy):
                    with acc.autocast():
                        out, metrics = spec.compute(batch, chunk, True)
                    loss = out.losses.float().mean()
                    if not torch.isfinite(loss):
                        nonfinite = 1.0
                    # Backward even when non-finite so that every DDP rank reaches the same collectives;
                    # the step is then refused below on all ranks together.
                    acc.backward(loss / optim.grad_accum)
                micro_metrics.append(metrics)
            grad_norm = acc.clip_grad_norm_(params, optim.max_grad_norm if optim.max_grad_norm > 0 else float("inf"))
            grad_norm = float(grad_norm)
            if not math.isfinite(grad_norm):
                nonfinite = 1.0
            flag = torch.tensor([nonfinite], device=acc.device)
            if acc.num_processes > 1:
                flag = acc.reduce(flag, "sum")
            if flag.item() > 0:
                bad = _mean_metrics(micro_metrics).get("loss", float("nan"))
                raise TrainingDiverged(
                    f"non-finite loss or gradient at optimiser step {step + 1} (loss {bad}, grad norm {grad_norm}); "
                    "stopped without updating or saving. Last good checkpoint: "
                    f"{last_good if last_good else 'none (set save_every to keep checkpoints)'}. "
                    "Lower optim.lr / beta or check the data, then continue with --resume."
                )
            lr_used = spec.scheduler.get_last_lr()[0]  # the lr of this step (logged; the scheduler moves on)
            spec.optimizer.step()
            if spec.after_step is not None:
                spec.after_step()  # before the scheduler moves: it sees this step's lr (decoupled, like AdamW's decay)
            spec.scheduler.step()
            spec.optimizer.zero_grad(set_to_none=True)
            step += 1
            metrics = _mean_metrics(micro_metrics)
            if acc.num_processes > 1:
                keys = sorted(metrics)
                t = acc.reduce(torch.tensor([metrics[k] for k in keys], device=acc.device, dtype=torch.float64), "mean")
                metrics = dict(zip(keys, t.tolist()))
            record = {"step": step, "epoch": round(step * optim.grad_accum / per_epoch, 4),
                      "lr": lr_used, "grad_norm": grad_norm, **metrics,
                      "time/step_s": time.perf_counter() - t0}
            if cfg.eval_every and step % cfg.eval_every == 0 and step < spec.total_steps:
                record.update(evaluate(spec, spec.dev))
            last = record
            history.append(record)
            if main and (step % cfg.log_every == 0 or step == spec.total_steps):
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                            acc=f"{metrics.get('rewards/accuracies', float('nan')):.2f}")
            if cfg.save_every and step % cfg.save_every == 0:
                last_good = checkpoint(step, record)
        if cfg.save_every and (last_good is None or not str(last_good).endswith(f"step-{step}")):
            last_good = checkpoint(step, last)
    finally:
        bar.close()
    return {"step": step, "last": last, "history": history}


# ==============================================================================================================
# Saving


def save_adapter(peft_model: Any, directory: Path, meta: dict[str, Any], extra_tensors: dict[str, Tensor] | None = None) -> Path:
    """PEFT format (adapter_config.json + adapter_model.safetensors), written atomically, plus provenance."""
    from safetensors.torch import save_file

    with atomic_dir(directory) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not (tmp / name).is_file():
                raise RuntimeError(f"PEFT did not write {name}")
        (tmp / ADAPTER_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        if extra_tensors:
            save_file({k: v.detach().cpu().float().contiguous() for k, v in extra_tensors.items()},
                      str(tmp / "inter_projection.safetensors"))
    return directory


# ==============================================================================================================
# The recipe


def _fpo_setup(cfg: AdapterConfig, bb: Any) -> tuple[Any, int, str]:
    from arbiter.training.sae import load_sae, sae_digest

    sae = load_sae(cfg.fpo.sae, expect_d_in=bb.hidden_size)
    layer = cfg.fpo.layer if cfg.fpo.layer is not None else sae.hook_layer
    if layer is None:
        raise ConfigError(f"{cfg.fpo.sae}: the SAE does not record its layer; set fpo.layer")
    if not 0 <= layer < bb.num_layers:
        raise ConfigError(f"fpo.layer {layer} is outside [0, {bb.num_layers - 1}]")
    sae.requires_grad_(False).eval()
    return sae, int(layer), sae_digest(sae)


def run(cfg: AdapterConfig, *, resume: bool = False, backbone: Any | None = None) -> dict[str, Any]:
    """Train a LoRA adapter; returns the final metrics (also written to ``<out>/final_metrics.json``).

    ``backbone``: an already loaded :class:`arbiter.backbone.Backbone` to train on (tests, notebooks); the
    adapter is removed from it again before returning, leaving the base model as it was.
    """
    cfg.validate()
    t_start = time.perf_counter()
    train_pairs, dev_pairs, data_report = load_preference_data(cfg.data)
    ref_mode = decide_reference(cfg.loss, cfg.reference, train_pairs + dev_pairs, cfg.data.source)
    inter = cfg.loss == "intermediate_dpo"
    layers = list(cfg.intermediate.layers) if inter else []
    if ref_mode == "precomputed":
        # Everything that can be checked without the model fails here, before it loads.
        check_ref_columns(train_pairs + dev_pairs, layers=layers if inter else None,
                          apply_final_norm=cfg.intermediate.apply_final_norm if inter else None,
                          sae_digest=None, sae_layer=None, need_features=cfg.loss == "fpo")
    out_dir = prepare_out_dir(cfg, resume)
    log.info("loss %s (beta %.4g), reference: %s", cfg.loss, loss_beta(cfg.loss, cfg.beta), ref_mode)

    bb = resolve_backbone(cfg.model, backbone)
    from arbiter.training.data import tokenize_pairs

    sae = sae_layer = digest = None
    if cfg.loss == "fpo":
        sae, sae_layer, digest = _fpo_setup(cfg, bb)
    for layer in layers:
        if layer >= bb.num_layers:
            raise ConfigError(f"intermediate.layers: block {layer} does not exist ({bb.num_layers} blocks)")
    if sae is not None:
        check_ref_columns(train_pairs + dev_pairs, layers=None, apply_final_norm=None, sae_digest=digest,
                          sae_layer=sae_layer, need_features=True)

    train, tok_report = tokenize_pairs(train_pairs, bb.tokenizer, bb.end_id, max_length=cfg.data.max_length,
                                       truncate_prompt=cfg.data.truncate_prompt)
    log.info("train pairs: %s", tok_report.summary())
    dev = []
    if dev_pairs:
        dev, dev_report = tokenize_pairs(dev_pairs, bb.tokenizer, bb.end_id, max_length=cfg.data.max_length,
                                         truncate_prompt=cfg.data.truncate_prompt)
        log.info("dev pairs: %s", dev_report.summary())
    if ref_mode == "precomputed":
        check_ref_tokens(train + dev, bb.fingerprint)

    acc = make_accelerator(cfg.device, cfg.precision)
    seed_everything(cfg.seed)  # the LoRA init (and so a resumed run's structure) is reproducible
    home = next(bb.model.parameters()).device  # a caller's backbone goes back where it was
    bb.model.to(acc.device)
    peft_model, detach = attach_lora(bb.model, cfg.lora, gradient_checkpointing=cfg.gradient_checkpointing)

    def restore() -> None:
        detach()
        if backbone is not None:
            bb.model.to(home)
    try:
        projection = None
        if inter and cfg.intermediate.projection == "linear":
            head_w = peft_model.get_output_embeddings().weight  # [V, d]
            projection = nn.Linear(head_w.shape[1], head_w.shape[0], bias=False).to(head_w.device)
            with torch.no_grad():
                projection.weight.copy_(head_w)
        if sae is not None:
            sae.to(acc.device)
        policy = PolicyModule(peft_model, layers=layers, projection=projection,
                              apply_final_norm=cfg.intermediate.apply_final_norm, sae=sae, sae_layer=sae_layer)
        trainables = {f"lora.{k}": v for k, v in trainable_parameters(peft_model).items()}
        if projection is not None:
            trainables["projection.weight"] = projection.weight
        total = total_optimizer_steps(len(train), cfg.optim, acc.num_processes)
        optimizer, scheduler = build_optimizer([{"params": list(trainables.values())}], cfg.optim, total)
        policy, optimizer = acc.prepare(policy, optimizer)

        def compute(batch: dict[str, Tensor], chunk: list, training: bool) -> tuple[LossOutput, dict[str, float]]:
            pol = policy(batch)
            if ref_mode == "precomputed":
                ref = precomputed_ref(chunk, pol["logps"].device, layers=inter, features=sae is not None)
            elif ref_mode == "adapter_disabled":
                ref = reference_pass(peft_model, batch, layers=layers,
                                     apply_final_norm=cfg.intermediate.apply_final_norm)
            else:
                ref = None
            out = adapter_loss(cfg, pol, ref)
            return out, step_metrics(out, pol)

        spec = LoopSpec(cfg=cfg, accelerator=acc, policy=policy, optimizer=optimizer, scheduler=scheduler,
                        trainables=trainables, train=train, dev=dev, pad_id=bb.end_id, total_steps=total,
                        compute=compute)
        log.info("training %d pairs (%d dev), %d optimiser steps, %d trainable parameters", len(train), len(dev),
                 total, sum(p.numel() for p in trainables.values()))
        result = train_loop(spec, out_dir, resume=resume)
        final = {k: v for k, v in result["last"].items()}
        final.update(evaluate(spec, dev))
        final["train_seconds"] = time.perf_counter() - t_start
        final["reference"] = ref_mode
        final["loss_name"] = cfg.loss
        final["beta"] = loss_beta(cfg.loss, cfg.beta)
        meta = {
            "recipe": "adapter", "loss": cfg.loss, "beta": final["beta"], "reference": ref_mode,
            "backbone": bb.fingerprint.model_dump(), "data": {"source": cfg.data.source, "report": data_report,
                                                              "train_pairs": len(train), "dev_pairs": len(dev)},
            "config": dataclasses.asdict(cfg), "metrics": final,
        }
        if acc.is_main_process:
            extra = {"weight": projection.weight} if projection is not None else None
            save_adapter(acc.unwrap_model(policy).model, out_dir / "adapter", meta, extra)
            atomic_write_json(out_dir / "final_metrics.json", final)
            log.info("adapter saved to %s", out_dir / "adapter")
        acc.wait_for_everyone()
        final["adapter_dir"] = str(out_dir / "adapter")
        return final
    finally:
        restore()


# ==============================================================================================================
# Evaluation: an adapter's implicit reward on preference pairs


@contextmanager
def loaded_adapter(backbone: Any, adapter_dir: str | Path) -> Iterator[Any]:
    """Temporarily load a saved adapter onto ``backbone.model`` (removed again on exit)."""
    from peft import PeftModel

    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{d} is not a PEFT adapter directory (no adapter_config.json)")
    meta_path = d / ADAPTER_META_FILE
    if meta_path.is_file():
        fp = json.loads(meta_path.read_text()).get("backbone")
        if fp:
            bad = backbone.fingerprint.mismatches(type(backbone.fingerprint)(**fp))
            if bad:
                raise ValueError(f"{d}: adapter was trained on another backbone: " + "; ".join(bad))
    was_training = backbone.model.training
    peft_model = PeftModel.from_pretrained(backbone.model, str(d), is_trainable=False)
    peft_model.eval()
    try:
        yield peft_model
    finally:
        base = peft_model.unload()
        if hasattr(base, "peft_config"):
            del base.peft_config
        base.train(was_training)


def adapter_pair_accuracy(
    backbone: Any,
    adapter_dir: str | Path,
    pairs: Sequence[Any],
    beta: float = 0.1,
    *,
    max_length: int = 1024,
    batch_size: int = 8,
    length_normalize: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Share of pairs whose implicit reward prefers the chosen answer, r(y) = beta (logp_adapter - logp_base).

    ``pairs``: PreferencePair (tokenised here with the shared chat encoding) or TokenizedPair.
    ``length_normalize``: use average instead of summed log-probs (SimPO/MIPO/FPO-style rewards).
    Returns accuracy (ties count as wrong, like TRL's strict >), ties, the TRL reward means, the mean
    log-probs, and ``base_logp_accuracy``: how often the base model alone already gives y_w the higher
    log-prob (summed, or averaged with length_normalize): the baseline the adapter must beat.
    """
    from tqdm.auto import tqdm

    from arbiter.training.data import TokenizedPair, collate_pairs, tokenize_pairs

    pairs = list(pairs)
    if not pairs:
        raise ValueError("adapter_pair_accuracy: no pairs")
    report = None
    if isinstance(pairs[0], TokenizedPair):
        tokenized = pairs
    else:
        tokenized, rep = tokenize_pairs(pairs, backbone.tokenizer, backbone.end_id, max_length=max_length)
        report = rep.to_dict()
    pol_c, pol_r, ref_c, ref_r, len_c, len_r = [], [], [], [], [], []
    with loaded_adapter(backbone, adapter_dir) as peft_model:
        with torch.no_grad():
            for s in tqdm(range(0, len(tokenized), batch_size), desc="adapter pairs", disable=not progress):
                batch = collate_pairs(tokenized[s : s + batch_size], backbone.end_id)
                pol, lengths = forward_logps(peft_model, batch).logps, batch["answer_lengths"]
                with peft_model.disable_adapter():
                    ref = forward_logps(peft_model, batch).logps
                for dst, src in ((pol_c, pol), (ref_c, ref), (len_c, lengths)):
                    dst.append(split_pairs(src.cpu())[0])
                for dst, src in ((pol_r, pol), (ref_r, ref), (len_r, lengths)):
                    dst.append(split_pairs(src.cpu())[1])
    pc, pr, rc, rr = (torch.cat(x).double() for x in (pol_c, pol_r, ref_c, ref_r))
    lc, lr = torch.cat(len_c).double().clamp(min=1), torch.cat(len_r).double().clamp(min=1)
    if length_normalize:
        pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
    chosen = beta * (pc - rc)  # [P]
    rejected = beta * (pr - rr)  # [P]
    return {
        "n": len(tokenized),
        "accuracy": (chosen > rejected).double().mean().item(),
        "ties": (chosen == rejected).double().mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "logps/chosen": pc.mean().item(),
        "logps/rejected": pr.mean().item(),
        "base_logp_accuracy": (rc > rr).double().mean().item(),
        "beta": beta,
        "length_normalize": length_normalize,
        "tokenize_report": report,
    }
