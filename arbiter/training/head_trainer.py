"""The head trainer: one DPH head (pooler + reward vector) trained on cached features, with dev evaluation, best
weights, early stopping and exact resume on the shared run directory (``rundir``) and loop driver (``StepDriver``).
Used by ``arbiter train head`` (features of preference pairs) and ``arbiter train verifier`` (features of the
model's own right / wrong samples); docs/methods.md "Direct Preference Heads"."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arbiter.training.batch import losses_of
from arbiter.training.config import ConfigError
from arbiter.training.stats import accuracy_se

if TYPE_CHECKING:
    import torch

log = logging.getLogger("arbiter.training.head_trainer")

HEAD_LOSSES = losses_of("head")  # the registry's (training/batch.py)
POOLERS = ("identity", "affine_tanh", "swiglu_tanh")


@dataclass
class Variant:
    """One sweep entry: fields left unset keep the base config's value."""

    pooler: str | None = None
    loss: str | None = None
    eps: float | None = None
    lr: float | None = None
    dropout: float | None = None
    weight_decay: float | None = None
    layer: int | None = None  # features from another layer (computed and cached once per distinct layer)
    train_prefixes: bool | None = None  # train on the recipe's closed-prefix copies too (recipes with ``prefixes``)


@dataclass
class HeadTrainSettings:
    """The trainer's keys (the head recipe's config carries the same names; any object with these attributes and
    a ``sweep`` list works, since ``variants`` and resume read them by name)."""

    name: str = "head"
    seed: int = 0
    layer: int = -1
    pooler: str = "identity"
    loss: str = "dph_contrastive"
    eps: float = 0.1
    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 30
    max_steps: int | None = None
    batch_size: int = 64
    patience: int = 5
    select_metric: str = "accuracy"
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    sweep: list[Variant] = field(default_factory=list)
    train_prefixes: bool = True  # recipes with closed-prefix copies: this variant trains on them
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])  # + tensorboard / wandb (training/trackers.py)
    progress: bool = True


def check_variant_fields(pooler, loss, eps, lr, dropout, weight_decay, where: str) -> None:
    if pooler is not None and pooler not in POOLERS:
        raise ConfigError(f"{where}pooler: {pooler!r} is not one of {list(POOLERS)}")
    if loss is not None and loss not in HEAD_LOSSES:
        raise ConfigError(f"{where}loss: {loss!r} is not one of {list(HEAD_LOSSES)} (head recipes train DPH losses)")
    if eps is not None and not 0 < eps <= 0.5:
        raise ConfigError(f"{where}eps: must lie in (0, 0.5], got {eps}")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"{where}lr: must be > 0, got {lr}")
    if dropout is not None and not 0 <= dropout < 1:
        raise ConfigError(f"{where}dropout: must lie in [0, 1), got {dropout}")
    if weight_decay is not None and weight_decay < 0:
        raise ConfigError(f"{where}weight_decay: must be >= 0, got {weight_decay}")


# Config keys that may change between a run and its --resume (rundir.config_diff): they do not change the
# steps already taken (epochs / max_steps only extend or shorten the run; the features are keyed separately).
_RESUME_FREE = frozenset({"name", "epochs", "max_steps", "checkpoint_every", "keep_checkpoints", "sweep", "out",
                          "head_dir", "overwrite", "cache_dir", "share_prompt", "feature_batch_tokens", "threads",
                          "progress", "model", "dtype", "prefix_eval", "report_to"})


@dataclass
class TrainResult:
    head: Any  # DPHHead with the selected (best-on-dev) weights, eval mode
    head_config: Any  # HeadConfig
    metrics: dict
    run_dir: Path


def evaluate_head(head, fw, fl, idx, loss_fn, eps: float, prefix: str) -> dict:
    """Loss and TRL metrics of ``head`` on pairs ``idx`` (eval mode, no grad). fw, fl: [N, d]."""
    import torch

    from arbiter.training.batch import PreferenceBatch
    from arbiter.training.losses import preference_metrics

    was_training = head.training
    head.eval()
    with torch.no_grad():
        r_w, r_l = head(fw[idx]), head(fl[idx])  # [n], [n]
        m = preference_metrics(loss_fn(PreferenceBatch(head_chosen_rewards=r_w, head_rejected_rewards=r_l), eps=eps),
                               prefix=prefix)
    head.train(was_training)
    return m


