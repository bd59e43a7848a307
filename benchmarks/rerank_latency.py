"""Rerank overhead benchmark: plain n=N sampling vs rerank with N candidates vs the naive pipeline.

All three run on the embedded model in ONE process, interleaved (plain, rerank, naive, plain, ...) with
the same seeds, so each mode generates exactly the same tokens and differs only in how the reward
features are obtained:
  plain   N candidates sampled in one batch, no features.
  rerank  the same, with the head feature captured in the decode loop (+1 decode step feeding
          <|im_end|>) and every candidate scored by a head.
  naive   plain sampling, then a separate full forward over prompt + answer + <|im_end|> of every candidate
          to get its feature, then scoring.
Writes benchmarks/reports/rerank_latency.md (and .json). Usage:
    python benchmarks/rerank_latency.py [--n 8] [--max-tokens 128] [--prompts 4] [--repeats 3] [--dtype auto]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from arbiter.backbone import load_backbone, prompt_ids
from arbiter.generation.base import GenerationJob, SamplingParams
from arbiter.generation.hf import HFEngine
from arbiter.heads import HeadConfig, build_head
from arbiter.heads.registry import LoadedHead
from arbiter.selection import select
from arbiter.service.rerank import score_candidates, score_features

from _provenance import Run, ratio_stats, ratio_text  # benchmarks/ is on sys.path: the script's own directory

ROOT = Path(__file__).resolve().parents[1]


def _prompts(k: int) -> list[str]:
    data = Path(os.environ.get("ARBITER_DATA_DIR", ROOT.parent / "shared" / "data"))
    path = data / "hh_rlhf" / "helpful-online" / "test.jsonl.gz"
    out = []
    with gzip.open(path, "rt") as f:
        for line in f:
            text = json.loads(line)["chosen"]
            first = text.split("\n\nHuman:")[1].split("\n\nAssistant:")[0].strip()
            if 20 < len(first) < 300:
                out.append(first)
            if len(out) == k:
                break
    return out


def _device_desc(device: str) -> str:
    if device.startswith("cuda"):
        return f"GPU {torch.cuda.get_device_name(0)}"
    return "CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "rerank_latency"))
    args = ap.parse_args()
    run = Run("benchmarks/rerank_latency.py")

    bb = load_backbone(os.environ.get("ARBITER_MODEL"), device=args.device, dtype=args.dtype)
    engine = HFEngine(bb)
    torch.manual_seed(0)
    cfg = HeadConfig(name="bench", backbone=bb.fingerprint, pooler="affine_tanh", hidden_size=bb.hidden_size)
    head = LoadedHead("bench", build_head(cfg).eval().to(args.device), cfg, "<memory>")
    prompts = [prompt_ids(bb.tokenizer, [{"role": "user", "content": p}]) for p in _prompts(args.prompts)]

    def job(ids, seed, capture):
        return GenerationJob(ids, args.n, SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=seed),
                             feature_layers=(-1,) if capture else ())

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def plain(ids, seed):
        return engine.generate([job(ids, seed, False)])[0]

    def rerank(ids, seed):
        res = engine.generate([job(ids, seed, True)])[0]
        return res, select(score_candidates(res.candidates, [head]), "argmax")

    def naive(ids, seed):
        res = engine.generate([job(ids, seed, False)])[0]
        feats = engine.features([ids] * len(res.candidates), [c.token_ids for c in res.candidates], [-1])
        return res, select(score_features(feats, [head]), "argmax")

    modes = {"plain": plain, "rerank": rerank, "naive": naive}
    plain(prompts[0], 0)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    tokens: dict[str, int] = {m: 0 for m in modes}
    agree = 0
    runs = 0
    for rep in range(args.repeats):
        for k, ids in enumerate(prompts):
            seed = 1000 * rep + k
            picks = {}
            # Rotate the order every run: whichever mode goes first in a triple pays for any warm-up
            # effect (clocks, allocator), so a fixed order would bias the ratios.
            names = list(modes)
            names = names[runs % 3:] + names[: runs % 3]
            for m in names:
                fn = modes[m]
                t = time.perf_counter()
                out = fn(ids, seed)
                sync()
                times[m].append(time.perf_counter() - t)
                res = out[0] if isinstance(out, tuple) else out
                tokens[m] += res.completion_tokens
                if isinstance(out, tuple):
                    picks[m] = out[1].order[0]
            agree += int(picks["rerank"] == picks["naive"])
            runs += 1
            print(f"run {runs}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in names), flush=True)

    med = {m: statistics.median(v) for m, v in times.items()}
    ratios = {"rerank/plain": ratio_stats(times["rerank"], times["plain"]),
              "naive/rerank": ratio_stats(times["naive"], times["rerank"])}
    meta = run.finish()
    report = {
        "meta": meta,
        "machine": {"device": _device_desc(args.device), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "config": vars(args) | {"model": bb.name, "dtype_resolved": bb.dtype, "runs_per_mode": runs},
        "median_s": med, "ratios": ratios, "completion_tokens": tokens,
        "rerank_and_naive_pick_same_candidate": f"{agree}/{runs}", "all_s": times,
    }
    Path(args.out + ".json").write_text(json.dumps(report, indent=2))
    md = [
        "# Rerank latency: plain vs in-loop rerank vs naive rescoring",
        "",
        Run.header(meta),
        "",
        f"Model {bb.name} on {_device_desc(args.device)}, dtype {bb.dtype} (requested {args.dtype}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads. N = {args.n} candidates, max_tokens = {args.max_tokens}, "
        f"temperature 0.8, top_p 0.95; {len(prompts)} hh-rlhf prompts x {args.repeats} repeats = {runs} runs per mode, "
        "interleaved in one process (mode order rotated every run) with the same seeds (every mode generates the same tokens).",
        "",
        "| mode | median latency (s) | completion tokens (all runs) |",
        "|---|---|---|",
    ]
    for m in modes:
        md.append(f"| {m} | {med[m]:.3f} | {tokens[m]} |")
    md += [
        "",
        f"- rerank / plain: **{ratio_text(ratios['rerank/plain'])}** (goal <= 1.05)",
        f"- naive / rerank: **{ratio_text(ratios['naive/rerank'])}**",
        f"- rerank and naive picked the same candidate in {agree}/{runs} runs (same features up to float error).",
        "",
        "The machine is shared; read ratios, not absolute times.",
    ]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
