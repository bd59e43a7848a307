"""The adapter losses against DPO on one budget: DPO, cDPO, IPO, SimPO, MIPO, FPO and intermediate DPO, each a LoRA
adapter trained by `arbiter train adapter` from the same starting weights, pairs, LoRA shape, learning-rate sweep,
token budget and seed, then measured the same way.

Data (by prompt, from heads/helpful's own recipe split, so its judge never saw these prompts' test pairs):
- train / dev pairs: hh-rlhf pairs of the head_helpful TRAIN split (the first --train for training, the next --dev
  for choosing each loss's learning rate);
- test pairs: hh-rlhf pairs of the head_helpful TEST split (--test), and out of domain the first --ood PandaLM and
  Auto-J pairs (ties dropped);
- held-aside prompts: --prompts distinct prompts of the head_helpful TEST split, for generation.
Every loss trains from ONE precomputed reference file (`arbiter train ref`: log-probs, the intermediate layers'
log-probs, and the pooled features of an SAE trained here by `arbiter train sae` for FPO), so no run forwards a
reference model (as the MIPO and FPO recipes require). Each (loss, lr) run is its own `arbiter train adapter`
process: its wall time per optimiser step (metrics.jsonl) and peak RSS (wait4) are its own.

Measured per loss, for the learning rate whose adapter has the best dev implicit-reward accuracy:
- implicit-reward accuracy (r = beta log pi/pi_ref summed over the answer, beta 1: the order does not depend on it)
  and its length-normalised form, +- SE, on the test pairs, PandaLM and Auto-J; the starting model's own log-prob
  accuracy as the baseline;
- greedy answers (max --gen-tokens) to the held-aside prompts vs the starting model's: judged pairwise by the
  `helpful` head (win rate, ties as half) and by length (mean tokens, share longer than the starting model's): a
  weak judge and a length bias are facts to show; and the mean per-token KL(adapter || start) over the adapter's
  own answers;
- wall time per step and peak RSS of the training process.

Writes benchmarks/reports/adapters.md (and .json, .png). Usage (the budget is in the report):
    python benchmarks/adapters.py [--train 64] [--dev 48] [--test 100] [--ood 50] [--prompts 16]
        [--lrs 2e-4 1e-3] [--losses dpo cdpo ipo simpo mipo fpo intermediate_dpo] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _provenance import Run  # benchmarks/ is on sys.path: the script's own directory

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "reports" / "adapters"
LOSSES = ["dpo", "cdpo", "ipo", "simpo", "mipo", "fpo", "intermediate_dpo"]
PAPER = {  # what each paper claims (README's training section states whether this backbone showed it)
    "mipo": "up to +9 points over DPO on AlpacaEval 2, +8 on MT-Bench",
    "fpo": "better alignment than DPO at lower memory (held-out reward accuracy 64.1 vs 59.9)",
    "intermediate_dpo": "52.5% win rate against DPO, 67.5% against SFT (DPO loss at layer 22)",
}


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def splits(args: argparse.Namespace, tokenizer: Any, end_id: int) -> dict[str, Any]:
    """Text-level pairs and prompts of the head_helpful recipe's splits (module docstring)."""
    from arbiter.training.cli import resolve_config_path
    from arbiter.training.config import load_config
    from arbiter.training.data import load_pairs
    from arbiter.training.data.records import _prompt_key
    from arbiter.training.data.splits import load_sources, load_tokenized, split_indices
    from arbiter.training.recipes.head import HeadRecipeConfig

    cfg = load_config(HeadRecipeConfig, resolve_config_path("head_helpful"))
    sources = load_sources(cfg)
    by_row = {(p.meta.get("source"), p.meta.get("row")): p for pairs, _ in sources for p in pairs}
    tok, _ = load_tokenized(cfg, tokenizer, end_id, sources=sources)
    sp = split_indices(tok, cfg)

    def text(i: int) -> Any:
        return by_row[(tok[i].meta.get("source"), tok[i].meta.get("row"))]

    def short(idx: list[int]) -> list[int]:  # the budget's max_length: prompt + longer answer
        return [i for i in idx if len(tok[i].prompt_ids) + max(len(tok[i].chosen_ids), len(tok[i].rejected_ids)) <= args.max_length]

    train_i = short(sp["train"])
    test_i = short(sp["test"])
    prompts, seen = [], set()
    for i in sp["test"]:
        p = text(i)
        k = _prompt_key(p.prompt)
        if k not in seen and len(tok[i].prompt_ids) <= args.max_length - args.gen_tokens and len(prompts) < args.prompts:
            seen.add(k)
            prompts.append(p.prompt)
    out = {"train": [text(i) for i in train_i[: args.train]],
           "dev": [text(i) for i in train_i[args.train : args.train + args.dev]],
           "test": [text(i) for i in test_i[: args.test]], "prompts": prompts}
    for name in ("pandalm", "autoj"):
        pairs, _ = load_pairs(name, seed=0)
        out[name] = pairs[: args.ood]
    return out