def _better(metric: str, cand: dict, best: dict | None) -> bool:
    if best is None:
        return True
    if metric == "loss":
        return cand["eval_loss"] < best["eval_loss"]
    acc_c, acc_b = cand["eval_rewards/accuracies"], best["eval_rewards/accuracies"]
    return acc_c > acc_b + 1e-12 or (abs(acc_c - acc_b) <= 1e-12 and cand["eval_loss"] < best["eval_loss"])


def train_on_features(
    cfg: Any,
    fw: "torch.Tensor",
    fl: "torch.Tensor",
    splits: dict[str, list[int]],
    *,
    fingerprint: Any,
    ffn_size: int | None,
    run_dir: str | Path,
    feature_dtype: str = "float32",
    resume: bool = False,
    features_key: str = "",
) -> TrainResult:
    """Train one head on cached features fw/fl ([N, d] chosen/rejected) and return the best-on-dev head."""
    import torch

    from arbiter.heads import HeadConfig, build_head
    from arbiter.training.batch import LOSSES, PreferenceBatch
    from arbiter.training.checkpoint import load_checkpoint, save_checkpoint, seed_everything
    from arbiter.training.loop import StepDriver
    from arbiter.training.losses import preference_metrics
    from arbiter.training.rundir import MetricsLog, resumable_checkpoint

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    d = int(fw.shape[1])
    loss_fn = LOSSES[cfg.loss]
    head_config = HeadConfig(
        name=cfg.name, backbone=fingerprint, layer=cfg.layer, pooler=cfg.pooler, hidden_size=d,
        ffn_size=ffn_size if cfg.pooler == "swiglu_tanh" else None, dropout=cfg.dropout, feature_dtype=feature_dtype,
    )
    seed_everything(cfg.seed)
    head = build_head(head_config)
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_idx = torch.tensor(splits["train"], dtype=torch.long)  # [n_train]
    dev_idx = torch.tensor(splits["dev"], dtype=torch.long)  # [n_dev]
    n, bs = len(train_idx), cfg.batch_size
    nb = math.ceil(n / bs)  # steps per epoch
    config = {**dataclasses.asdict(cfg), "features": features_key}
    st: dict[str, Any] = {"epoch": 0, "batch": 0, "best": None, "best_step": 0, "bad_epochs": 0, "stopped": None}
    step = 0
    best_state = None

    ck = resumable_checkpoint(run_dir, config, _RESUME_FREE, resume)
    if ck is not None:
        c = load_checkpoint(ck)  # restores python / numpy / torch RNG
        head.load_state_dict({k[5:]: v for k, v in c.tensors.items() if k.startswith("head.")})
        best_state = {k[5:]: v for k, v in c.tensors.items() if k.startswith("best.")} or None
        opt.load_state_dict(c.optimizer)
        step = c.step
        st.update({k: c.state[k] for k in ("epoch", "batch", "best", "best_step", "bad_epochs", "stopped")})
        log.info("resumed %s at step %d (epoch %d, batch %d)", run_dir, step, st["epoch"], st["batch"])

    def save(at: int) -> Path:
        tensors = {f"head.{k}": v for k, v in head.state_dict().items()}
        if best_state is not None:
            tensors.update({f"best.{k}": v for k, v in best_state.items()})
        return save_checkpoint(run_dir, at, tensors, opt.state_dict(), {**st, "config": config},
                               keep=cfg.keep_checkpoints)

    def perm_for(epoch: int) -> torch.Tensor:
        # Its own generator per epoch: the data order depends only on (seed, epoch), never on the global RNG.
        return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))

    total = nb * cfg.epochs if cfg.max_steps is None else min(nb * cfg.epochs, cfg.max_steps)
    mlog = MetricsLog(run_dir, resumed_at=step if ck else None, report_to=getattr(cfg, "report_to", ("jsonl",)),
                      config=config)
    driver = StepDriver(total=total, log=mlog, save=save,
                        save_every=cfg.checkpoint_every, step=step, last_good=ck,
                        desc=f"train head {cfg.pooler}/{cfg.loss}", progress=cfg.progress,
                        postfix=("loss", "eval_rewards/accuracies"))
    perm = perm_for(st["epoch"])

    def one_step(s: int) -> tuple[dict[str, Any], str | None]:
        nonlocal perm, best_state
        idx = train_idx[perm[st["batch"] * bs : (st["batch"] + 1) * bs]]  # [b]
        r_w, r_l = head(fw[idx]), head(fl[idx])  # [b], [b]
        out = loss_fn(PreferenceBatch(head_chosen_rewards=r_w, head_rejected_rewards=r_l), eps=cfg.eps)
        loss = out.losses.mean()
        if not torch.isfinite(loss):
            raise driver.diverged(f"non-finite loss ({loss.item()}) in epoch {st['epoch']}",
                                  f"Try a lower lr (now {cfg.lr}) or check the features for extreme values.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.stack([(p.grad.detach() ** 2).sum() for p in head.parameters() if p.grad is not None]).sum().sqrt()
        opt.step()
        st["batch"] += 1
        record = {"epoch": round(st["epoch"] + st["batch"] / nb, 4), **preference_metrics(out),
                  "grad_norm": grad_norm.item(), "learning_rate": cfg.lr}
        if st["batch"] == nb:  # end of epoch: dev evaluation, best weights, early stopping
            st["epoch"] += 1
            st["batch"] = 0
            perm = perm_for(st["epoch"])
            if len(dev_idx):
                ev = evaluate_head(head, fw, fl, dev_idx, loss_fn, cfg.eps, "eval_")
                record.update(ev)
                if _better(cfg.select_metric, ev, st["best"]):
                    st.update(best=ev, best_step=s + 1, bad_epochs=0)
                    best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
                else:
                    st["bad_epochs"] += 1
                    if cfg.patience and st["bad_epochs"] >= cfg.patience:
                        st["stopped"] = "early_stopping"
            if st["epoch"] >= cfg.epochs:
                st["stopped"] = st["stopped"] or "epochs"
        return record, st["stopped"]

    t0 = time.perf_counter()
    try:
        if not st["stopped"]:  # a resumed run that had stopped early stays stopped (a larger max_steps continues)
            driver.run(one_step)
        step = driver.step
        seconds = time.perf_counter() - t0

        # The final weights compete with the best epoch (a max_steps stop may end between evaluations).
        final_ev = evaluate_head(head, fw, fl, dev_idx, loss_fn, cfg.eps, "eval_") if len(dev_idx) else None
        if final_ev is not None and _better(cfg.select_metric, final_ev, st["best"]):
            best_state, best_step, best_ev = {k: v.detach().clone() for k, v in head.state_dict().items()}, step, final_ev
        else:
            best_step, best_ev = st["best_step"], st["best"]
        if best_state is not None:
            head.load_state_dict(best_state)
        head.eval().requires_grad_(False)
        tr = evaluate_head(head, fw, fl, train_idx, loss_fn, cfg.eps, "train_")
        metrics = {
            "train_accuracy": tr["train_rewards/accuracies"], "train_margin": tr["train_rewards/margins"],
            "train_loss": tr["train_loss"], "n_train": n, "n_dev": len(dev_idx), "steps": step, "best_step": best_step,
            "stop_reason": st["stopped"] or ("max_steps" if cfg.max_steps is not None and step >= cfg.max_steps else "done"),
            "train_seconds": round(seconds, 2),
        }
        if best_ev is not None:
            acc = best_ev["eval_rewards/accuracies"]
            metrics.update(dev_accuracy=acc, dev_margin=best_ev["eval_rewards/margins"], dev_loss=best_ev["eval_loss"],
                           dev_accuracy_se=accuracy_se(acc, len(dev_idx)))
        mlog.summary(metrics)
    finally:
        mlog.close()
    return TrainResult(head, head_config, metrics, run_dir)


def variants(cfg: Any) -> list[Any]:
    """The sweep's variants of ``cfg`` (a dataclass with the trainer's keys): each entry's set fields replace the base's."""
    if not cfg.sweep:
        return [cfg]
    out = []
    for v in cfg.sweep:
        changes = {k: val for k, val in dataclasses.asdict(v).items() if val is not None}
        out.append(dataclasses.replace(cfg, sweep=[], **changes))
    return out


