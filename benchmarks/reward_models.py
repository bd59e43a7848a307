"""Reward models side by side on one backbone, data, split and token budget: frozen DPH head, joint LoRA + DPH
head (cDPO + DPH loss, prior regularisation), and TRL's RewardTrainer (sequence-classification reward model
with LoRA), the field's standard anchor.

Data: the helpful head's own config (arbiter/training/configs/head_helpful.yaml): every usable hh-rlhf helpful
pair at its max_length, split train / dev / test by prompt with its seed, so the dev and test pairs here are
exactly the ones the shipped `heads/helpful` was selected and tested on. The trained recipes (joint, TRL) see the
first ``--train-pairs`` pairs of the train split for ``--epochs`` epochs, with the same LoRA (rank, alpha,
dropout, target modules), learning rate, schedule and pairs per optimiser step; their training tokens are
counted as every real token fed forward (chosen and rejected full sequences, per epoch). The frozen head is
reported twice: trained on the same subset (same budget of pairs), and the shipped head (all train pairs).

Accuracy = share of pairs whose reward prefers the chosen answer (ties wrong), with its standard error.
Joint and TRL are evaluated the way the service would serve them: the joint head on the final-norm feature of
the backbone with its adapter merged; the TRL model's score head on its own (LoRA-merged) last hidden state at
the closing token (where its sequence-classification pooling reads).

Writes benchmarks/reports/reward_models.md (+ .json). Usage:
    python benchmarks/reward_models.py [--train-pairs 512] [--epochs 1] [--lr 1e-4] [--only frozen,joint,trl]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from arbiter.backbone import base_model, cpu_bf16_flags, load_backbone, merge_lora  # noqa: E402
from arbiter.heads import load_head  # noqa: E402
from arbiter.training.cli import CONFIG_DIR  # noqa: E402
from arbiter.training.config import load_config  # noqa: E402
from arbiter.training.data.splits import load_tokenized, split_indices  # noqa: E402
from arbiter.training.feature_cache import pair_features, prompt_once_features  # noqa: E402
from arbiter.training.recipes import head as head_recipe  # noqa: E402
from arbiter.training.recipes import joint as joint_recipe  # noqa: E402
from arbiter.training.sections import DEFAULT_TARGETS  # noqa: E402
from arbiter.training.stats import accuracy_se  # noqa: E402

from _provenance import git_commit  # benchmarks/ is on sys.path: the script's own directory

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "reports" / "reward_models"


def acc_se(margins: torch.Tensor) -> tuple[float, float]:
    a = float((margins > 0).float().mean())
    return a, accuracy_se(a, len(margins))


def seq_tokens(pairs) -> int:
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def head_margins(head, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    head.eval()
    with torch.inference_mode():
        return head(c).float() - head(r).float()


class _FeatureModel:
    """What prompt_once_features needs of a backbone, over any causal-LM-shaped model (TRL's seq-cls model)."""

    def __init__(self, model, tokenizer, end_id: int, hidden_size: int):
        self.model, self.tokenizer, self.end_id, self.hidden_size = model, tokenizer, end_id, hidden_size


def run_frozen(bb, cfg, tokenized, splits, n_train: int) -> list[dict]:
    t0 = time.perf_counter()
    feats = pair_features(bb, tokenized, layer=-1, max_length=cfg.max_length, progress=True)
    fw, fl = feats.chosen, feats.rejected
    rows = []
    sub = dict(splits, train=splits["train"][:n_train])
    res = head_recipe.train_on_features(cfg, fw, fl, sub, fingerprint=bb.fingerprint, ffn_size=bb.ffn_size,
                                        run_dir=tempfile.mkdtemp(prefix="frozen-"), feature_dtype=bb.dtype)
    for name, head, n in (("frozen head, same train pairs", res.head, len(sub["train"])),
                          ("frozen head `heads/helpful` (shipped)", load_head(str(ROOT / "heads" / "helpful"))[0], None)):
        row = {"model": name, "train_pairs": n, "epochs_backbone": 1}
        for split in ("dev", "test"):
            idx = torch.tensor(splits[split])
            row[f"{split}_accuracy"], row[f"{split}_se"] = acc_se(head_margins(head, fw[idx], fl[idx]))
        rows.append(row)
    # Backbone work of the frozen head: one forward over every train pair (the prompt once), cached.
    train_pairs = [tokenized[i] for i in sub["train"]]
    rows[0]["train_tokens"] = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in train_pairs)
    rows[0]["wall_s"] = round(time.perf_counter() - t0, 1)
    rows[0]["note"] = (f"features {feats.status}; head {res.metrics.get('best_step')} steps on cached features "
                       f"({cfg.pooler}, {cfg.loss}, lr {cfg.lr})")
    rows[1]["train_pairs"] = len(splits["train"])
    rows[1]["note"] = "heads/helpful as committed (its own sweep on all train pairs)"
    return rows


