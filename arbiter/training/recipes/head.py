"""``arbiter train head``: a task-specific DPH reward head on a frozen backbone (docs/methods.md "Task-specific heads").

setup -> features -> train -> save:
1. Load pairs (``data`` sources), tokenize them with THE chat encoding, keep the first ``limit`` usable pairs
   per source (seeded shuffle), split train / dev / test by prompt (``split_pairs``: no prompt in two splits).
2. Features of every chosen/rejected answer through the frozen backbone, once, from the on-disk cache
   (``feature_cache.pair_features``: the service's feature path, keyed by backbone, layer, max_length, data).
3. Train pooler + reward vector with a DPH loss (separable or contrastive, ``LOSSES``) with AdamW on the
   cached features; evaluate on dev after every epoch; keep the best-on-dev weights (dev accuracy, ties
   broken by dev loss; or dev loss alone) and stop after ``patience`` epochs without improvement.
   Checkpoints every ``checkpoint_every`` steps hold weights, best weights, optimizer, RNG and loop position,
   so ``--resume`` continues exactly (same final weights as an uninterrupted run). A NaN/Inf loss stops the
   run with a clear message before the bad step is applied; the last checkpoint stays the last good one.
   ``sweep``: train several variants (pooler / loss / eps / lr / dropout / weight_decay) on the same cached
   features and keep the best by dev accuracy (cheap: the backbone runs once).
4. Save the head atomically (``arbiter.heads.save_head``) with its provenance (data, counts, loss, metrics);
   ``<out>/result.json`` holds every variant's metrics, ``<out>/.../metrics.jsonl`` the TRL-named training log (as every recipe).

Prefix-aware heads (``prefixes > 0``): pruning (docs/features.md "Pruning") ranks candidates by the head's reward of
a CLOSED PREFIX (the answer so far, then a closing token), which a head trained on whole answers never saw. With
``prefixes: k`` every pair also gives k copies cut at random token counts (the same count for both answers, drawn
from [``prefix_min_tokens``, longer answer - 1]; an answer shorter than the cut stays whole, as a candidate that
finished before a checkpoint), read at a closing token after the cut (``feature_cache.packed_prefix_features``:
two extra tokens per cut in the pair's packed row, not another forward); the training split's copies join its
pairs with the same loss (a variant's ``train_prefixes: false`` leaves them out: a comparison row, trained and
reported but never picked). Dev selection stays on whole answers. ``prefix_eval``: cuts (tokens) at which every variant's dev and the winner's test accuracy
on closed prefixes is reported, whether or not it trained on prefixes (docs/methods.md "Prefix-aware heads").

If ``test_fraction > 0`` the chosen head is also scored on a test split that neither training, early stopping
nor the sweep's selection saw: the dev accuracy of a selected variant is optimistic, the test accuracy is not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arbiter.training.artifacts import METRICS_FILE
from arbiter.training.config import ConfigError
from arbiter.training.data.splits import load_sources, load_tokenized, split_indices
from arbiter.training.feature_cache import prefix_accuracy, prefix_cuts  # noqa: F401  (also this recipe's API)
from arbiter.training.head_trainer import (  # noqa: F401  (HEAD_LOSSES, Variant: part of this recipe's config API)
    HEAD_LOSSES,
    TrainResult,
    Variant,
    check_variant_fields,
    evaluate_head,
    train_on_features,
)
from arbiter.training.head_trainer import variants as sweep_variants
from arbiter.training.stats import accuracy_se

if TYPE_CHECKING:
    pass

log = logging.getLogger("arbiter.training.recipes.head")

DESCRIPTION = "train a DPH reward head (pooler + reward vector) on cached features of a frozen backbone"
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass
class HeadRecipeConfig:
    """Config of ``arbiter train head`` (YAML + key=value overrides)."""

    name: str = "head"  # the head's name (HeadConfig.name; the service serves it under this name)
    data: list[str] = field(default_factory=lambda: ["hh-rlhf"])  # sources: builtin names or TRL-format files
    limit: int | None = None  # usable (tokenized, kept) pairs per source, after the seeded shuffle
    max_length: int = 512  # prompt + longer answer, in tokens; longer pairs are dropped (and counted)
    truncate_prompt: bool = False  # left-truncate long prompts instead of dropping the pair
    dev_fraction: float = 0.1
    test_fraction: float = 0.0  # held out from training AND selection; reported as test_accuracy
    seed: int = 0
    model: str | None = None  # backbone (None: the embedded SmolLM2-135M-Instruct; or a local dir / GGUF)
    layer: int = -1  # -1: after the final norm (what the LM head reads); l >= 0: raw output of block l
    pooler: str = "identity"  # identity | affine_tanh | swiglu_tanh
    loss: str = "dph_contrastive"  # dph_separable | dph_contrastive
    eps: float = 0.1  # DPH label smoothing, in (0, 0.5]
    dropout: float = 0.0  # on the pooler output
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 30
    max_steps: int | None = None  # stop after this many optimizer steps (None: epochs decide)
    batch_size: int = 64  # pairs per step
    patience: int = 5  # epochs without dev improvement before stopping (0: never stop early)
    select_metric: str = "accuracy"  # best epoch of a run by dev accuracy (ties -> lower loss) | dev loss
    checkpoint_every: int = 0  # steps between checkpoints (0: none; needed for --resume)
    keep_checkpoints: int = 2
    sweep: list[Variant] = field(default_factory=list)  # variants trained on the same features; best by dev
    out: str = "runs/head"  # run directory: logs, checkpoints, result.json
    head_dir: str | None = None  # where the head is written (default <out>/head)
    overwrite: bool = False  # allow starting fresh in an out dir that already holds checkpoints
    cache_dir: str | None = None  # feature cache (default ~/.cache/arbiter/features)
    share_prompt: bool = True  # features: run each prompt once and continue both answers from its KV cache
    feature_batch_tokens: int = 4096  # padded tokens per forward pass when share_prompt is false
    threads: int | None = None  # torch CPU threads (None: torch's default; 1 is faster on a busy shared CPU)
    # Backbone dtype for the features: auto = bfloat16 where the CPU has native bf16 matmul measured faster
    # (AMX / AVX512-BF16), float32 otherwise; recorded in the head (feature_dtype) and in the cache key.
    dtype: str = "auto"
    prefixes: int = 0  # closed-prefix copies per pair (random cuts) that training adds to its split; 0: none
    prefix_min_tokens: int = 4  # the shortest random cut, in answer tokens
    train_prefixes: bool = True  # the base variant trains on the copies (a sweep entry may say otherwise)
    prefix_eval: list[int] = field(default_factory=list)  # fixed cuts at which closed-prefix accuracy is reported
    progress: bool = True
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])  # + tensorboard / wandb (training/trackers.py)

    def validate(self) -> None:
        if not self.name or self.name[0] in "_.-" or not set(self.name) <= _NAME_CHARS or len(self.name) > 64:
            raise ConfigError(f"name: {self.name!r} must be 1-64 chars of letters, digits, '_', '.', '-' "
                              "starting with a letter or digit")
        if not self.data:
            raise ConfigError("data: give at least one source")
        from arbiter.training.data import PAIR_BUILTINS

        for src in self.data:
            if src not in PAIR_BUILTINS and not Path(src).expanduser().is_file():
                raise ConfigError(f"data: {src!r} is neither an existing file nor a builtin ({', '.join(PAIR_BUILTINS)})")
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"limit: must be >= 2 or null, got {self.limit}")
        if self.max_length < 8:
            raise ConfigError(f"max_length: must be >= 8, got {self.max_length}")
        if not 0 <= self.dev_fraction < 1 or not 0 <= self.test_fraction < 1 or self.dev_fraction + self.test_fraction >= 0.9:
            raise ConfigError("dev_fraction / test_fraction: each in [0, 1) and together < 0.9")
        if self.layer < -1:
            raise ConfigError(f"layer: must be -1 (final norm) or a block index >= 0, got {self.layer}")
        check_variant_fields(self.pooler, self.loss, self.eps, self.lr, self.dropout, self.weight_decay, "")
        for i, v in enumerate(self.sweep):
            check_variant_fields(v.pooler, v.loss, v.eps, v.lr, v.dropout, v.weight_decay, f"sweep[{i}].")
            if v.layer is not None and v.layer < -1:
                raise ConfigError(f"sweep[{i}].layer: must be -1 (final norm) or a block index >= 0, got {v.layer}")
        if self.sweep and self.dev_fraction <= 0:
            raise ConfigError("sweep: selecting a variant needs a dev set (dev_fraction > 0)")
        for k in ("epochs", "batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k}: must be >= 1, got {getattr(self, k)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps: must be >= 1 or null, got {self.max_steps}")
        for k in ("patience", "checkpoint_every"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k}: must be >= 0, got {getattr(self, k)}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints: must be >= 1, got {self.keep_checkpoints}")
        if self.select_metric not in ("accuracy", "loss"):
            raise ConfigError(f"select_metric: {self.select_metric!r} is not one of ['accuracy', 'loss']")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads: must be >= 1 or null, got {self.threads}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype: {self.dtype!r} is not one of auto, float32, bfloat16, float16")
        if self.feature_batch_tokens < 16:
            raise ConfigError(f"feature_batch_tokens: must be >= 16, got {self.feature_batch_tokens}")
        if not self.out:
            raise ConfigError("out: give a run directory")
        if self.prefixes < 0:
            raise ConfigError(f"prefixes: must be >= 0, got {self.prefixes}")
        if self.prefix_min_tokens < 1:
            raise ConfigError(f"prefix_min_tokens: must be >= 1, got {self.prefix_min_tokens}")
        if any(not isinstance(k, int) or k < 1 for k in self.prefix_eval) or len(set(self.prefix_eval)) != len(self.prefix_eval):
            raise ConfigError(f"prefix_eval: distinct token counts >= 1, got {self.prefix_eval}")
        from arbiter.training.trackers import check_report_to

        self.report_to = check_report_to(self.report_to)
        if self.prefixes == 0 and any(v.train_prefixes for v in self.sweep):
            raise ConfigError("sweep: a variant trains on prefixes (train_prefixes: true) but prefixes is 0")


CONFIG = HeadRecipeConfig


def add_arguments(parser: Any) -> None:
    parser.add_argument("--data", action="append", metavar="SRC", help="data source (repeatable; replaces 'data')")
    parser.add_argument("--limit", type=int, help="usable pairs per source")
    parser.add_argument("--name", help="head name")
    parser.add_argument("--head-dir", dest="head_dir", metavar="DIR", help="where to write the head")
    parser.add_argument("--max-steps", dest="max_steps", type=int, help="stop after N optimizer steps")


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# training on cached features
# --------------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------------
# the recipe
# --------------------------------------------------------------------------------------------------


def _write_report(out: Path, cfg: HeadRecipeConfig, best: "TrainResult", fw, fl, splits, metrics: dict, sweep: list) -> dict:
    """``<out>/report.md`` with the winner's numbers and PNG plots beside it: its training curves, the reward /
    margin histograms and the reliability diagram of sigmoid(margin) on the held-out split (test, else dev, else
    train when nothing is held out)."""
    import torch

    from arbiter.training import plots
    from arbiter.training.artifacts import atomic_write_text

    split = "test" if splits["test"] else ("dev" if splits["dev"] else "train")
    idx = torch.tensor(splits[split], dtype=torch.long)
    with torch.no_grad():
        r_w, r_l = best.head(fw[idx]).float().tolist(), best.head(fl[idx]).float().tolist()
    title = f"head {cfg.name}: {split} split ({len(idx)} pairs)"
    figs = {
        "training curves": plots.safely(plots.training_curves, best.run_dir / METRICS_FILE, out / "training_curves.png",
                                        f"head {cfg.name} (winning variant)"),
        f"{split} rewards": plots.safely(plots.reward_histograms, r_w, r_l, out / f"{split}_rewards.png", title),
    }
    rel = plots.safely(plots.reliability_diagram, [a - b for a, b in zip(r_w, r_l)], out / f"{split}_reliability.png", title)
    if rel is not None:
        figs[f"{split} reliability"], metrics[f"{split}_ece"] = rel
    lines = [f"# arbiter train head: `{cfg.name}`", "", "| metric | value |", "|---|---|"]
    for k in ("train_accuracy", "dev_accuracy", "test_accuracy", "test_accuracy_se", f"{split}_ece", "n_train", "n_dev",
              "n_test", *(f"{m}@{c}" for c in cfg.prefix_eval for m in ("test_prefix_accuracy", "test_prefix_accuracy_se",
                                                                         "n_test_prefix")),
              "feature_seconds", "feature_tokens"):
        if metrics.get(k) is not None:
            v = metrics[k]
            lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    if sweep:
        keys = ["layer", "pooler", "loss", "lr", *(["train_prefixes"] if cfg.prefixes else []), "dev_accuracy",
                *(f"dev_prefix_accuracy@{k}" for k in cfg.prefix_eval), "train_accuracy"]
        lines += ["", "Sweep (picked by dev accuracy):", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(f"{r.get(k):.4f}" if isinstance(r.get(k), float) and "accuracy" in k else str(r.get(k))
                                    for k in keys) + " |" for r in sweep]
    for name, path in figs.items():
        if path is not None:
            lines += ["", f"![{name}]({Path(path).name})"]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return figs


def _prepare_out(cfg: HeadRecipeConfig, resume: bool) -> Path:
    """The run directory (``rundir.prepare_run_dir``); overwrite also clears the sweep variants' run dirs."""
    from arbiter.training.rundir import prepare_run_dir

    out = prepare_run_dir(cfg.out, resume=resume, overwrite=cfg.overwrite, artifacts=("sweep",))
    if not resume:
        shutil.rmtree(out / "sweep", ignore_errors=True)
    return out


