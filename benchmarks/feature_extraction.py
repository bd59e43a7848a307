"""Feature extraction speed: batched prompt-once extraction vs a plain batched forward, per dtype and data.

For each dtype (float32, and bfloat16 where the CPU has native bf16 matmul) and each data set (SST-2: one shared
instruction, two-token answers; hh-rlhf helpful: long multi-turn prompts, long uneven answers), ONE process
runs, interleaved and alternating which goes first:
  extraction  arbiter.training.feature_cache.prompt_once_features, method "auto" (what `arbiter train head`
              runs: packed rows for long answers, the shared-prompt KV cache for short ones): tokens =
              prompt + chosen + rejected per pair (the prompt counted once, as the progress bar counts it);
  other       the prompt-once method "auto" did not choose, for comparison (same tokens);
  forward     compute_features over the full sequences (prompt + chosen, prompt + rejected), length-sorted
              padded batches, the same model and dtype: tokens = every real token fed (2 x prompt + answers).
Both give the same features (cosine reported). The goal: extraction tok/s >= 0.8 x forward tok/s.

Also measured: what bfloat16 features do to a head trained on float32 features (heads/helpful): reward
correlation and pairwise order agreement between float32 and bfloat16 features on the hh-rlhf pairs.

Writes benchmarks/reports/feature_extraction_<cpu kind>.md (and .json), one report per kind of CPU, since the
kernels (and whether bfloat16 is native) differ: ``amx`` (AMX tiles), ``avx512_bf16`` (AVX-512 BF16 dot products,
no AMX), ``avx2`` (no native bf16: AMD EPYC of the Zen 2/3 kind and older Intel). Usage:
    python benchmarks/feature_extraction.py [--sst2 256] [--hh 128] [--runs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from arbiter.backbone import cpu_bf16_flags, load_backbone
from arbiter.heads import load_head
from arbiter.training.data import load_pairs, tokenize_pairs
from arbiter.training.feature_cache import compute_features, extraction_method, prompt_once_features

from _provenance import Run, ratio_stats  # benchmarks/ is on sys.path: the script's own directory

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "benchmarks" / "reports"


def cpu_kind(flags: list[str]) -> str:
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "avx2"


def pairs_of(name: str, n: int, bb, max_length: int):
    raw, _ = load_pairs(name, seed=0)
    tok, _ = tokenize_pairs(raw[: 3 * n], bb.tokenizer, bb.end_id, max_length=max_length, raise_if_empty=True)
    return tok[:n]


def one(bb, pairs, mode: str) -> tuple[float, int, torch.Tensor]:
    t0 = time.perf_counter()
    if mode in ("extraction", "other"):
        auto = extraction_method(pairs)
        method = auto if mode == "extraction" else {"packed": "shared", "shared": "packed"}[auto]
        c, r = prompt_once_features(bb, pairs, method=method, progress=False)
        feats = torch.cat([c, r])
        tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    else:
        seqs = [list(p.prompt_ids) + list(p.chosen_ids) for p in pairs] + [list(p.prompt_ids) + list(p.rejected_ids) for p in pairs]
        feats = compute_features(bb, seqs, progress=False)
        tokens = sum(len(s) for s in seqs)
    return time.perf_counter() - t0, tokens, feats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sst2", type=int, default=256, help="SST-2 pairs")
    ap.add_argument("--hh", type=int, default=128, help="hh-rlhf helpful pairs")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs per mode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--head", default=str(ROOT / "heads" / "helpful"), help="float32-trained head for the bf16 check")
    args = ap.parse_args()
    run = Run("benchmarks/feature_extraction.py")  # the code this run uses (taken before it starts)
    report = REPORTS / f"feature_extraction_{cpu_kind(run.machine['flags'])}"
    torch.set_num_threads(args.threads)
    dtypes = ["float32"] + (["bfloat16"] if cpu_bf16_flags() else [])
    results, feats_by_dtype = [], {}
    for dtype in dtypes:
        bb = load_backbone(dtype=dtype)
        for name, n in (("sst2", args.sst2), ("hh-rlhf", args.hh)):
            pairs = pairs_of(name, n, bb, args.max_length)
            runs = {"extraction": [], "forward": [], "other": []}
            feats = {}
            for k in range(args.runs):
                order = ("extraction", "forward", "other") if k % 2 == 0 else ("other", "forward", "extraction")
                for mode in order:
                    sec, tokens, f = one(bb, pairs, mode)
                    runs[mode].append({"seconds": sec, "tokens": tokens, "tok_s": tokens / sec, "pairs_s": len(pairs) / sec})
                    feats[mode] = f
            cos = F.cosine_similarity(feats["extraction"], feats["forward"].float(), dim=1)
            ratio = ratio_stats([e["tok_s"] for e in runs["extraction"]], [f["tok_s"] for f in runs["forward"]])
            row = {
                "dtype": dtype, "data": name, "pairs": len(pairs), "method": extraction_method(pairs),
                "other_tok_s": statistics.median(r["tok_s"] for r in runs["other"]),
                "mean_prompt": statistics.mean(len(p.prompt_ids) for p in pairs),
                "mean_answer": statistics.mean((len(p.chosen_ids) + len(p.rejected_ids)) / 2 for p in pairs),
                "extraction_tok_s": statistics.median(r["tok_s"] for r in runs["extraction"]),
                "forward_tok_s": statistics.median(r["tok_s"] for r in runs["forward"]),
                "extraction_pairs_s": statistics.median(r["pairs_s"] for r in runs["extraction"]),
                "forward_pairs_s": statistics.median(r["pairs_s"] for r in runs["forward"]),
                "ratio_tok_s": ratio,
                "min_cosine_extraction_vs_forward": cos.min().item(), "runs": runs,
            }
            row["ratio_pairs_s_median"] = row["extraction_pairs_s"] / row["forward_pairs_s"]
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
            if name == "hh-rlhf":
                feats_by_dtype[dtype] = (feats["extraction"], len(pairs))
        del bb

    bf16 = None
    if "bfloat16" in feats_by_dtype:
        head, cfg = load_head(args.head)
        with torch.no_grad():
            r32 = head(feats_by_dtype["float32"][0]).float()  # [2N]: chosen then rejected
            r16 = head(feats_by_dtype["bfloat16"][0]).float()
        n = feats_by_dtype["float32"][1]
        m32, m16 = r32[:n] - r32[n:], r16[:n] - r16[n:]  # margins r_w - r_l, [N]
        bf16 = {
            "head": str(Path(args.head).relative_to(ROOT)) if Path(args.head).is_relative_to(ROOT) else args.head,
            "head_feature_dtype": cfg.feature_dtype, "pairs": n,
            "reward_pearson": torch.corrcoef(torch.stack([r32, r16]))[0, 1].item(),
            "margin_pearson": torch.corrcoef(torch.stack([m32, m16]))[0, 1].item(),
            "pairwise_order_agreement": (torch.sign(m32) == torch.sign(m16)).float().mean().item(),
            "accuracy_fp32_features": (m32 > 0).float().mean().item(),
            "accuracy_bf16_features": (m16 > 0).float().mean().item(),
            "max_abs_reward_diff": (r32 - r16).abs().max().item(),
            "reward_std_fp32": r32.std().item(),
        }
        print(json.dumps(bf16), flush=True)

    meta = {**run.finish(), "cpu_bf16_flags": cpu_bf16_flags(), "threads": args.threads, "torch": torch.__version__}
    report.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results, "bf16_vs_fp32_head": bf16}, indent=2) + "\n")
    lines = [
        "# Feature extraction: batched prompt-once extraction vs a plain batched forward", "",
        Run.header(meta), "",
        f"{args.threads} torch threads; CPU bf16 flags: {', '.join(meta['cpu_bf16_flags']) or 'none'}; torch "
        f"{meta['torch']}. Medians of {args.runs} interleaved runs per mode (alternating which mode goes first); the "
        "ratio is the median of the per-run ratios, with the ratio of the medians beside it. The machine is shared "
        "and noisy.", "",
        "Extraction tokens = prompt + chosen + rejected per pair (prompt once); forward tokens = every real token of the "
        "two full sequences (prompt twice). Goal: extraction tok/s >= 0.8 x forward tok/s at the same dtype. "
        "Extraction is `prompt_once_features(method=\"auto\")`, what `arbiter train head` runs: `packed` (one "
        "prompt | chosen | rejected row per pair under a 4D mask) when answers average >= 8 tokens, else `shared` "
        "(prompt KV cache continued by each answer); the other method's tok/s is shown for comparison.", "",
        "| dtype | data | pairs | mean prompt / answer tokens | method | extraction tok/s | forward tok/s | **ratio (tok/s)** | ratio of medians, per-run range | pairs/s extraction / forward | other method tok/s | min cosine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['dtype']} | {r['data']} | {r['pairs']} | {r['mean_prompt']:.0f} / {r['mean_answer']:.0f} | {r['method']} | "
            f"{r['extraction_tok_s']:.0f} | {r['forward_tok_s']:.0f} | **{r['ratio_tok_s']['median_of_ratios']:.2f}** | "
            f"{r['ratio_tok_s']['ratio_of_medians']:.2f}, {r['ratio_tok_s']['min']:.2f}-{r['ratio_tok_s']['max']:.2f} | {r['extraction_pairs_s']:.1f} / {r['forward_pairs_s']:.1f} "
            f"({r['ratio_pairs_s_median']:.2f}x) | {r['other_tok_s']:.0f} | {r['min_cosine_extraction_vs_forward']:.5f} |")
    if bf16:
        lines += ["", "## bfloat16 features under a head trained on float32 features", "",
                  f"Head `{bf16['head']}` (feature_dtype {bf16['head_feature_dtype']}) on the {bf16['pairs']} hh-rlhf pairs above, "
                  "rewards from float32 vs bfloat16 extraction features:", "",
                  "| reward Pearson r | margin Pearson r | pairwise order agreement | accuracy fp32 / bf16 features | max abs reward diff (reward std) |",
                  "|---|---|---|---|---|",
                  f"| {bf16['reward_pearson']:.4f} | {bf16['margin_pearson']:.4f} | {bf16['pairwise_order_agreement']:.3f} | "
                  f"{bf16['accuracy_fp32_features']:.3f} / {bf16['accuracy_bf16_features']:.3f} | "
                  f"{bf16['max_abs_reward_diff']:.4f} ({bf16['reward_std_fp32']:.4f}) |"]
    report.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {report.with_suffix('.md')}")


if __name__ == "__main__":
    main()
