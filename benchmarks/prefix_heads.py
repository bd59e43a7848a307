"""Prefix-aware heads for pruning: `helpful_prefix` (trained on closed prefixes too) against `helpful` (whole
answers only), through the API, on the same candidates.

Prompts: the helpful prompts of early_rejection.py (written for the benchmarks, in no training set), then prompts of
the hh-rlhf TEST split of heads/helpful's recipe (by prompt: neither head trained or was picked on them; both heads
come from the same data, splits and seed). Per prompt, two requests with the same seed: rerank N=16,
`return_candidates`, `prune: {at: <checkpoints>, keep: 1, close: true}` (drops nothing, records each candidate's
closed-prefix reward at every checkpoint), once with `helpful` picking and once with `helpful_prefix` picking, both
heads' final rewards requested. Candidate i depends only on (seed, i), so both requests return the same candidates
(checked), and every policy is replayed from them by the server's rules (early_rejection.replay_prune / pick):
fixed best-of-k and each pruning schedule of early_rejection.py for N = 8 and 16, pruned by the picking head's
partial rewards and picked by its final reward among the survivors.

Judged by each head's final reward (a head judging its own picks favours itself: both judges are reported), plus
how well a prefix ranks: Spearman of the partial reward with the judge's final reward among the candidates alive at
each checkpoint (mean over prompts).

Writes benchmarks/reports/prefix_heads.md (and .json). Usage:
    python benchmarks/prefix_heads.py [--hh 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import openai
from early_rejection import (
    HELPFUL_MAX_TOKENS,
    HELPFUL_PROMPTS,
    SCHEDULES,
    N,
    at_tokens,
    pick,
    replay_prune,
    spearman,
    tokens_of,
)

import _serve  # benchmarks/ is on sys.path: the script's own directory
from _provenance import Run

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "reports" / "prefix_heads"
HEADS = ("helpful", "helpful_prefix")


def hh_test(count: int) -> tuple[list[list[dict]], dict]:
    """(the first ``count`` distinct prompts of the hh-rlhf test split of head_helpful_prefix's recipe, which shares
    head_helpful's data, splits and seed; each head's accuracy on that split's pairs, whole and as closed prefixes
    at the recipe's ``prefix_eval`` cuts). The features come from the recipe's feature cache (the same key: a hit
    after ``arbiter train head --config head_helpful_prefix``)."""
    import torch

    from arbiter.backbone import load_backbone
    from arbiter.heads import load_head
    from arbiter.training.cli import resolve_config_path
    from arbiter.training.config import load_config
    from arbiter.training.data.records import _prompt_key
    from arbiter.training.data.splits import load_sources, load_tokenized, split_indices
    from arbiter.training.feature_cache import pair_features
    from arbiter.training.recipes.head import HeadRecipeConfig, prefix_accuracy, prefix_cuts
    from arbiter.training.stats import accuracy_se

    cfg = load_config(HeadRecipeConfig, resolve_config_path("head_helpful_prefix"))
    sources = load_sources(cfg)
    by_row = {(p.meta.get("source"), p.meta.get("row")): p for pairs, _ in sources for p in pairs}
    bb = load_backbone(cfg.model, dtype=cfg.dtype)
    tok, _ = load_tokenized(cfg, bb.tokenizer, bb.end_id, sources=sources)
    test = split_indices(tok, cfg)["test"]
    prompts, seen = [], set()
    for i in test:
        p = by_row[(tok[i].meta.get("source"), tok[i].meta.get("row"))]
        key = _prompt_key(p.prompt)
        if key not in seen and len(prompts) < count:
            seen.add(key)
            prompts.append(p.prompt)
    cuts, rows = prefix_cuts(tok, cfg.prefixes, cfg.prefix_min_tokens, cfg.prefix_eval, cfg.seed)
    feats = pair_features(bb, tok, layer=cfg.layer, max_length=cfg.max_length, cache_dir=cfg.cache_dir, cuts=cuts)
    acc: dict[str, dict] = {"feature_cache": feats.status, "n_test": len(test)}
    t = torch.tensor(test)
    for h in HEADS:
        head, hc = load_head(ROOT / "heads" / h, expected_backbone=bb.fingerprint)
        if hc.layer != cfg.layer:
            raise SystemExit(f"head {h} reads layer {hc.layer}, the features are layer {cfg.layer}")
        with torch.no_grad():
            a = float((head(feats.chosen[t]) > head(feats.rejected[t])).float().mean())
        cell = {"whole": (round(a, 4), round(accuracy_se(a, len(test)), 4), len(test))}
        for k in cfg.prefix_eval:
            pa, n = prefix_accuracy(head, feats, rows, test, k)
            cell[f"@{k}"] = (round(pa, 4), round(accuracy_se(pa, n), 4), n) if pa is not None else None
        acc[h] = cell
    return prompts, acc


def record(client: openai.OpenAI, model: str, messages: list[dict], seed: int, at: list[int]) -> dict:
    got = {}
    t0 = time.monotonic()
    for head in HEADS:
        r = client.chat.completions.create(
            model=model, messages=messages, temperature=1.0, seed=seed, max_tokens=HELPFUL_MAX_TOKENS,
            extra_body={"rerank": {"candidates": N, "heads": [head, *(h for h in HEADS if h != head)],
                                   "return_candidates": True, "prune": {"at": at, "keep": 1, "close": True}}})
        got[head] = r.model_extra["rerank"]["candidates"]
    a, b = (got[h] for h in HEADS)
    cands = [{"text": c["text"], "tokens": c["completion_tokens"], "final": dict(c["rewards"]),
              "partial": {h: {p["tokens"]: p["reward"] for p in got[h][i]["partial_rewards"]} for h in HEADS}}
             for i, c in enumerate(a)]
    return {"cands": cands, "same_candidates": sum(x["text"] == y["text"] for x, y in zip(a, b)),
            "wall_s": round(time.monotonic() - t0, 2)}


def view(cands: list[dict], picker: str) -> list[dict]:
    """The candidates as early_rejection's replay reads them, ranked by ``picker``."""
    return [{"final": c["final"][picker], "tokens": c["tokens"], "partial": c["partial"][picker], "answer": None}
            for c in cands]


def policies(cands: list[dict], picker: str) -> dict[str, dict]:
    v = view(cands, picker)
    out = {f"best-of-{k}": {"pick": pick(v[:k], "argmax"), "tokens": tokens_of(v[:k])} for k in (1, 2, 4, 8, 16)}
    for name, (fr, keep) in SCHEDULES.items():
        at = at_tokens(fr, HELPFUL_MAX_TOKENS)
        for n in (8, 16):
            pr = replay_prune(v[:n], at, keep)
            out[f"{name}, N={n}"] = {"pick": pick(v[:n], "argmax", pr), "tokens": tokens_of(v[:n], pr)}
    return out


def summarise(rows: list[dict]) -> dict:
    n = len(rows)
    res: dict[str, Any] = {"prompts": n, "same_candidates": f"{sum(r['same_candidates'] for r in rows)}/{N * n}",
                           "policies": {}, "prefix": {}}
    for picker in HEADS:
        pols = [policies(r["cands"], picker) for r in rows]
        for name in pols[0]:
            cell: dict[str, Any] = {"tokens_mean": round(statistics.mean(p[name]["tokens"] for p in pols), 1)}
            for judge in HEADS:
                vals = [r["cands"][p[name]["pick"]]["final"][judge] for r, p in zip(rows, pols)]
                cell[f"reward_{judge}"] = round(statistics.mean(vals), 4)
                cell[f"se_{judge}"] = round(statistics.stdev(vals) / n ** 0.5, 4) if n > 1 else None
            res["policies"][f"{picker}: {name}"] = cell
        at = sorted({t for r in rows for c in r["cands"] for t in c["partial"][picker]})
        for t in at:
            cell = {}
            for judge in HEADS:
                rhos = [rho for r in rows if (rho := spearman(
                    [c["partial"][picker][t] for c in r["cands"] if t in c["partial"][picker]],
                    [c["final"][judge] for c in r["cands"] if t in c["partial"][picker]])) is not None]
                cell[f"spearman_vs_{judge}"] = round(statistics.mean(rhos), 3) if rhos else None
                cell[f"se_{judge}"] = round(statistics.stdev(rhos) / len(rhos) ** 0.5, 3) if len(rhos) > 1 else None
            res["prefix"][f"{picker} {t}"] = {"picker": picker, "tokens": t, **cell}
    return res


def markdown(meta: dict, res: dict, acc: dict) -> str:
    lines = ["# Prefix-aware heads for pruning: `helpful_prefix` vs `helpful`, same candidates", "", Run.header(meta), "",
             f"Server: HF engine, {meta['threads']} threads; {meta['server_dtype']}. {res['prompts']} prompts "
             f"({meta['helpful_prompts']} written for the benchmarks + {meta['hh_prompts']} from the hh-rlhf test split "
             f"of both heads' recipe), seed 1000 + i, N = {N}, max_tokens {HELPFUL_MAX_TOKENS}, temperature 1, prefixes "
             f"scored closed. Both recordings returned the same candidates: {res['same_candidates']}. Every policy is "
             "replayed from them by the server's rules (module docstring).", "",
             f"Pairwise accuracy on the {acc['n_test']} hh-rlhf test pairs of the recipe (never trained on or picked "
             "by), whole answers and both answers cut after k tokens, read closed (accuracy +- SE, pairs whose longer "
             f"answer the cut shortens; features from the recipe's cache: {acc['feature_cache']}):", "",
             "| head | " + " | ".join(k for k in acc[HEADS[0]]) + " |", "|---|" + "---|" * len(acc[HEADS[0]])]
    for h in HEADS:
        lines.append(f"| `{h}` | " + " | ".join("-" if v is None else f"{v[0]:.3f} +- {v[1]:.3f} ({v[2]})"
                                                for v in acc[h].values()) + " |")
    lines += ["", "## How well a prefix ranks", "",
              "Spearman correlation of the picking head's closed-prefix reward with each judge's final reward, among "
              "the candidates alive at the checkpoint (mean over prompts +- SE):", "",
              "| picking head | checkpoint (tokens) | vs `helpful` final | vs `helpful_prefix` final |", "|---|---|---|---|"]
    for pr in res["prefix"].values():
        lines.append(f"| `{pr['picker']}` | {pr['tokens']} | {pr['spearman_vs_helpful']} +- {pr['se_helpful']} | "
                     f"{pr['spearman_vs_helpful_prefix']} +- {pr['se_helpful_prefix']} |")
    lines += ["", "## The pick: mean final reward (+- SE) under each judge", "",
              "| picking head: policy | judged by `helpful` | judged by `helpful_prefix` | completion tokens / request |",
              "|---|---|---|---|"]
    for name, p in res["policies"].items():
        lines.append(f"| {name} | {p['reward_helpful']:.3f} +- {p['se_helpful']:.3f} | "
                     f"{p['reward_helpful_prefix']:.3f} +- {p['se_helpful_prefix']:.3f} | {p['tokens_mean']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hh", type=int, default=32, help="hh-rlhf test-split prompts after the 16 helpful prompts")
    ap.add_argument("--helpful", type=int, default=16, help="helpful prompts (at most 16)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    run = Run("benchmarks/prefix_heads.py")
    hh_prompts, acc = hh_test(args.hh)
    prompts = [[{"role": "user", "content": p}] for p in HELPFUL_PROMPTS[: args.helpful]] + hh_prompts
    log_path = ROOT / "runs" / "prefix_heads_server.log"
    proc, url = _serve.start_server({"ARBITER_HEADS_DIR": str(ROOT / "heads"), "ARBITER_THREADS": str(args.threads),
                                     "ARBITER_LOG_LEVEL": "info", "ARBITER_MAX_CANDIDATES": str(N),
                                     "ARBITER_REQUEST_TIMEOUT_S": "900"}, log_path)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)
    at = sorted({t for fr, _ in SCHEDULES.values() for t in at_tokens(fr, HELPFUL_MAX_TOKENS)})
    rows = []
    try:
        model = client.models.list().data[0].id
        for i, messages in enumerate(prompts):
            rows.append(record(client, model, messages, 1000 + i, at))
            print(f"{i + 1}/{len(prompts)} {rows[-1]['wall_s']} s", flush=True)
    finally:
        _serve.stop_server(proc)
    dtype_line = next((ln for ln in log_path.read_text().splitlines() if "backbone dtype" in ln), "")
    res = summarise(rows)
    meta = {**run.finish(), **vars(args), "model": model, "server_dtype": dtype_line[-160:],
            "helpful_prompts": args.helpful, "hh_prompts": args.hh, "checkpoints": at}
    REPORT.with_suffix(".json").write_text(json.dumps({"meta": meta, "accuracy": acc, "results": res, "rows": rows}, indent=2) + "\n")
    md = markdown(meta, res, acc)
    REPORT.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
