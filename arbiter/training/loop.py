"""The training loop of the LoRA recipes (``adapter``, ``joint``): AdamW with warmup and linear / cosine decay,
gradient accumulation and clipping, autocast, TRL-named metrics to ``<out>/metrics.jsonl`` (+ tqdm), checkpoints
with exact resume, a divergence stop that keeps the last good checkpoint, and dev evaluation.

Distributed: it runs on ``accelerate.Accelerator``, so ``accelerate launch -m arbiter.cli train adapter`` runs
data-parallel without code changes (each process takes its own slice of every global batch; the policy pass
goes through the prepared module so DDP syncs gradients). Exact resume is guaranteed for a single process;
multi-process resume restores rank 0's RNG state on every rank."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from arbiter.training.artifacts import METRICS_FILE, truncate_metrics
from arbiter.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from arbiter.training.config import ConfigError
from arbiter.training.logprobs import split_pairs
from arbiter.training.losses import LossOutput, preference_metrics
from arbiter.training.sections import OptimConfig

log = logging.getLogger("arbiter.training.loop")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm, in any recipe (adapter, joint, head); the message names the step and
    the last good checkpoint."""


def step_metrics(out: LossOutput, pol: dict[str, Tensor]) -> dict[str, float]:
    """TRL-named scalars for one micro-batch: loss, rewards/*, logps/chosen, logps/rejected (+ loss extras)."""
    metrics = preference_metrics(out)
    pc, pr = split_pairs(pol["logps"].detach())
    metrics["logps/chosen"] = pc.float().mean().item()
    metrics["logps/rejected"] = pr.float().mean().item()
    return metrics


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
    trainables: Mapping[str, Tensor]  # checkpointed tensors, by stable name
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
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.betas[0], optim.betas[1]), weight_decay=optim.weight_decay)
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
    existing = [p for p in ("checkpoints", "adapter", METRICS_FILE) if (out / p).exists()]
    if existing:
        if not cfg.overwrite:
            raise ConfigError(
                f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                "overwrite=true to replace it, or choose another out directory"
            )
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / METRICS_FILE).unlink(missing_ok=True)
    return out


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
    metrics_path = out_dir / METRICS_FILE
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
            truncate_metrics(metrics_path, step)
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
