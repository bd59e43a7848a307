"""``arbiter train joint``: the DPH paper's full recipe, a LoRA adapter and a Direct Preference Head together.

    arbiter train joint data.source=hh-rlhf --out runs/joint head.name=hh-joint

L = alpha1 * L_cDPO + alpha2 * L_DPH (DPH paper Eq. 7; ``LOSSES["joint"]``) with the paper's settings:
cDPO beta 0.6, eps 0.25; DPH eps 0.1 (separable objective, SwiGLU pooler, pooler dropout 0.1); no weight
decay, but prior regularisation towards the starting weights after every optimiser step
(``losses.prior_regularize_``, lambda 0.5, applied to every trained tensor: LoRA and head).

One forward per micro-batch: the decoder's final-norm hidden states give both the log-probs (LM head on the
answer positions) and the head features (``arbiter.heads.end_features`` at the closing ``<|im_end|>``), so
L_DPH's gradient reaches the LoRA weights through the same pass (``detach_features=true`` stops it there).
The reference for cDPO is the adapter-disabled model (no grad) or precomputed ``ref_*`` columns.

Saves ``<out>/adapter`` (PEFT format) and ``<out>/head`` (``arbiter.heads.save_head``; its
BackboneFingerprint is the backbone's and its provenance names the adapter directory). The head was trained
on the ADAPTED model's hidden states: serve it with that adapter applied.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from arbiter.heads.config import NAME_PATTERN
from arbiter.training.artifacts import atomic_write_json
from arbiter.training.batch import LOSSES, PreferenceBatch
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
from arbiter.training.losses import LossOutput, prior_regularize_
from arbiter.training.reference import check_ref_tokens, decide_reference
from arbiter.training.rundir import RESULT_FILE
from arbiter.training.sections import LoraRun, load_preference_data, tokenize_splits, validate_common

log = logging.getLogger("arbiter.training.joint")


@dataclass
class HeadSection:
    name: str = "joint"
    pooler: Literal["identity", "affine_tanh", "swiglu_tanh"] = "swiglu_tanh"  # the paper's best
    dropout: float = 0.1  # on the pooler output, as in the paper's alignment runs
    lr: float | None = None  # None: optim.lr
    out: str | None = None  # None: <out>/head


@dataclass
class JointConfig(LoraRun):
    beta: float = 0.6  # cDPO beta (the paper's)
    cdpo_eps: float = 0.25
    dph_eps: float = 0.1
    dph_loss: Literal["separable", "contrastive"] = "separable"
    alpha1: float = 1.0  # weight of L_cDPO
    alpha2: float = 1.0  # weight of L_DPH
    prior_lambda: float = 0.5  # prior regularisation towards the starting weights (replaces weight decay)
    detach_features: bool = False  # true: L_DPH trains only the head, not the backbone's LoRA
    out: str = "runs/joint"  # the run directory (CLI: --out)
    head: HeadSection = field(default_factory=HeadSection)

    def validate(self) -> None:
        validate_common(self)
        if self.optim.weight_decay != 0.0:
            raise ConfigError(
                "the joint recipe uses prior regularisation (prior_lambda) instead of weight decay: "
                "set optim.weight_decay=0"
            )
        if not 0.0 <= self.cdpo_eps <= 0.5:
            raise ConfigError(f"cdpo_eps must lie in [0, 0.5], got {self.cdpo_eps}")
        if not 0.0 < self.dph_eps <= 0.5:
            raise ConfigError(f"dph_eps must lie in (0, 0.5], got {self.dph_eps}")
        if self.alpha1 < 0 or self.alpha2 < 0 or self.alpha1 + self.alpha2 == 0:
            raise ConfigError("alpha1 and alpha2 must be >= 0 and not both 0")
        if self.prior_lambda < 0:
            raise ConfigError(f"prior_lambda must be >= 0, got {self.prior_lambda}")
        if not 0.0 <= self.head.dropout < 1.0:
            raise ConfigError(f"head.dropout must lie in [0, 1), got {self.head.dropout}")
        if self.head.lr is not None and self.head.lr <= 0:
            raise ConfigError(f"head.lr must be > 0, got {self.head.lr}")
        # HeadConfig's own rule for names, checked here so that it fails before the model loads.
        import re

        if not re.fullmatch(NAME_PATTERN, self.head.name):
            raise ConfigError(f"head.name {self.head.name!r}: letters, digits, '_', '.', '-' (max 64)")


CONFIG = JointConfig
DESCRIPTION = "joint cDPO + DPH training (DPH paper recipe): a LoRA adapter and a reward head together"


def joint_loss(cfg: JointConfig, pol: dict[str, Tensor], ref: dict[str, Tensor]) -> LossOutput:
    """``LOSSES["joint"]`` (cDPO on the log-probs + DPH on the head rewards) over the policy pass and the reference."""
    return LOSSES["joint"](PreferenceBatch.from_passes(pol, ref), beta=cfg.beta, cdpo_eps=cfg.cdpo_eps,
                           dph_eps=cfg.dph_eps, dph_loss=cfg.dph_loss, alpha1=cfg.alpha1, alpha2=cfg.alpha2)


def run(cfg: JointConfig, *, resume: bool = False, backbone: Any | None = None,
        pairs: tuple[list, list] | None = None) -> dict[str, Any]:
    """Train LoRA + DPH head jointly; returns final metrics (also ``<out>/result.json``).

    ``backbone``: an already loaded Backbone (the adapter is removed from it again before returning).
    ``pairs``: (train, dev) TokenizedPairs to train on instead of loading ``data.source`` (e.g. a benchmark that
    compares recipes on one split); they are used as given (no max_length filtering).
    """
    from arbiter.heads import HeadConfig, build_head, save_head

    cfg.validate()
    t_start = time.perf_counter()
    if pairs is None:
        train_pairs, dev_pairs, data_report = load_preference_data(cfg.data)
    else:
        train_pairs, dev_pairs, data_report = list(pairs[0]), list(pairs[1]), {"source": "given", "kept": len(pairs[0])}
    ref_mode = decide_reference("cdpo", cfg.reference, train_pairs + dev_pairs, cfg.data.source)
    out_dir = prepare_out_dir(cfg, resume)
    head_dir = Path(cfg.head.out) if cfg.head.out else out_dir / "head"

    bb = resolve_backbone(cfg.model, backbone)
    if pairs is None:
        train, dev = tokenize_splits(train_pairs, dev_pairs, bb.tokenizer, bb.end_id, cfg.data)
    else:
        train, dev = train_pairs, dev_pairs
    if ref_mode == "precomputed":
        check_ref_tokens(train + dev, bb.fingerprint)

    acc = make_accelerator(cfg.device, cfg.precision)
    seed_everything(cfg.seed)  # LoRA and head initialisation are reproducible (prior weights, resume)
    with training_lora(bb, cfg.lora, acc.device, gradient_checkpointing=cfg.gradient_checkpointing,
                       caller_owned=backbone is not None) as peft_model:
        head_cfg = HeadConfig(
            name=cfg.head.name, backbone=bb.fingerprint, layer=-1, pooler=cfg.head.pooler,
            hidden_size=bb.hidden_size, ffn_size=bb.ffn_size if cfg.head.pooler == "swiglu_tanh" else None,
            dropout=cfg.head.dropout,
        )
        head = build_head(head_cfg).to(acc.device)
        policy = PolicyModule(peft_model, head=head, detach_head_features=cfg.detach_features)
        lora_params = {f"lora.{k}": v for k, v in trainable_parameters(peft_model).items()}
        head_params = {f"head.{k}": v for k, v in head.named_parameters()}
        trainables = lora_params | head_params
        # Prior regularisation pulls towards these starting values; they are checkpointed so that a resumed
        # run regularises towards exactly the same point.
        prior = {k: v.detach().clone() for k, v in trainables.items()}
        total = total_optimizer_steps(len(train), cfg.optim, acc.num_processes)
        head_lr = cfg.head.lr if cfg.head.lr is not None else cfg.optim.lr
        groups = [
            {"params": list(lora_params.values()), "names": list(lora_params)},
            {"params": list(head_params.values()), "names": list(head_params), "lr": head_lr},
        ]
        optimizer, scheduler = build_optimizer(groups, cfg.optim, total)
        policy, optimizer = acc.prepare(policy, optimizer)

        def after_step() -> None:
            # theta <- theta - lr * lambda * (theta - theta_ref), with each group's current (scheduled) lr.
            for group in optimizer.param_groups:
                prior_regularize_(group["params"], [prior[n] for n in group["names"]], lr=group["lr"],
                                  lam=cfg.prior_lambda)

        reference = Reference(ref_mode, peft_model)  # cDPO always has a reference: precomputed or adapter-disabled

        def compute(batch: dict[str, Tensor], chunk: list, training: bool) -> tuple[LossOutput, dict[str, float]]:
            pol = policy(batch)
            ref = reference(batch, chunk, pol["logps"].device)
            assert ref is not None  # cDPO's reference: precomputed or adapter-disabled, never "none"
            out = joint_loss(cfg, pol, ref)
            return out, step_metrics(out, pol)

        spec = LoopSpec(name="joint", cfg=cfg, accelerator=acc, policy=policy, optimizer=optimizer, scheduler=scheduler,
                        trainables=trainables, train=train, dev=dev, pad_id=bb.end_id, total_steps=total,
                        compute=compute, after_step=after_step, extra_state={f"prior.{k}": v for k, v in prior.items()})
        log.info("joint training: %d pairs (%d dev), %d steps, %d LoRA + %d head parameters", len(train), len(dev),
                 total, sum(p.numel() for p in lora_params.values()), sum(p.numel() for p in head_params.values()))
        result = train_loop(spec, out_dir, resume=resume)
        final = dict(result["last"])
        final.update(evaluate(spec, dev))
        final["train_seconds"] = time.perf_counter() - t_start
        final["reference"] = ref_mode
        adapter_dir = out_dir / "adapter"
        config_dict = dataclasses.asdict(cfg)
        if acc.is_main_process:
            save_adapter(acc.unwrap_model(policy).model, adapter_dir,
                         {"recipe": "joint", "loss": "joint", "reference": ref_mode,
                          "backbone": bb.fingerprint.model_dump(), "head_dir": str(head_dir),
                          "data": {"source": cfg.data.source, "report": data_report}, "config": config_dict,
                          "metrics": final})
            head_cfg = head_cfg.model_copy(update={"provenance": {
                "recipe": "joint", "adapter": str(adapter_dir.resolve()),
                "data": cfg.data.source, "train_pairs": len(train), "dev_pairs": len(dev),
                "loss": {"beta": cfg.beta, "cdpo_eps": cfg.cdpo_eps, "dph_eps": cfg.dph_eps, "dph_loss": cfg.dph_loss,
                         "alpha1": cfg.alpha1, "alpha2": cfg.alpha2, "prior_lambda": cfg.prior_lambda},
                "metrics": {k: v for k, v in final.items() if isinstance(v, (int, float))},
            }})
            save_head(acc.unwrap_model(policy).head, head_cfg, head_dir)
            atomic_write_json(out_dir / RESULT_FILE, final)
            log.info("adapter saved to %s, head to %s", adapter_dir, head_dir)
        acc.wait_for_everyone()
        final["adapter_dir"] = str(adapter_dir)
        final["head_dir"] = str(head_dir)
        return final