def run(cfg: HeadRecipeConfig, *, resume: bool = False, backbone: Any = None) -> dict:
    """Train (or resume) the head described by ``cfg``; returns the chosen head's metrics.

    ``backbone``: an already loaded ``arbiter.backbone.Backbone`` (tests, notebooks); else ``cfg.model`` is loaded.
    """
    import torch

    from arbiter.heads import HeadConfig, num_parameters, save_head
    from arbiter.training.artifacts import atomic_write_json
    from arbiter.training.batch import LOSSES
    from arbiter.training.feature_cache import pair_features
    from arbiter.training.rundir import RESULT_FILE

    t_start = time.perf_counter()
    out = _prepare_out(cfg, resume)
    # The text-level data first: a source with zero usable rows exits before the (slow) model load.
    t0 = time.perf_counter()
    sources = load_sources(cfg)
    load_seconds = time.perf_counter() - t0
    if backbone is None:
        from arbiter.backbone import load_backbone

        backbone = load_backbone(cfg.model, threads=cfg.threads, dtype=cfg.dtype)
    if cfg.layer >= backbone.num_layers:
        raise ConfigError(f"layer: {cfg.layer} is outside [-1, {backbone.num_layers - 1}] for {backbone.name}")
    if any(v.pooler == "swiglu_tanh" for v in sweep_variants(cfg)) and not backbone.ffn_size:
        raise ConfigError("pooler swiglu_tanh needs the backbone's FFN width (config.intermediate_size)")

    t0 = time.perf_counter()
    tokenized, report = load_tokenized(cfg, backbone.tokenizer, backbone.end_id, sources=sources)
    splits = split_indices(tokenized, cfg)
    tok_seconds = load_seconds + time.perf_counter() - t0
    log.info("pairs: %d (train %d, dev %d, test %d)", len(tokenized), *(len(splits[k]) for k in ("train", "dev", "test")))
    variants = sweep_variants(cfg)
    with_prefixes = cfg.prefixes > 0 or bool(cfg.prefix_eval)
    cuts, prefix_rows = (prefix_cuts(tokenized, cfg.prefixes, cfg.prefix_min_tokens, cfg.prefix_eval, cfg.seed)
                         if with_prefixes else (None, []))
    train_set = set(splits["train"])
    prefix_train = [len(tokenized) + j for j, (i, _, kind) in enumerate(prefix_rows) if kind == "random" and i in train_set]
    if with_prefixes:
        log.info("closed prefixes: %d training copies, %d eval cuts at %s", len(prefix_train),
                 sum(kind == "eval" for _, _, kind in prefix_rows), cfg.prefix_eval)
    by_layer = {}  # layer -> PairFeatures: each distinct layer of the sweep is extracted (and cached) once
    for layer in dict.fromkeys(v.layer for v in variants):
        if layer >= backbone.num_layers:
            raise ConfigError(f"sweep layer {layer} is outside [-1, {backbone.num_layers - 1}] for {backbone.name}")
        f = pair_features(backbone, tokenized, layer=layer, max_length=cfg.max_length, cache_dir=cfg.cache_dir,
                          batch_tokens=cfg.feature_batch_tokens, share_prompt=cfg.share_prompt, progress=cfg.progress,
                          cuts=cuts)
        log.info("features (layer %d): %s (%s, %.1f s, %d tokens)", layer, f.path, f.status, f.seconds, f.tokens)
        by_layer[layer] = f

    results: list[TrainResult] = []
    for i, vcfg in enumerate(variants):
        feats = by_layer[vcfg.layer]
        fw, fl = feats.chosen, feats.rejected  # [N, d] each
        vsplits = splits
        if feats.prefix_chosen is not None and feats.prefix_rejected is not None:  # whole pairs, then the
            # closed prefixes (indices len(tokenized) + row)
            fw, fl = torch.cat([fw, feats.prefix_chosen]), torch.cat([fl, feats.prefix_rejected])
            if cfg.prefixes and vcfg.train_prefixes:
                vsplits = {**splits, "train": splits["train"] + prefix_train}
        tag = f"{i:02d}-{vcfg.pooler}-{vcfg.loss}" + (f"-layer{vcfg.layer}" if vcfg.layer != cfg.layer else "")
        tag += "-prefixes" if vsplits is not splits else ""
        run_dir = out if len(variants) == 1 else out / "sweep" / tag
        res = train_on_features(vcfg, fw, fl, vsplits, fingerprint=backbone.fingerprint, ffn_size=backbone.ffn_size,
                                run_dir=run_dir, resume=resume, features_key=feats.key, feature_dtype=backbone.dtype)
        res.metrics["train_prefixes"] = vsplits is not splits
        for k in cfg.prefix_eval:
            res.metrics[f"dev_prefix_accuracy@{k}"] = prefix_accuracy(res.head, feats, prefix_rows, splits["dev"], k)[0]
        log.info("variant %d %s/%s eps=%s lr=%s layer=%d: dev_accuracy=%s", i, vcfg.pooler, vcfg.loss, vcfg.eps, vcfg.lr,
                 vcfg.layer, res.metrics.get("dev_accuracy"))
        results.append(res)

    def rank(r: TrainResult):
        # Across variants always dev accuracy (ties -> lower dev loss): separable and contrastive losses live
        # on different scales, so their dev losses are not comparable; select_metric is the per-run criterion.
        m = r.metrics
        return (m["dev_accuracy"], -m["dev_loss"]) if "dev_accuracy" in m else (0.0, 0.0)

    # With prefixes, a variant that does not train on them is a comparison row: trained, reported, never picked.
    eligible = [i for i, r in enumerate(results) if not cfg.prefixes or r.metrics["train_prefixes"]]
    if not eligible:
        raise ConfigError("prefixes: every variant has train_prefixes: false, so none can be picked")
    best_i = max(eligible, key=lambda i: rank(results[i]))
    best, bcfg = results[best_i], variants[best_i]
    feats = by_layer[bcfg.layer]
    fw, fl = feats.chosen, feats.rejected  # the winner's features, for its test split
    metrics = dict(best.metrics)
    for k in cfg.prefix_eval:
        acc, n = prefix_accuracy(best.head, feats, prefix_rows, splits["test"], k)
        if acc is not None:
            metrics.update({f"test_prefix_accuracy@{k}": acc, f"test_prefix_accuracy_se@{k}": accuracy_se(acc, n),
                            f"n_test_prefix@{k}": n})
    if splits["test"]:
        te = evaluate_head(best.head, fw, fl, torch.tensor(splits["test"]), LOSSES[bcfg.loss], bcfg.eps, "test_")
        acc = te["test_rewards/accuracies"]
        metrics.update(test_accuracy=acc, test_margin=te["test_rewards/margins"], n_test=len(splits["test"]),
                       test_accuracy_se=accuracy_se(acc, len(splits["test"])))
    metrics.update(feature_seconds=round(sum(f.seconds for f in by_layer.values()), 2),
                   feature_tokens=sum(f.tokens for f in by_layer.values()), feature_cache=feats.status,
                   tokenize_seconds=round(tok_seconds, 2), parameters=num_parameters(best.head))

    sweep_table = [
        {"layer": v.layer, "pooler": v.pooler, "loss": v.loss, "eps": v.eps, "lr": v.lr, "dropout": v.dropout,
         "weight_decay": v.weight_decay, **{k: r.metrics.get(k) for k in ("dev_accuracy", "dev_loss", "train_accuracy",
                                                                            "n_train", "best_step", "stop_reason")},
         **({"train_prefixes": r.metrics["train_prefixes"]} if cfg.prefixes else {}),
         **{f"dev_prefix_accuracy@{k}": r.metrics.get(f"dev_prefix_accuracy@{k}") for k in cfg.prefix_eval}}
        for v, r in zip(variants, results)
    ]
    from arbiter.training.artifacts import command_line

    figs = _write_report(out, cfg, best, fw, fl, splits, metrics, sweep_table if len(variants) > 1 else [])
    provenance = {
        "recipe": "head",
        "command": command_line(),
        "data": list(cfg.data),
        "limit": cfg.limit,
        "max_length": cfg.max_length,
        "truncate_prompt": cfg.truncate_prompt,
        "seed": cfg.seed,
        "splits": {"dev_fraction": cfg.dev_fraction, "test_fraction": cfg.test_fraction, "by": "prompt"},
        "report": {"source": report.source, "total": report.total, "kept": report.kept, "dropped": dict(report.dropped)},
        "layer": bcfg.layer,
        "feature_dtype": backbone.dtype,
        "loss": bcfg.loss,
        "eps": bcfg.eps,
        "pooler": bcfg.pooler,
        "dropout": bcfg.dropout,
        "optimizer": {"name": "AdamW", "lr": bcfg.lr, "weight_decay": bcfg.weight_decay, "batch_size": cfg.batch_size},
        "select_metric": cfg.select_metric,
        "prefixes": ({"copies": cfg.prefixes, "min_tokens": cfg.prefix_min_tokens, "trained": bool(best.metrics["train_prefixes"]),
                      "read_at": "a closing token after the cut (closed prefix)", "eval": cfg.prefix_eval}
                     if with_prefixes else None),
        "features_key": feats.key,
        "metrics": {k: metrics[k] for k in ("dev_accuracy", "dev_margin", "train_accuracy", "n_train", "n_dev",
                                             "test_accuracy", "test_margin", "n_test",
                                             *(f"test_prefix_accuracy@{k}" for k in cfg.prefix_eval)) if k in metrics},
        "sweep": sweep_table if len(variants) > 1 else [],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "report_md": str((out / "report.md").resolve()),
        "plots": {k: str(Path(v).resolve()) for k, v in figs.items() if v is not None},
    }
    head_config = HeadConfig(**{**best.head_config.model_dump(), "provenance": json.loads(json.dumps(provenance, default=str))})
    head_dir = Path(cfg.head_dir) if cfg.head_dir else out / "head"
    save_head(best.head, head_config, head_dir)
    metrics["head_dir"] = str(head_dir)
    metrics["total_seconds"] = round(time.perf_counter() - t_start, 2)
    atomic_write_json(out / RESULT_FILE, {"metrics": metrics, "chosen": sweep_table[best_i] if len(variants) > 1 else
                                            None, "variants": sweep_table, "report": report.to_dict(),
                                            "config": dataclasses.asdict(cfg)})
    log.info("head %r written to %s: %s", cfg.name, head_dir, {k: metrics.get(k) for k in ("dev_accuracy", "test_accuracy")})
    return metrics