def run_joint(bb, args, tokenized, splits, out: Path) -> dict:
    train = [tokenized[i] for i in splits["train"][: args.train_pairs]]
    steps = math.ceil(args.epochs * len(train) / args.pairs_per_step)
    cfg = load_config(joint_recipe.CONFIG, CONFIG_DIR / "joint.yaml", [
        f"out={out}", "overwrite=true", f"precision={args.precision}", "progress=true", "save_every=0",
        f"lora.r={args.lora_r}", f"lora.alpha={2 * args.lora_r}", "lora.dropout=0.05",
        f"optim.lr={args.lr}", f"head.lr={args.head_lr}", f"optim.batch_size={args.micro}",
        f"optim.grad_accum={args.pairs_per_step // args.micro}", f"optim.warmup_steps={max(1, steps // 10)}",
        f"optim.max_steps={steps}", "head.name=helpful-joint", "head.pooler=identity", "head.dropout=0.0",
        "data.dev_fraction=0", "eval_every=0"])
    t0 = time.perf_counter()
    # float32 weights (LoRA trains in float32) under the chosen autocast precision, as TRL's model below.
    result = joint_recipe.run(cfg, backbone=load_backbone(dtype="float32"), pairs=(train, []))
    wall = time.perf_counter() - t0
    # Serve it as the service would: the adapter merged into a fresh backbone, the head on its final-norm feature.
    served = load_backbone(dtype=bb.dtype)
    merge_lora(served.model, result["adapter_dir"])
    head, _ = load_head(result["head_dir"])
    row = {"model": "joint LoRA + DPH head (cDPO + DPH, prior reg.)", "train_pairs": len(train),
           "epochs": args.epochs, "train_tokens": args.epochs * seq_tokens(train), "wall_s": round(wall, 1),
           "note": f"{steps} steps; final train loss {result.get('loss', float('nan')):.4f}"}
    for split in ("dev", "test"):
        pairs = [tokenized[i] for i in splits[split]]
        c, r = prompt_once_features(served, pairs, progress=False)
        row[f"{split}_accuracy"], row[f"{split}_se"] = acc_se(head_margins(head, c, r))
    return row


