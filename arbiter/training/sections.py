"""Config sections shared by the LoRA recipes (``adapter``, ``joint``, ``ref``): data, LoRA, optimiser and the
per-loss hyper-parameters, each validating itself; plus the checks every LoRA recipe config runs and the data
preparation they share."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from arbiter.training.config import ConfigError

log = logging.getLogger("arbiter.training.sections")

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
class LoraRun:
    """The run fields every LoRA training recipe shares (``adapter``, ``joint``): backbone, reference, run
    directory, checkpoints, logging, device and precision, and the data / LoRA / optimiser sections."""

    model: str | None = None  # None: the embedded default (or ARBITER_MODEL)
    reference: Literal["auto", "adapter_disabled", "precomputed"] = "auto"  # auto: precomputed if present
    out: str = "runs/lora"  # the run directory (CLI: --out)
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
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])  # + tensorboard / wandb (training/trackers.py)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    optim: OptimConfig = field(default_factory=OptimConfig)


def validate_common(cfg: Any) -> None:
    """Checks shared by every LoRA recipe config (sections validate themselves when loaded from YAML)."""
    for section in ("data", "lora", "optim"):
        getattr(cfg, section).validate()
    if cfg.beta is not None and cfg.beta <= 0:
        raise ConfigError(f"beta must be > 0, got {cfg.beta}")
    if not cfg.out:
        raise ConfigError("out (the run directory) must be set")
    from arbiter.training.trackers import check_report_to

    cfg.report_to = check_report_to(cfg.report_to)
    for name in ("save_every", "log_every", "eval_every", "keep_checkpoints"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.log_every < 1:
        raise ConfigError("log_every must be >= 1")
    if cfg.eval_every and cfg.data.dev_fraction == 0:
        raise ConfigError("eval_every needs a dev set: set data.dev_fraction > 0")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available")


def load_preference_data(cfg: DataConfig) -> tuple[list, list, dict]:
    """(train pairs, dev pairs, report dict); logs the data report."""
    from arbiter.training.data import load_pairs
    from arbiter.training.data import split_pairs as split_data

    pairs, report = load_pairs(cfg.source, limit=cfg.limit, seed=cfg.seed)
    log.info("data: %s", report.summary())
    train, dev = split_data(pairs, dev_fraction=cfg.dev_fraction, seed=cfg.seed)
    return train, dev, report.to_dict()


def tokenize_splits(train_pairs: list[Any], dev_pairs: list[Any], tokenizer: Any, end_id: int,
                    data: DataConfig) -> tuple[list[Any], list[Any]]:
    """(train, dev) TokenizedPairs with the shared chat encoding at ``data.max_length`` / ``truncate_prompt``;
    logs what each split kept and dropped."""
    from arbiter.training.data import tokenize_pairs

    out = []
    for name, pairs in (("train", train_pairs), ("dev", dev_pairs)):
        tok: list[Any] = []
        if pairs:
            tok, report = tokenize_pairs(pairs, tokenizer, end_id, max_length=data.max_length,
                                         truncate_prompt=data.truncate_prompt)
            log.info("%s pairs: %s", name, report.summary())
        out.append(tok)
    return out[0], out[1]
