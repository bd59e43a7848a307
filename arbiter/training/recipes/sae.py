"""``arbiter train sae``: a top-k sparse autoencoder on one layer's residual stream (for FPO).

setup -> train -> save:
1. Load the backbone and the data: preference pairs through ``arbiter.training.data`` (prompt tokens once,
   plus both answers), or plain text (``data.format: text``: a .txt file with one document per line, or
   .jsonl/.json rows with a ``text`` field). A few examples are held out for the final evaluation.
2. Stream activations: sequences go through the model in small batches; a forward hook takes the RAW
   output of block ``sae.layer`` and stops the forward there (later blocks and the LM head never run).
   Activations are gathered per chunk of ``train.chunk_sequences`` sequences, shuffled inside the chunk
   (seeded per epoch and chunk) and cut into SAE batches of ~``train.batch_tokens`` tokens. Nothing larger
   than one chunk is held in memory. The position (epoch, chunk, batch) fully determines what comes next,
   so ``--resume`` recomputes the current chunk and continues exactly.
3. Train (Gao et al. 2024, arXiv 2406.04093): top-k activation, loss = reconstruction MSE + AuxK/32 on dead
   latents, Adam, decoder rows renormalised to unit norm after every step with the parallel gradient
   component removed first. Inputs are scaled by one constant so that their mean norm is sqrt(d_in)
   (SAELens' "expected_average_only_in"), which makes the learning rate independent of the layer's
   activation scale; the scale is folded back into the biases when saving (``fold_input_scale``), so the
   saved SAE takes raw activations and keeps unit-norm decoder rows.
4. Save ``<out>/sae`` in SAELens layout (cfg.json + sae_weights.safetensors) and
   ``<out>/result.json``: held-out MSE (activation units), fraction of variance explained, L0,
   dead latents. The run directory is every recipe's (``training/rundir.py``): checkpoints every
   ``train.checkpoint_every`` steps under ``<out>/checkpoints``, the training log in ``<out>/metrics.jsonl``.

Defaults (SmolLM2-135M, d = 576, 30 blocks): layer 24 (0.8 of the depth: late enough for the high-level
features FPO constrains, the paper read a late Gemma-2-2B layer; the last blocks' raw outputs carry very
large norms on this model), d_sae = 8 x d_in = 4608, k = 32, batches of 4096 tokens, lr 4e-4
(Gao et al.'s 2e-4 / sqrt(d_sae / 2^14) rule gives 3.8e-4 at this width). The first token of every
sequence is skipped: from block ~15 on it is an attention sink with a norm of ~25,000 (vs ~200-600 for
other tokens) and would dominate the reconstruction loss.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from arbiter.training.artifacts import atomic_write_json
from arbiter.training.checkpoint import load_checkpoint, save_checkpoint, seed_everything
from arbiter.training.config import ConfigError, to_dict
from arbiter.training.sae import (
    ActivationStream,
    SparseAutoencoder,
    fold_input_scale,
    load_sequences,
    reconstruction_stats,
    save_sae,
    sequence_activations,
    train_step,
)

log = logging.getLogger("arbiter.training.recipes.sae")


# --------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class SAEDataConfig:
    source: str = "hh-rlhf"  # load_pairs source (builtin name or file) or, with format=text, a text file
    format: Literal["pairs", "text"] = "pairs"
    limit: int | None = None  # first `limit` usable examples after the data API's seeded shuffle
    seed: int = 0
    max_length: int = 512  # tokens per sequence (pairs longer than this are dropped; texts truncated)
    tokens: Literal["all", "answer"] = "all"  # train on prompt + answer tokens, or answer tokens only
    skip_first: int = 1  # positions < skip_first are never used (position 0 is an attention sink)
    eval_examples: int = 16  # pairs / texts held out for the final metrics

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit must be >= 1 or null, got {self.limit}")
        if self.max_length < 4:
            raise ConfigError(f"data.max_length must be >= 4, got {self.max_length}")
        if self.skip_first < 0:
            raise ConfigError(f"data.skip_first must be >= 0, got {self.skip_first}")
        if self.eval_examples < 1:
            raise ConfigError(f"data.eval_examples must be >= 1, got {self.eval_examples}")


@dataclass
class SAEArchConfig:
    layer: int = 24  # decoder block whose raw output is encoded (SAELens blocks.{layer}.hook_resid_post)
    d_sae: int | None = None  # latents; null = expansion x d_in
    expansion: int = 8
    k: int = 32  # active latents per token

    def validate(self) -> None:
        if self.layer < 0:
            raise ConfigError(f"sae.layer must be >= 0 (a block index), got {self.layer}")
        if self.d_sae is not None and self.d_sae < 1:
            raise ConfigError(f"sae.d_sae must be >= 1 or null, got {self.d_sae}")
        if self.expansion < 1:
            raise ConfigError(f"sae.expansion must be >= 1, got {self.expansion}")
        if self.k < 1 or (self.d_sae is not None and self.k > self.d_sae):
            raise ConfigError(f"sae.k must be in [1, d_sae], got k={self.k}, d_sae={self.d_sae}")


@dataclass
class SAETrainConfig:
    steps: int = 2000  # SAE optimisation steps (epochs over the data repeat as needed)
    batch_tokens: int = 4096  # tokens per SAE step (approximate: a chunk is split into equal parts)
    lr: float = 4e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    aux_k: int = 256  # AuxK: dead latents used to reconstruct the residual
    aux_coef: float = 1.0 / 32.0  # 0 disables AuxK
    dead_tokens: int = 1_000_000  # a latent silent for this many training tokens counts as dead
    max_grad_norm: float | None = None
    normalize_input: bool = True  # scale inputs to mean norm sqrt(d_in) while training (folded at save)
    model_batch_size: int = 8  # sequences per model forward
    chunk_sequences: int = 64  # sequences whose activations are shuffled together
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 20
    seed: int = 0

    def validate(self) -> None:
        for name in ("steps", "batch_tokens", "aux_k", "dead_tokens", "model_batch_size", "chunk_sequences",
                     "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if self.aux_coef < 0:
            raise ConfigError(f"train.aux_coef must be >= 0, got {self.aux_coef}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"train.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


@dataclass
class SAERecipeConfig:
    model: str | None = None  # backbone spec (default: the embedded SmolLM2-135M-Instruct)
    out: str = "runs/sae"  # the run directory (CLI: --out): sae/, checkpoints/, metrics.jsonl, result.json
    device: str = "cpu"
    dtype: str = "float32"  # backbone dtype; the SAE itself is always float32
    threads: int | None = None
    overwrite: bool = False  # allow starting fresh in a run directory that already holds a run
    progress: bool = True
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])  # + tensorboard / wandb (training/trackers.py)
    data: SAEDataConfig = field(default_factory=SAEDataConfig)
    sae: SAEArchConfig = field(default_factory=SAEArchConfig)
    train: SAETrainConfig = field(default_factory=SAETrainConfig)

    def validate(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not self.out:
            raise ConfigError("out (the run directory) must be set")
        from arbiter.training.trackers import check_report_to

        self.report_to = check_report_to(self.report_to)


CONFIG = SAERecipeConfig
DESCRIPTION = "train a top-k sparse autoencoder on one layer's residual stream (for FPO)"


def add_arguments(parser) -> None:
    """Shortcuts for the most used config keys (``arbiter train sae --layer 20 --k 64``)."""
    parser.add_argument("--layer", dest="sae.layer", type=int, metavar="L", help="decoder block whose raw output is encoded")
    parser.add_argument("--k", dest="sae.k", type=int, metavar="K", help="active latents per token")
    parser.add_argument("--d-sae", dest="sae.d_sae", type=int, metavar="N", help="number of latents (default 8 x d_in)")
    parser.add_argument("--steps", dest="train.steps", type=int, metavar="N", help="SAE optimisation steps")
    parser.add_argument("--data", dest="data.source", metavar="SRC", help="load_pairs source, or a text file with data.format=text")
    parser.add_argument("--device", dest="device", metavar="DEV", help="cpu, cuda, cuda:1, ...")

# Config keys that may change between a run and its --resume (rundir.config_diff): they do not change what is
# computed (train.steps only extends or shortens the run).
_RESUME_FREE = frozenset({"report_to", "train.steps", "train.checkpoint_every", "train.log_every", "train.keep_checkpoints",
                          "threads", "device", "out", "overwrite", "progress"})


# --------------------------------------------------------------------------------------------------------------
# The recipe


def _sae_for(cfg: SAERecipeConfig, d_in: int, model_name: str) -> SparseAutoencoder:
    d_sae = cfg.sae.d_sae or cfg.sae.expansion * d_in
    if cfg.sae.k > d_sae:
        raise ConfigError(f"sae.k={cfg.sae.k} exceeds d_sae={d_sae}")
    return SparseAutoencoder(d_in, d_sae, activation="topk", k=cfg.sae.k, hook_layer=cfg.sae.layer, model_name=model_name)


def run(cfg: SAERecipeConfig, *, resume: bool = False, backbone: Any = None) -> dict:
    """Train (or resume) the SAE, save it in SAELens layout under ``<out>/sae``, return the metrics.

    ``backbone``: an already loaded ``arbiter.backbone.Backbone`` (tests and notebooks); default: load
    ``cfg.model``.
    """
    from arbiter.training.loop import StepDriver
    from arbiter.training.rundir import RESULT_FILE, MetricsLog, prepare_run_dir, resumable_checkpoint

    out = prepare_run_dir(cfg.out, resume=resume, overwrite=cfg.overwrite, artifacts=("sae",))
    config_dict = to_dict(cfg)
    ckpt_path = resumable_checkpoint(out, config_dict, _RESUME_FREE, resume)
    seed_everything(cfg.train.seed)
    if backbone is None:
        from arbiter.backbone import load_backbone

        backbone = load_backbone(cfg.model, device=cfg.device, dtype=cfg.dtype, threads=cfg.threads)
    if cfg.sae.layer >= backbone.num_layers:
        raise ConfigError(f"sae.layer={cfg.sae.layer} but {backbone.name} has {backbone.num_layers} blocks (0..{backbone.num_layers - 1})")
    model = backbone.model
    model.eval()
    train_seqs, eval_seqs, data_report = load_sequences(cfg.data, backbone)
    t = cfg.train
    stream = ActivationStream(model, train_seqs, cfg.sae.layer, chunk_sequences=t.chunk_sequences,
                              batch_size=t.model_batch_size, batch_tokens=t.batch_tokens, seed=t.seed,
                              pad_id=backbone.end_id)
    d_in = backbone.hidden_size
    # The SAE trains where the model runs; chunks of activations wait on the CPU, one batch at a time moves.
    device = next(model.parameters()).device
    sae = _sae_for(cfg, d_in, backbone.name).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=t.lr, betas=(t.betas[0], t.betas[1]))

    last_log: dict[str, Any] = {}
    if ckpt_path is not None:
        ck = load_checkpoint(ckpt_path)
        since_fired = ck.tensors.pop("since_fired").to(device)
        sae.load_state_dict(ck.tensors)
        opt.load_state_dict(ck.optimizer)
        step, scale = ck.step, float(ck.state["scale"])
        position: tuple[int, int, int] = tuple(ck.state["position"])
        last_log = dict(ck.state.get("last_log") or {})
        tokens_seen = int(ck.state.get("tokens_seen", 0))
        log.info("resumed from %s (step %d)", ckpt_path, step)
    else:
        # Input scale and b_dec from the first chunk (deterministic, so a resumed run agrees).
        parts = stream.batches(0, 0)
        first = torch.cat(parts) if parts else None  # [n, d]
        if first is None or first.shape[0] == 0:
            raise ConfigError("the first chunk of data yields no tokens")
        scale = float(math.sqrt(d_in) / first.norm(dim=1).mean()) if t.normalize_input else 1.0
        g = torch.Generator().manual_seed(t.seed)
        sae.init_tied_(g, data_mean=(first * scale).mean(0))
        since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
        step, position, tokens_seen = 0, (0, 0, 0), 0

    def save(at: int) -> Path:
        tensors = {k: v.detach() for k, v in sae.state_dict().items()}
        tensors["since_fired"] = since_fired
        return save_checkpoint(out, at, tensors, opt.state_dict(), {
            "position": list(position), "scale": scale, "last_log": last_log, "tokens_seen": tokens_seen,
            "config": config_dict,
        }, keep=t.keep_checkpoints)

    driver = StepDriver(total=t.steps, log=MetricsLog(out, resumed_at=step if ckpt_path else None,
                                                                 report_to=cfg.report_to, config=config_dict), save=save,
                        save_every=t.checkpoint_every, log_every=t.log_every, step=step, last_good=ckpt_path,
                        desc=f"SAE layer {cfg.sae.layer}", progress=cfg.progress, postfix=("mse", "l0", "dead"))
    window: list[dict[str, float]] = []
    batches = stream.iterate(position)

    def one_step(s: int) -> tuple[dict[str, Any], str | None]:
        nonlocal position, tokens_seen, last_log
        x, nxt = next(batches)
        dead = since_fired >= t.dead_tokens
        try:
            r = train_step(sae, opt, x.to(device) * scale, dead=dead if t.aux_coef > 0 else None, aux_k=t.aux_k,
                           aux_coef=t.aux_coef, max_grad_norm=t.max_grad_norm)
        except FloatingPointError as e:  # raised before any update
            raise driver.diverged(str(e), "Lower train.lr or set train.max_grad_norm.") from None
        since_fired.add_(r.n_tokens)
        since_fired[r.fired] = 0
        tokens_seen += r.n_tokens
        position = nxt
        window.append({"mse": r.mse / scale**2, "aux": r.aux, "l0": r.l0})
        if (s + 1) % t.log_every and s + 1 != t.steps:
            return window[-1], None  # not a logged step: the bar shows this step alone
        last_log = {"tokens": tokens_seen, **{k: sum(w[k] for w in window) / len(window) for k in ("mse", "aux", "l0")},
                    "dead": int((since_fired >= t.dead_tokens).sum())}
        window.clear()
        return last_log, None

    t0 = time.time()
    try:
        driver.run(one_step)
    finally:
        driver.log.close()
    step = driver.step
    train_seconds = time.time() - t0

    # Held-out evaluation with the saved (scale-folded) SAE on raw activations.
    final = fold_input_scale(sae, scale)
    x_eval = sequence_activations(model, eval_seqs, cfg.sae.layer, batch_size=t.model_batch_size, pad_id=backbone.end_id)
    stats = reconstruction_stats(final, x_eval)
    metrics = {
        "steps": step,
        "tokens_seen": tokens_seen,
        "layer": cfg.sae.layer,
        "d_in": d_in,
        "d_sae": sae.d_sae,
        "k": cfg.sae.k,
        "input_scale": scale,
        "eval_tokens": stats["n_tokens"],
        "eval_mse": stats["mse"],
        "eval_fve": stats["fve"],
        "eval_l0": stats["l0"],
        "eval_never_fired": int((~stats["fired"]).sum()),
        "dead_latents": int((since_fired >= t.dead_tokens).sum()),
        "dead_fraction": float((since_fired >= t.dead_tokens).float().mean()),
        "train_mse_last": last_log.get("mse"),
        "train_seconds_this_session": train_seconds,
    }
    save_sae(final, out / "sae", {
        "model_name": backbone.name,
        "hook_layer": cfg.sae.layer,
        "context_size": cfg.data.max_length,
        "dataset_path": cfg.data.source,
        "prepend_bos": False,
        "arbiter": {"recipe": "sae", "config": config_dict, "metrics": metrics, "data": data_report},
    })
    atomic_write_json(out / RESULT_FILE, metrics)
    log.info("SAE saved to %s: %s", out / "sae", json.dumps({k: metrics[k] for k in ("eval_fve", "eval_l0", "dead_latents")}))
    return metrics


__all__ = ["CONFIG", "SAERecipeConfig", "SAEDataConfig", "SAEArchConfig", "SAETrainConfig", "run"]