def arbiter(*argv: str, log: Path) -> dict[str, Any]:
    """One `arbiter train ...` in its own process: (seconds, peak RSS MiB, exit code)."""
    t0 = time.monotonic()
    with open(log, "wb") as f:
        p = subprocess.Popen([sys.executable, "-m", "arbiter.cli", "train", *argv], stdout=f, stderr=subprocess.STDOUT,
                             cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise RuntimeError(f"arbiter train {' '.join(argv)} failed ({rc}): {log.read_text()[-2000:]}")
    return {"seconds": round(time.monotonic() - t0, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def tokenized_pairs(backbone: Any, pairs: list[Any], max_length: int) -> list[Any]:
    from arbiter.training.data import tokenize_pairs

    tok, _ = tokenize_pairs(pairs, backbone.tokenizer, backbone.end_id, max_length=max_length)
    return tok


def pair_logps(backbone: Any, model: Any, tok: list[Any], batch_size: int = 4) -> torch.Tensor:
    """[P, 4] float64: summed answer log-probs of (chosen, rejected) under ``model`` and the answers' lengths, batched
    by length (the same collate and forward as training and `adapter_pair_accuracy`)."""
    from arbiter.training.data import collate_pairs
    from arbiter.training.logprobs import forward_logps, split_pairs

    order = sorted(range(len(tok)), key=lambda i: len(tok[i].prompt_ids) + len(tok[i].chosen_ids) + len(tok[i].rejected_ids))
    out = torch.zeros(len(tok), 4, dtype=torch.float64)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = collate_pairs([tok[i] for i in idx], backbone.end_id)
            lp = split_pairs(forward_logps(model, batch).logps.double().cpu())
            ln = split_pairs(batch["answer_lengths"].double())
            out[idx] = torch.stack([lp[0], lp[1], ln[0].clamp(min=1), ln[1].clamp(min=1)], 1)
    return out


def implicit(policy: torch.Tensor, base: torch.Tensor) -> dict[str, Any]:
    """Implicit-reward accuracy (r = log pi - log pi_start summed over the answer; beta does not change the order;
    ties count as wrong, as `adapter_pair_accuracy`) and its length-normalised form, the mean margin, and the
    starting model's own log-prob accuracy (summed / per token): the baseline an adapter must beat."""
    rc, rr = policy[:, 0] - base[:, 0], policy[:, 1] - base[:, 1]
    lc, lr = base[:, 2], base[:, 3]
    n = len(base)
    acc, acc_n = float((rc > rr).double().mean()), float((rc / lc > rr / lr).double().mean())
    return {"n": n, "accuracy": acc, "se": se(acc, n), "margin": float((rc - rr).mean()),
            "accuracy_norm": acc_n, "se_norm": se(acc_n, n),
            "base_logp_accuracy": float((base[:, 0] > base[:, 1]).double().mean()),
            "base_logp_accuracy_norm": float((base[:, 0] / lc > base[:, 1] / lr).double().mean())}


def generate(backbone: Any, model: Any, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy answers (token ids, without the closing token) of ``model`` to each prompt."""
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                               eos_token_id=backbone.end_id, pad_token_id=backbone.end_id)
            ans = y[0, len(ids):].tolist()
            outs.append(ans[: ans.index(backbone.end_id)] if backbone.end_id in ans else ans)
    return outs


def token_kl(model: Any, prompts: list[list[int]], answers: list[list[int]]) -> float:
    """Mean over answer tokens of KL(model || model with its adapter disabled), over the full vocabulary."""
    tot, n = 0.0, 0
    with torch.inference_mode():
        for p, a in zip(prompts, answers):
            if not a:
                continue
            x = torch.tensor([p + a])
            lo = model(input_ids=x).logits[0, len(p) - 1 : len(p) + len(a) - 1].float().log_softmax(-1)  # [T, V]
            with model.disable_adapter():
                lb = model(input_ids=x).logits[0, len(p) - 1 : len(p) + len(a) - 1].float().log_softmax(-1)
            tot += float((lo.exp() * (lo - lb)).sum())
            n += len(a)
    return tot / n if n else float("nan")


def judge(backbone: Any, head: Any, layer: int, prompts: list[list[int]], answers: list[list[int]]) -> list[float]:
    from arbiter.training.evaluate import score_answers

    rows = [(p, a + [backbone.end_id]) for p, a in zip(prompts, answers)]
    return score_answers(backbone, head, layer, rows, progress=False)[0].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--dev", type=int, default=48)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--ood", type=int, default=50)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lrs", type=float, nargs="+", default=[2e-4, 1e-3])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--losses", nargs="+", default=LOSSES, choices=LOSSES)
    ap.add_argument("--sae-steps", type=int, default=60)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="training autocast; auto: bf16 where the backbone's dtype=auto picks it (bf16 matmuls measured "
                         "faster here, or CUDA with bf16), else fp32. Evaluation is in float32 either way")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "runs" / "adapters_bench"))
    ap.add_argument("--report", default=str(REPORT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Run("benchmarks/adapters.py")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from arbiter.backbone import load_backbone
    from arbiter.chat import prompt_ids
    from arbiter.heads import load_head
    from arbiter.training.data import save_pairs

    if args.precision == "auto":
        from arbiter.backbone import resolve_dtype

        args.precision = "bf16" if resolve_dtype("auto", args.device)[0] == "bfloat16" else "fp32"
    from arbiter.training.lora import loaded_adapter

    t0 = time.monotonic()
    info: dict[str, Any] = {}
    bb = load_backbone(None, device=args.device, dtype="float32", threads=args.threads)
    data = splits(args, bb.tokenizer, bb.end_id)
    train_file = save_pairs(data["train"], work / "train.jsonl")
    tok = {k: tokenized_pairs(bb, data[k], args.max_length if k == "dev" else 1024)
           for k in ("dev", "test", "pandalm", "autoj")}
    t_base = time.monotonic()
    base_lp = {k: pair_logps(bb, bb.model, v) for k, v in tok.items()}  # the starting model's, once for every loss
    info["base_eval_seconds"] = round(time.monotonic() - t_base, 1)
    common = [f"data.max_length={args.max_length}", "data.truncate_prompt=false", f"device={args.device}", "progress=false"]
    # --- the SAE (FPO) and the one reference file ------------------------------------------------------------
    sae_dir = work / "sae"
    if "fpo" in args.losses:
        if not (sae_dir / "sae" / "cfg.json").is_file():
            info["sae"] = arbiter("sae", "--config", "sae_smoke", f"--out={sae_dir}", f"train.steps={args.sae_steps}",
                                  "overwrite=true", f"device={args.device}", "progress=false", log=work / "sae.log")
    ref_file = work / "train_ref.parquet"
    ref_args = ["ref", "--config", "adapter_ref", f"--out={ref_file}", f"data.source={train_file}", *common[:2],
                "overwrite=true", f"device={args.device}", f"precision={args.precision}", "progress=false"]
    if "fpo" in args.losses:
        ref_args.append(f"sae={sae_dir / 'sae'}")
    info["ref"] = arbiter(*ref_args, log=work / "ref.log")
    # --- training: every (loss, lr) ------------------------------------------------------------------------
    runs: dict[str, dict[str, Any]] = {}
    for loss in args.losses:
        for lr in args.lrs:
            out = work / f"{loss}-lr{lr:g}"
            argv = ["adapter", "--config", "adapter", f"--loss={loss}", f"--out={out}", f"data.source={ref_file}",
                    *common, "data.dev_fraction=0", "reference=precomputed", "lora.r=8", "lora.alpha=16",
                    "lora.dropout=0.05", f"optim.lr={lr}", "optim.batch_size=4", "optim.grad_accum=2", f"precision={args.precision}",
                    f"optim.epochs={args.epochs}", "save_every=0", "eval_every=0", "seed=0", "overwrite=true"]
            if loss == "fpo":
                argv.append(f"fpo.sae={sae_dir / 'sae'}")
            r = arbiter(*argv, log=work / f"{loss}-lr{lr:g}.log")
            steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
            r["step_s_median"] = round(statistics.median(s["time/step_s"] for s in steps[1:] or steps), 2)
            r["steps"] = len(steps)
            r["lora_dropout"] = json.loads((out / "adapter" / "adapter_config.json").read_text()).get("lora_dropout")
            with loaded_adapter(bb, out / "adapter") as model:
                r["dev"] = implicit(pair_logps(bb, model, tok["dev"]), base_lp["dev"])
            runs[f"{loss} {lr:g}"] = {"loss": loss, "lr": lr, "dir": str(out), **r}
            print(loss, lr, r["seconds"], "s, dev", round(r["dev"]["accuracy"], 3), flush=True)
    train_seconds = time.monotonic() - t0
    # --- the chosen run per loss, measured --------------------------------------------------------------------
    head, hcfg = load_head(ROOT / "heads" / "helpful", expected_backbone=bb.fingerprint)
    prompts = [prompt_ids(bb.tokenizer, m) for m in data["prompts"]]
    base_answers = generate(bb, bb.model, prompts, args.gen_tokens)
    base_rewards = judge(bb, head, hcfg.layer, prompts, base_answers)
    results: dict[str, Any] = {}
    for loss in args.losses:
        cands = [v for v in runs.values() if v["loss"] == loss]
        best = max(cands, key=lambda v: (v["dev"]["accuracy"], v["dev"]["margin"]))
        adir = Path(best["dir"]) / "adapter"
        res: dict[str, Any] = {"lr": best["lr"], "dev": best["dev"]}
        with loaded_adapter(bb, adir) as model:
            for name in ("test", "pandalm", "autoj"):
                res[name] = implicit(pair_logps(bb, model, tok[name]), base_lp[name])
            answers = generate(bb, model, prompts, args.gen_tokens)
            res["kl_per_token"] = token_kl(model, prompts, answers)
        rewards = judge(bb, head, hcfg.layer, prompts, answers)
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, base_rewards)]
        res["win_rate"] = statistics.mean(wins)
        res["win_se"] = statistics.stdev(wins) / len(wins) ** 0.5 if len(wins) > 1 else None
        res["mean_tokens"] = statistics.mean(len(a) for a in answers)
        res["longer_share"] = statistics.mean(float(len(a) > len(b)) for a, b in zip(answers, base_answers))
        res["same_as_start"] = sum(a == b for a, b in zip(answers, base_answers))
        res["train"] = {k: best[k] for k in ("seconds", "peak_rss_mib", "step_s_median", "steps", "lora_dropout")}
        res["answers"] = [bb.tokenizer.decode(a) for a in answers]
        results[loss] = res
    base = {"mean_tokens": statistics.mean(len(a) for a in base_answers),
            "answers": [bb.tokenizer.decode(a) for a in base_answers]}
    for name in ("test", "pandalm", "autoj"):
        any_adapter = next(iter(results.values()))[name]
        base[f"{name}_logp_accuracy"] = any_adapter["base_logp_accuracy"]
        base[f"{name}_logp_accuracy_norm"] = any_adapter["base_logp_accuracy_norm"]
    sizes = {k: len(v) for k, v in data.items()} | {k: len(v) for k, v in tok.items()}  # after tokenising
    meta = {**run.finish(), **vars(args), "sizes": sizes, "info": info,
            "train_seconds": round(train_seconds, 1), "total_seconds": round(time.monotonic() - t0, 1)}
    report = Path(args.report)
    report.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs, "results": results, "start": base},
                                                      indent=2, default=str) + "\n")
    png = plot(results, report.with_suffix(".png"))
    report.with_suffix(".md").write_text(markdown(meta, runs, results, base, png) + "\n")
    print(report.with_suffix(".md").read_text())


def plot(results: dict[str, Any], png: Path) -> Path | None:
    from arbiter.training.plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results)
    x = range(len(names))
    for name, off in (("test", -0.25), ("pandalm", 0), ("autoj", 0.25)):
        axes[0].errorbar([i + off for i in x], [results[n][name]["accuracy"] for n in names],
                         yerr=[results[n][name]["se"] for n in names], fmt="o", capsize=3, label=name)
    axes[0].axhline(0.5, color="grey", lw=0.8)
    axes[0].set_xticks(list(x), names, rotation=30)
    axes[0].set_ylabel("implicit-reward accuracy (+- SE)")
    axes[0].legend(fontsize=8)
    axes[1].errorbar(list(x), [results[n]["win_rate"] for n in names], yerr=[results[n]["win_se"] or 0 for n in names],
                     fmt="s", capsize=3)
    axes[1].axhline(0.5, color="grey", lw=0.8)
    axes[1].set_xticks(list(x), names, rotation=30)
    axes[1].set_ylabel("win rate vs the starting model (helpful head)")
    fig.tight_layout()
    return _save(fig, png)


def markdown(meta: dict, runs: dict, results: dict, base: dict, png: Path | None) -> str:
    s = meta["sizes"]
    lines = ["# Adapter losses against DPO, one budget", "", Run.header(meta), "",
             f"Budget: {s['train']} hh-rlhf training pairs (max_length {meta['max_length']}), {meta['epochs']} epoch(s), "
             f"LoRA r 8 / alpha 16 / dropout 0.05 on q,k,v,o,gate,up,down, 8 pairs per optimiser step (4 x 2), "
             f"learning rates {', '.join(f'{x:g}' for x in meta['lrs'])} for every loss, seed 0, the losses' own default "
             f"beta and hyper-parameters, one precomputed reference file for all (no reference forward in any run); "
             f"device {meta['device']}, {meta['threads']} threads, training autocast {meta['precision']} (evaluation float32). Each loss's learning rate is picked by implicit-reward "
             f"accuracy on {s['dev']} dev pairs. Test: {s['test']} hh-rlhf pairs of heads/helpful's test split, "
             f"{s['pandalm']} PandaLM and {s['autoj']} Auto-J pairs (out of domain); {s['prompts']} held-aside prompts, "
             f"greedy, at most {meta['gen_tokens']} tokens. Training took {meta['train_seconds']:.0f} s, everything "
             f"{meta['total_seconds']:.0f} s.", ""]
    if png is not None:
        lines += [f"![accuracy and win rate per loss]({png.name})", ""]
    lines += ["| loss | lr | dev acc | test acc +- SE | test acc, length-normalised | PandaLM acc +- SE | Auto-J acc +- SE | "
              "win rate vs start (helpful head) +- SE | mean tokens (start: %.1f) | longer than start | same answer as start | "
              "KL / token | s / step | peak RSS MiB |" % base["mean_tokens"],
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for loss, r in results.items():
        t = r["train"]
        lines.append(
            f"| {loss} | {r['lr']:g} | {r['dev']['accuracy']:.3f} | {r['test']['accuracy']:.3f} +- {r['test']['se']:.3f} | "
            f"{r['test']['accuracy_norm']:.3f} | {r['pandalm']['accuracy']:.3f} +- {r['pandalm']['se']:.3f} | "
            f"{r['autoj']['accuracy']:.3f} +- {r['autoj']['se']:.3f} | {r['win_rate']:.3f} +- {r['win_se'] or 0:.3f} | "
            f"{r['mean_tokens']:.1f} | {r['longer_share']:.2f} | {r['same_as_start']}/{s['prompts']} | "
            f"{r['kl_per_token']:.4f} | {t['step_s_median']} | {t['peak_rss_mib']} |")
    lines += ["", f"The starting model's own log-prob accuracy (summed / length-normalised): test "
                  f"{base['test_logp_accuracy']:.3f} / {base['test_logp_accuracy_norm']:.3f}, PandaLM "
                  f"{base['pandalm_logp_accuracy']:.3f} / {base['pandalm_logp_accuracy_norm']:.3f}, Auto-J "
                  f"{base['autoj_logp_accuracy']:.3f} / {base['autoj_logp_accuracy_norm']:.3f}.",
              "", "Every run (dev implicit-reward accuracy of its final adapter; LoRA dropout read back from the saved "
                  "adapter config):", "", "| loss | lr | dev acc | steps | s | lora_dropout |", "|---|---|---|---|---|---|"]
    for r in runs.values():
        lines.append(f"| {r['loss']} | {r['lr']:g} | {r['dev']['accuracy']:.3f} | {r['steps']} | {r['seconds']} | {r['lora_dropout']} |")
    lines += ["", "What the papers claim (not comparable in scale: 7B models, thousands of steps, GPT-4 judges):", ""]
    lines += [f"- {k}: {v}" for k, v in PAPER.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
