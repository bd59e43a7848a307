"""The training loop: :class:`StepDriver` runs every recipe's optimiser steps (head, adapter, joint, sae): the
step counter, tqdm, ``<out>/metrics.jsonl`` (``rundir.MetricsLog``), checkpoints every N steps and at the end,
and the divergence stop (``TrainingDiverged``, naming the last good checkpoint). A recipe supplies one step
function and its checkpoint writer; the run directory and resume rule are ``rundir``'s.

:func:`train_loop` is the LoRA recipes' step (``adapter``, ``joint``) on the driver: AdamW with warmup and linear /
cosine decay, gradient accumulation and clipping, autocast, TRL-named metrics, exact resume and dev evaluation.

Distributed: it runs on ``accelerate.Accelerator``, so ``accelerate launch -m arbiter.cli train adapter`` runs
data-parallel without code changes (each process takes its own slice of every global batch; the policy pass
goes through the prepared module so DDP syncs gradients). Exact resume is guaranteed for a single process;
multi-process resume restores rank 0's RNG state on every rank."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from arbiter.training.checkpoint import load_checkpoint, save_checkpoint
from arbiter.training.config import ConfigError
from arbiter.training.logprobs import split_pairs
from arbiter.training.losses import LossOutput, preference_metrics
from arbiter.training.rundir import MetricsLog, prepare_run_dir, resumable_checkpoint
from arbiter.training.sections import LoraRun, OptimConfig

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

    name: str  # what is trained, for the progress bar and logs ("dpo", "joint", ...)
    cfg: LoraRun  # the recipe's config (the LoRA recipes' common sections)
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


# Keys of the LoRA recipes' config that may change between a run and its --resume (rundir.config_diff).
RESUME_FREE_KEYS = frozenset({"save_every", "keep_checkpoints", "log_every", "eval_every", "progress", "overwrite",
                              "report_to"})


def prepare_out_dir(cfg: Any, resume: bool) -> Path:
    """The LoRA recipes' run directory (``rundir.prepare_run_dir``; the artifact is ``adapter/``)."""
    return prepare_run_dir(cfg.out, resume=resume, overwrite=cfg.overwrite, artifacts=("adapter",))


