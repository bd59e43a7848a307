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

The recipe is ``setup -> train -> save`` over the training library: config sections
(:mod:`arbiter.training.sections`), reference columns (:mod:`arbiter.training.reference`), LoRA and the policy
module (:mod:`arbiter.training.lora`) and the loop (:mod:`arbiter.training.loop`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from arbiter.training.artifacts import atomic_write_json
from arbiter.training.batch import LOSSES, PreferenceBatch, losses_of
from arbiter.training.checkpoint import seed_everything
from arbiter.training.config import ConfigError
from arbiter.training.loop import (
    LoopSpec,
    build_optimizer,
    evaluate,
    make_accelerator,
    prepare_out_dir,
    step_metrics,
    total_optimizer_steps,
    train_loop,
)
from arbiter.training.lora import (
    PolicyModule,
    Reference,
    resolve_backbone,
    save_adapter,
    trainable_parameters,
    training_lora,
)
from arbiter.training.losses import LossOutput
from arbiter.training.reference import (
    check_ref_columns,
    check_ref_tokens,
    decide_reference,
)
from arbiter.training.rundir import RESULT_FILE
from arbiter.training.sections import (
    CdpoSection,
    FpoSection,
    IntermediateSection,
    LoraRun,
    MipoSection,
    SimpoSection,
    load_preference_data,
    tokenize_splits,
    validate_common,
)

log = logging.getLogger("arbiter.training.adapter")

ADAPTER_LOSSES = losses_of("adapter")  # the registry's (training/batch.py)


@dataclass
class AdapterConfig(LoraRun):
    loss: str = "dpo"  # one of ADAPTER_LOSSES
    beta: float | None = None  # None: the loss function's own default (dpo 0.1, simpo 2.0, mipo 20, ...)
    out: str = "runs/adapter"  # the run directory (CLI: --out)
    cdpo: CdpoSection = field(default_factory=CdpoSection)
    simpo: SimpoSection = field(default_factory=SimpoSection)
    mipo: MipoSection = field(default_factory=MipoSection)
    fpo: FpoSection = field(default_factory=FpoSection)
    intermediate: IntermediateSection = field(default_factory=IntermediateSection)

    def validate(self) -> None:
        validate_common(self)
        if self.loss not in ADAPTER_LOSSES:
            raise ConfigError(f"loss: {self.loss!r} is not one of {list(ADAPTER_LOSSES)}")
        if LOSSES[self.loss].precomputed_reference and self.reference == "adapter_disabled":
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


CONFIG = AdapterConfig
DESCRIPTION = "align a LoRA adapter with DPO, cDPO, IPO, SimPO, MIPO, FPO or intermediate DPO"


def add_arguments(parser: Any) -> None:
    """``--loss NAME``: the CLI's shortcut for the config key ``loss``."""
    parser.add_argument("--loss", choices=ADAPTER_LOSSES, default=None, help="preference loss (config key 'loss')")


def loss_beta(loss: str, beta: float | None) -> float:
    """The beta a loss runs with: the configured one, else the loss's own default."""
    return float(beta) if beta is not None else float(LOSSES[loss].defaults["beta"])


def loss_hparams(cfg: AdapterConfig) -> dict[str, Any]:
    """The hyper-parameters ``LOSSES[cfg.loss]`` takes: beta, and its config section's (the registry says which)."""
    return {"beta": loss_beta(cfg.loss, cfg.beta), **LOSSES[cfg.loss].hparams_from(cfg)}


def adapter_loss(cfg: AdapterConfig, pol: dict[str, Tensor], ref: dict[str, Tensor] | None) -> LossOutput:
    """``LOSSES[cfg.loss]`` over the batch of the policy pass and the reference (None: SimPO needs none)."""
    return LOSSES[cfg.loss](PreferenceBatch.from_passes(pol, ref), **loss_hparams(cfg))


def _fpo_setup(cfg: AdapterConfig, bb: Any) -> tuple[Any, int, str]:
    from arbiter.training.sae import load_sae, sae_digest

    assert cfg.fpo.sae is not None  # validate() requires fpo.sae for the fpo loss
    sae = load_sae(cfg.fpo.sae, expect_d_in=bb.hidden_size)
    layer = cfg.fpo.layer if cfg.fpo.layer is not None else sae.hook_layer
    if layer is None:
        raise ConfigError(f"{cfg.fpo.sae}: the SAE does not record its layer; set fpo.layer")
    if not 0 <= layer < bb.num_layers:
        raise ConfigError(f"fpo.layer {layer} is outside [0, {bb.num_layers - 1}]")
    sae.requires_grad_(False).eval()
    return sae, int(layer), sae_digest(sae)


def run(cfg: AdapterConfig, *, resume: bool = False, backbone: Any | None = None) -> dict[str, Any]:
    """Train a LoRA adapter; returns the final metrics (also written to ``<out>/result.json``).

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
    sae = sae_layer = digest = None
    if cfg.loss == "fpo":
        sae, sae_layer, digest = _fpo_setup(cfg, bb)
    for layer in layers:
        if layer >= bb.num_layers:
            raise ConfigError(f"intermediate.layers: block {layer} does not exist ({bb.num_layers} blocks)")
    if sae is not None:
        check_ref_columns(train_pairs + dev_pairs, layers=None, apply_final_norm=None, sae_digest=digest,
                          sae_layer=sae_layer, need_features=True)

    train, dev = tokenize_splits(train_pairs, dev_pairs, bb.tokenizer, bb.end_id, cfg.data)
    if ref_mode == "precomputed":
        check_ref_tokens(train + dev, bb.fingerprint)

    acc = make_accelerator(cfg.device, cfg.precision)
    seed_everything(cfg.seed)  # the LoRA init (and so a resumed run's structure) is reproducible
    with training_lora(bb, cfg.lora, acc.device, gradient_checkpointing=cfg.gradient_checkpointing,
                       caller_owned=backbone is not None) as peft_model:
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
        trainables: dict[str, Tensor] = {f"lora.{k}": v for k, v in trainable_parameters(peft_model).items()}
        if projection is not None:
            trainables["projection.weight"] = projection.weight
        total = total_optimizer_steps(len(train), cfg.optim, acc.num_processes)
        optimizer, scheduler = build_optimizer([{"params": list(trainables.values())}], cfg.optim, total)
        policy, optimizer = acc.prepare(policy, optimizer)

        reference = Reference(ref_mode, peft_model, layers=layers, apply_final_norm=cfg.intermediate.apply_final_norm,
                              precomputed_layers=bool(inter), precomputed_features=sae is not None)

        def compute(batch: dict[str, Tensor], chunk: list, training: bool) -> tuple[LossOutput, dict[str, float]]:
            pol = policy(batch)
            out = adapter_loss(cfg, pol, reference(batch, chunk, pol["logps"].device))
            return out, step_metrics(out, pol)

        spec = LoopSpec(name=cfg.loss, cfg=cfg, accelerator=acc, policy=policy, optimizer=optimizer, scheduler=scheduler,
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
            atomic_write_json(out_dir / RESULT_FILE, final)
            log.info("adapter saved to %s", out_dir / "adapter")
        acc.wait_for_everyone()
        final["adapter_dir"] = str(out_dir / "adapter")
        return final