def run_trl(bb, args, tokenized, splits, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    train = [tokenized[i] for i in splits["train"][: args.train_pairs]]
    steps = math.ceil(args.epochs * len(train) / args.pairs_per_step)
    model = AutoModelForSequenceClassification.from_pretrained(bb.path, num_labels=1, dtype=torch.float32)
    # A sequence-classification model reads its score at the rightmost token that is not the pad token. This
    # tokenizer's pad token IS the closing <|im_end|>, so with it the model would score the token before the
    # closing one (and padding could not be told apart from it); padding with <|endoftext|> instead makes TRL
    # train and score at the closing token, the position the DPH heads read.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bb.path))
    tok.pad_token = "<|endoftext|>"
    if tok.pad_token_id == bb.end_id:
        raise RuntimeError("the pad token must differ from the closing token")
    model.config.pad_token_id = tok.pad_token_id
    ds = Dataset.from_list([{"chosen_ids": list(p.prompt_ids) + list(p.chosen_ids),
                             "rejected_ids": list(p.prompt_ids) + list(p.rejected_ids)} for p in train])
    rcfg = RewardConfig(
        output_dir=str(out), per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=args.pairs_per_step // args.micro, learning_rate=args.lr,
        num_train_epochs=args.epochs, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
        max_grad_norm=1.0, weight_decay=0.0, bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(),
        logging_steps=1, save_strategy="no", report_to=[], max_length=None, seed=0, disable_tqdm=False,
        center_rewards_coefficient=None, dataloader_num_workers=0)
    lcfg = LoraConfig(task_type="SEQ_CLS", r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05,
                      target_modules=list(DEFAULT_TARGETS))
    t0 = time.perf_counter()
    trainer = RewardTrainer(model=model, args=rcfg, train_dataset=ds, processing_class=tok, peft_config=lcfg)
    trainer.train()
    wall = time.perf_counter() - t0
    merged = trainer.model.merge_and_unload().to(getattr(torch, bb.dtype)).eval()
    score = merged.score  # Linear(d, 1)
    fm = _FeatureModel(merged, tok, bb.end_id, bb.hidden_size)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    row = {"model": "TRL RewardTrainer (seq-cls + LoRA)", "train_pairs": len(train), "epochs": args.epochs,
           "train_tokens": args.epochs * seq_tokens(train), "wall_s": round(wall, 1),
           "note": f"{trainer.state.global_step} steps; final train loss {losses[-1] if losses else float('nan'):.4f}"}
    assert base_model(merged) is merged.model
    # The evaluation below reads features at the closing token through the shared extraction path; check on a
    # few dev pairs that it gives the model's own sequence-classification scores (its pooling, no padding).
    for p in [tokenized[i] for i in splits["dev"][:3]]:
        ids = torch.tensor([list(p.prompt_ids) + list(p.chosen_ids)])
        with torch.inference_mode():
            own = merged(input_ids=ids).logits.float()[0, 0]
        c, _ = prompt_once_features(fm, [p], progress=False)
        with torch.inference_mode():
            mine = score(c.to(score.weight.dtype)).float()[0, 0]
        if abs(own - mine) > 0.05 * max(1.0, abs(own)):
            raise RuntimeError(f"TRL model scored {own:.4f} by itself but {mine:.4f} through the feature path")
    for split in ("dev", "test"):
        pairs = [tokenized[i] for i in splits[split]]
        c, r = prompt_once_features(fm, pairs, progress=False)  # last hidden state (after the final norm)
        with torch.inference_mode():
            m = score(c.to(score.weight.dtype)).float()[:, 0] - score(r.to(score.weight.dtype)).float()[:, 0]
        row[f"{split}_accuracy"], row[f"{split}_se"] = acc_se(m)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-pairs", type=int, default=512, help="train-split pairs the trained recipes see")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4, help="LoRA learning rate (both recipes)")
    ap.add_argument("--head-lr", type=float, default=1e-3, help="the joint recipe's DPH head learning rate")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--pairs-per-step", type=int, default=16)
    ap.add_argument("--micro", type=int, default=4, help="pairs per micro-batch")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16" if cpu_bf16_flags() else "fp32")
    ap.add_argument("--only", default="frozen,joint,trl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N dev / test pairs (smoke runs)")
    ap.add_argument("--no-report", action="store_true", help="print the rows, write no report (smoke runs)")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown from the committed JSON")
    args = ap.parse_args()
    if args.render:
        render()
        return
    commit = git_commit()
    torch.set_num_threads(args.threads)
    cfg = load_config(head_recipe.HeadRecipeConfig, CONFIG_DIR / "head_helpful.yaml", ["progress=false"])
    bb = load_backbone(dtype="auto")
    tokenized, report = load_tokenized(cfg, bb.tokenizer, bb.end_id)
    splits = split_indices(tokenized, cfg)
    if args.eval_limit:
        splits = {k: v if k == "train" else v[: args.eval_limit] for k, v in splits.items()}
    work = Path(tempfile.mkdtemp(prefix="reward-models-"))
    rows = []
    only = args.only.split(",")
    if "frozen" in only:
        rows += run_frozen(bb, cfg, tokenized, splits, args.train_pairs)
        print(json.dumps(rows[-2:]), flush=True)
    if "joint" in only:
        rows.append(run_joint(bb, args, tokenized, splits, work / "joint"))
        print(json.dumps(rows[-1]), flush=True)
    if "trl" in only:
        rows.append(run_trl(bb, args, tokenized, splits, work / "trl"))
        print(json.dumps(rows[-1]), flush=True)
    if args.no_report:
        return
    meta = {"command": "python " + " ".join(["benchmarks/reward_models.py", *sys.argv[1:]]), "commit": commit,
            "machine": platform.processor() or platform.machine(), "cpu_bf16_flags": cpu_bf16_flags(),
            "threads": args.threads, "torch": torch.__version__, "feature_dtype": bb.dtype,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args),
            "pairs": {k: len(v) for k, v in splits.items()}, "data_report": report.to_dict()}
    meta["max_length"] = cfg.max_length
    REPORT.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    render()