@dataclass
class StepDriver:
    """Drives optimiser steps ``step .. total - 1`` of one run (module docstring).

    ``run(step_fn)`` calls ``step_fn(s)`` for each 0-based step s; it returns (the step's record, a stop reason or
    None). The driver adds ``step`` (1-based) and ``time/step_s``, writes the record to the log every ``log_every``
    steps and at the last step, updates the bar (``postfix``: record keys to show), and checkpoints through
    ``save(step)`` every ``save_every`` steps (0: never) and once more at the end. A step function that finds a
    non-finite loss raises ``driver.diverged(...)`` BEFORE it updates anything."""

    total: int
    log: MetricsLog
    save: Callable[[int], Path] | None = None
    save_every: int = 0
    log_every: int = 1
    step: int = 0  # steps done (a resumed run starts at its checkpoint's step)
    last_good: Path | None = None  # the newest checkpoint written or resumed from
    desc: str = "train"
    progress: bool = True
    postfix: tuple[str, ...] = ("loss",)
    last: dict[str, Any] = field(default_factory=dict)

    def diverged(self, detail: str, hint: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"{detail} at optimiser step {self.step + 1}: stopped before the update, nothing saved. Last good "
            f"checkpoint: {self.last_good if self.last_good else 'none (checkpoints are off: set the save interval)'}. "
            f"{hint} Then continue with --resume."
        )

    def _checkpoint(self) -> None:
        if self.save is not None:
            self.log.flush()  # the log holds every step up to the checkpoint (a kill loses only later lines)
            self.last_good = self.save(self.step)

    def run(self, step_fn: Callable[[int], tuple[dict[str, Any], str | None]]) -> str | None:
        """Run the remaining steps; returns the stop reason a step gave, or None (the budget was used up)."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total, initial=min(self.step, self.total), desc=self.desc, unit="step",
                   disable=not self.progress)
        stop: str | None = None
        saved_at = self.step if self.last_good is not None else -1
        try:
            while self.step < self.total and stop is None:
                t0 = time.perf_counter()
                record, stop = step_fn(self.step)
                self.step += 1
                record = {"step": self.step, **record, "time/step_s": time.perf_counter() - t0}
                self.last = record
                if self.step % self.log_every == 0 or self.step == self.total or stop is not None:
                    self.log.write(record)
                bar.update(1)
                shown = {k: record[k] for k in self.postfix if isinstance(record.get(k), (int, float))}
                bar.set_postfix({k.rsplit("/", 1)[-1]: f"{v:.4g}" for k, v in shown.items()})
                if self.save_every and self.step % self.save_every == 0:
                    self._checkpoint()
                    saved_at = self.step
            if self.save_every and saved_at != self.step:
                self._checkpoint()  # a finished run resumes as finished
        finally:
            bar.close()
            self.log.flush()
        return stop


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
    from arbiter.training.data import collate_pairs

    cfg, acc = spec.cfg, spec.accelerator
    optim: OptimConfig = cfg.optim
    main = acc.is_main_process
    cfg_dict = dataclasses.asdict(cfg)
    step = 0
    resumed_metrics: dict[str, Any] = {}

    ckpt_path = resumable_checkpoint(out_dir, cfg_dict, RESUME_FREE_KEYS, resume)
    if ckpt_path is not None:
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
        log.info("resumed from %s (step %d of %d)", ckpt_path, step, spec.total_steps)

    n = len(spec.train)
    per_epoch = micro_batches_per_epoch(n, optim.batch_size, acc.num_processes)
    params = list(spec.trainables.values())

    def save(at: int) -> Path:
        path = None
        if main:
            tensors = dict(spec.trainables) | {f"extra.{k}": v for k, v in spec.extra_state.items()}
            path = save_checkpoint(
                out_dir, at, tensors,
                {"optimizer": spec.optimizer.state_dict(), "scheduler": spec.scheduler.state_dict()},
                {"micro": at * optim.grad_accum, "epoch": at * optim.grad_accum / per_epoch, "config": cfg_dict,
                 "metrics": driver.last},
                keep=cfg.keep_checkpoints,
            )
        acc.wait_for_everyone()
        return path or out_dir / "checkpoints" / f"step-{at}"

    driver = StepDriver(
        total=spec.total_steps, log=MetricsLog(out_dir, resumed_at=step if ckpt_path else None, enabled=main,
                                            report_to=cfg.report_to, config=cfg_dict),
        save=save, save_every=cfg.save_every, log_every=cfg.log_every, step=step, last_good=ckpt_path,
        desc=f"train {spec.name}", progress=main and cfg.progress,
        postfix=("loss", "rewards/accuracies"), last=resumed_metrics,  # a resumed, finished run reports its last step
    )

    def one_step(s: int) -> tuple[dict[str, Any], str | None]:
        micro_metrics = []
        nonfinite = 0.0
        for a in range(optim.grad_accum):
            idx = micro_batch(n, s * optim.grad_accum + a, batch_size=optim.batch_size, seed=cfg.seed,
                              rank=acc.process_index, world=acc.num_processes)
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
        grad_norm = float(acc.clip_grad_norm_(params, optim.max_grad_norm if optim.max_grad_norm > 0 else float("inf")))
        if not math.isfinite(grad_norm):
            nonfinite = 1.0
        flag = torch.tensor([nonfinite], device=acc.device)
        if acc.num_processes > 1:
            flag = acc.reduce(flag, "sum")
        if flag.item() > 0:
            bad = _mean_metrics(micro_metrics).get("loss", float("nan"))
            raise driver.diverged(f"non-finite loss or gradient (loss {bad}, grad norm {grad_norm})",
                                  "Lower optim.lr / beta or check the data.")
        lr_used = spec.scheduler.get_last_lr()[0]  # the lr of this step (logged; the scheduler moves on)
        spec.optimizer.step()
        if spec.after_step is not None:
            spec.after_step()  # before the scheduler moves: it sees this step's lr (decoupled, like AdamW's decay)
        spec.scheduler.step()
        spec.optimizer.zero_grad(set_to_none=True)
        metrics = _mean_metrics(micro_metrics)
        if acc.num_processes > 1:
            keys = sorted(metrics)
            t = acc.reduce(torch.tensor([metrics[k] for k in keys], device=acc.device, dtype=torch.float64), "mean")
            metrics = dict(zip(keys, t.tolist()))
        record = {"epoch": round((s + 1) * optim.grad_accum / per_epoch, 4), "lr": lr_used, "grad_norm": grad_norm,
                  **metrics}
        if cfg.eval_every and (s + 1) % cfg.eval_every == 0 and s + 1 < spec.total_steps:
            record.update(evaluate(spec, spec.dev))
        return record, None

    spec.policy.train()
    try:
        driver.run(one_step)
    finally:
        driver.log.close()
    return {"step": driver.step, "last": driver.last}