def render() -> None:
    """Write the markdown from the JSON (``--render`` redoes only this step)."""
    data = json.loads(REPORT.with_suffix(".json").read_text())
    meta, rows, a = data["meta"], data["rows"], argparse.Namespace(**data["meta"]["args"])
    if "max_length" not in meta:  # runs before the field was recorded: the config's value
        meta["max_length"] = load_config(head_recipe.HeadRecipeConfig, CONFIG_DIR / "head_helpful.yaml").max_length
    lines = [
        "# Reward models on hh-rlhf helpful: frozen DPH head vs joint LoRA + DPH vs TRL RewardTrainer", "",
        f"Command: `{meta['command']}` on commit `{meta['commit']}`, {meta['date']}; {meta['threads']} torch threads on "
        f"{meta['machine']} (CPU bf16 flags: {', '.join(meta['cpu_bf16_flags']) or 'none'}); torch {meta['torch']}; "
        f"features in {meta['feature_dtype']}; training precision {a.precision}. The machine is shared and noisy: "
        "wall times are indicative only.", "",
        f"Data: `head_helpful.yaml` (hh-rlhf helpful, max_length {meta['max_length']}), split by prompt: "
        f"{meta['pairs']['train']} train / {meta['pairs']['dev']} dev / {meta['pairs']['test']} test pairs. "
        f"Joint and TRL: the first {a.train_pairs} train pairs, {a.epochs} epoch(s), LoRA r={a.lora_r} "
        f"alpha={2 * a.lora_r} on {', '.join(DEFAULT_TARGETS)}, lr {a.lr:g} (joint head lr {a.head_lr:g}), cosine "
        f"schedule with 10% warmup, {a.pairs_per_step} pairs per step. Training tokens: every real token fed "
        "forward per epoch (the frozen head: one forward per pair with the prompt once). The frozen head's wall time "
        "is its training on cached features only: its features were already cached by the `heads/helpful` run "
        "(1.05M tokens per layer in 8-11 min on this machine, i.e. about 25 s for the subset's tokens).", "",
        "| model | train pairs | training tokens | wall s | dev accuracy | test accuracy | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('train_pairs', '')} | {r.get('train_tokens', '')} | {r.get('wall_s', '')} | "
                     f"{r['dev_accuracy']:.3f} ± {r['dev_se']:.3f} | {r['test_accuracy']:.3f} ± {r['test_se']:.3f} | "
                     f"{r.get('note', '')} |")
    REPORT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {REPORT.with_suffix('.md')}")


if __name__ == "__main__":
    main()
