"""DeepConf's online stop through the API: what it saves, and what it costs in accuracy, at the same N.

Starts `arbiter serve` (embedded SmolLM2-135M, HF engine, dtype auto, no head needed) and sends the held-out
questions of `bestofn_api.py` (sst2: text-disjoint `sst2/dev` rows; mc: the `mc` head's test split) twice, on the
same seeds, with `rerank: {candidates: N, select: deepconf_vote, extractor, return_candidates: true}`:
  full    every candidate decoded to its end (confidence window `--window` tokens);
  online  `confidence.online: {warmup, keep}`: the first `warmup` candidates in full set the threshold, the rest
          stop once the mean confidence of their last full window falls below it (the same candidate sequence:
          candidate i is seeded per index).
Per mode: the accuracy of the server's pick (DeepConf-high vote, bottom-10 % group confidence, keep 0.9), of the
majority vote over the candidates that finished (the server's selection code), completion tokens (usage: every
candidate generated, stopped ones up to where they stopped) and the client's wall time per request; paired
differences (online - full) with standard errors. Requests go one at a time (`--concurrency 1`) so wall times
compare; the machine is shared and noisy, so both modes of a question run back to back.
Part 2, where votes do not apply: the helpfulness prompts of `early_rejection.py` (N=8, 96 tokens, one request per
prompt naming head `helpful`, `select: confidence`), judged as that report judges them: the `helpful` head's reward
of each rule's pick from the same candidates: n=1, the head's own argmax (its judge: the ceiling here), and the argmax
of every confidence score.
Writes benchmarks/reports/confidence_stop.md (and .json). Usage:
    python benchmarks/confidence_stop.py [--questions 60] [--n 8] [--warmup 4] [--window 8] [--tasks sst2 mc]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from arbiter.selection import select
from arbiter.training.stats import accuracy_se, paired_gain

import _serve  # benchmarks/ is on sys.path: the script's own directory
import bestofn_api as B  # the held-out questions and task specs
from _provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--keep", type=float, default=0.9, help="DeepConf's kept share (threshold = the 1 - keep quantile)")
    ap.add_argument("--window", type=int, default=8, help="tokens per confidence window (answers here are short)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", nargs="*", default=["sst2", "mc"])
    ap.add_argument("--helpful", type=int, default=16, help="helpfulness prompts (part 2; 0 skips it)")
    args = ap.parse_args()
    report = ROOT / "benchmarks" / "reports" / "confidence_stop"
    qsets, qinfo = B.tasks(args.questions, args.tasks)
    log_path = ROOT / "runs" / "confidence_stop_server.log"
    proc, url = _serve.start_server({"ARBITER_HEADS_DIR": str(ROOT / "heads"), "ARBITER_THREADS": str(args.threads),
                                     "ARBITER_LOG_LEVEL": "info",
                                     "ARBITER_MAX_CANDIDATES": "16", "ARBITER_REQUEST_TIMEOUT_S": "900"}, log_path)
    dtype_line = next((ln for ln in log_path.read_text().splitlines() if "backbone dtype" in ln), "")
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    results: dict[str, Any] = {}
    t_start = time.monotonic()
    try:
        for task, qs in qsets.items():
            spec = B.TASK_SPEC[task]
            fn = spec.fn()
            ex = {"extractor": spec.extractor, **({"labels": list(spec.labels)} if spec.labels else {})}
            rows = []
            for i, q in enumerate(qs):
                row: dict[str, Any] = {}
                for mode in ("full", "online"):
                    conf: dict[str, Any] = {"window": args.window}
                    if mode == "online":
                        conf["online"] = {"warmup": args.warmup, "keep": args.keep}
                    body = {"model": model, "messages": q["messages"], "temperature": args.temperature, "seed": 1000 + i,
                            "max_tokens": B.MAX_TOKENS[task],
                            "rerank": {"candidates": args.n, "select": "deepconf_vote", **ex, "confidence": conf,
                                       "return_candidates": True}}
                    t0 = time.monotonic()
                    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=900)
                    wall = time.monotonic() - t0
                    r.raise_for_status()
                    out = r.json()
                    info = out["rerank"]
                    cands = info["candidates"]
                    answers = [None if c["finish_reason"] == "pruned" else fn(c["text"]) for c in cands]
                    right = [a is not None and a == q["gold"] for a in answers]
                    live = torch.tensor([[0.0 if c["finish_reason"] != "pruned" else float("-inf")] for c in cands])
                    maj = select(live, "majority_vote", answers).order[0]
                    row[mode] = {"pick": right[info["chosen"][0]], "majority": right[maj], "oracle": any(right),
                                 "tokens": out["usage"]["completion_tokens"], "wall_s": wall,
                                 "stopped": (info.get("confidence") or {}).get("stopped") or 0,
                                 "threshold": (info.get("confidence") or {}).get("threshold")}
                rows.append(row)
            res: dict[str, Any] = {"questions": len(rows)}
            for mode in ("full", "online"):
                m = [r[mode] for r in rows]
                res[mode] = {k: sum(x[k] for x in m) / len(m) for k in ("pick", "majority", "oracle")}
                res[mode].update(pick_se=accuracy_se(res[mode]["pick"], len(m)),
                                 majority_se=accuracy_se(res[mode]["majority"], len(m)),
                                 tokens=sum(x["tokens"] for x in m) / len(m), wall_s=sum(x["wall_s"] for x in m) / len(m),
                                 stopped=sum(x["stopped"] for x in m) / len(m))
            for k in ("pick", "majority"):
                g, se = paired_gain([r["online"][k] for r in rows], [r["full"][k] for r in rows])
                res[f"{k}_diff"] = {"gain": g, "se": se}
            for k in ("tokens", "wall_s"):
                d = [r["online"][k] - r["full"][k] for r in rows]
                mean = sum(d) / len(d)
                sd = (sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)) ** 0.5
                res[f"{k}_diff"] = {"mean": mean, "se": sd / len(d) ** 0.5, "ratio": res["online"][k] / res["full"][k]}
            res["rows"] = rows
            results[task] = res
            print(task, {m: res[m] for m in ("full", "online")}, flush=True)
        if args.helpful:
            results["helpful"] = helpful(url, model, args)
    finally:
        _serve.stop_server(proc)
    meta = {"command": "python " + " ".join(["benchmarks/confidence_stop.py", *sys.argv[1:]]), "commit": git_commit(),
            "n": args.n, "warmup": args.warmup, "keep": args.keep, "window": args.window, "threads": args.threads,
            "server_dtype": dtype_line[-160:], "seconds": round(time.monotonic() - t_start, 1), "cpu": B._cpu(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "questions": qinfo}
    report.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    report.with_suffix(".md").write_text(markdown(meta, results) + "\n")
    print(markdown(meta, results))


def helpful(url: str, model: str, args: Any) -> dict[str, Any]:
    """Part 2 (module docstring): each rule's pick judged by the `helpful` head's reward, from the same candidates."""
    from early_rejection import HELPFUL_MAX_TOKENS, HELPFUL_PROMPTS

    from arbiter.confidence import SCORE_NAMES

    picks: dict[str, list[float]] = {"n=1": [], "helpful head argmax": [], **{f"{s} argmax": [] for s in SCORE_NAMES}}
    for i, prompt in enumerate(HELPFUL_PROMPTS[: args.helpful]):
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": args.temperature,
                "seed": 2000 + i, "max_tokens": HELPFUL_MAX_TOKENS,
                "rerank": {"candidates": args.n, "heads": ["helpful"], "select": "confidence", "return_candidates": True}}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=900)
        r.raise_for_status()
        cands = r.json()["rerank"]["candidates"]
        reward = [c["rewards"]["helpful"] for c in cands]
        picks["n=1"].append(reward[0])
        picks["helpful head argmax"].append(max(reward))
        for sname in SCORE_NAMES:
            best = max(range(len(cands)), key=lambda k: (cands[k]["confidence"][sname], -k))
            picks[f"{sname} argmax"].append(reward[best])
    out: dict[str, Any] = {"prompts": len(picks["n=1"]), "rows": {}}
    base = picks["n=1"]
    for name, v in picks.items():
        m = sum(v) / len(v)
        sd = (sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5
        d = [a - b for a, b in zip(v, base)]
        dm = sum(d) / len(d)
        dsd = (sum((x - dm) ** 2 for x in d) / max(len(d) - 1, 1)) ** 0.5
        out["rows"][name] = {"mean": m, "se": sd / len(v) ** 0.5, "vs_n1": dm, "vs_n1_se": dsd / len(d) ** 0.5}
    print("helpful", {k: round(r["mean"], 3) for k, r in out["rows"].items()}, flush=True)
    return out


def markdown(meta: dict, results: dict) -> str:
    lines = ["# DeepConf's online stop through the API", "",
             f"Command: `{meta['command']}` on commit `{meta['commit']}`, {meta['date']}, {meta['seconds'] / 60:.1f} min, "
             f"{meta['cpu']}; server: HF engine, {meta['threads']} threads, `{meta['server_dtype'][-110:]}`.", "",
             f"Per question, on the same seeds, N={meta['n']} candidates under `select: deepconf_vote` (bottom-10 % group "
             f"confidence, keep 0.9), confidence window {meta['window']} tokens: **full** (every candidate to its end) and "
             f"**online** (`confidence.online: {{warmup: {meta['warmup']}, keep: {meta['keep']}}}`: the warm-up candidates "
             "set the threshold, the others stop once their last window's mean confidence falls below it). Accuracy of "
             "the server's pick and of the majority vote over the candidates that finished, +- SE; tokens = "
             "`usage.completion_tokens` per request; wall = the client's time per request, one request at a time; "
             "differences paired per question (online - full).", "",
             "| task | questions | mode | pick (DeepConf vote) | majority vote | oracle | stopped / request | tokens / request | wall s / request |",
             "|---|---|---|---|---|---|---|---|---|"]
    tasks = {t: r for t, r in results.items() if t != "helpful"}
    for task, r in tasks.items():
        for mode in ("full", "online"):
            m = r[mode]
            lines.append(f"| {task} | {r['questions']} | {mode} | {m['pick']:.3f} +- {m['pick_se']:.3f} | "
                         f"{m['majority']:.3f} +- {m['majority_se']:.3f} | {m['oracle']:.3f} | {m['stopped']:.2f} | "
                         f"{m['tokens']:.1f} | {m['wall_s']:.2f} |")
    lines += ["", "Paired differences, online - full:", ""]
    for task, r in tasks.items():
        lines.append(f"- {task}: pick {r['pick_diff']['gain']:+.3f} +- {r['pick_diff']['se']:.3f}, majority "
                     f"{r['majority_diff']['gain']:+.3f} +- {r['majority_diff']['se']:.3f}; tokens "
                     f"{r['tokens_diff']['mean']:+.1f} +- {r['tokens_diff']['se']:.1f} per request "
                     f"({r['tokens_diff']['ratio']:.0%} of full); wall {r['wall_s_diff']['mean']:+.2f} +- "
                     f"{r['wall_s_diff']['se']:.2f} s ({r['wall_s_diff']['ratio']:.0%} of full).")
    lines += ["", "The online mode runs the warm-up and the rest as two batches one after the other, so on a server "
              "with spare batch rows its latency can exceed the one-batch full mode even when it generates fewer tokens; "
              "the tokens it does not generate are rows freed for other requests (throughput, not latency)."]
    h = results.get("helpful")
    if h:
        lines += ["", f"## Where votes do not apply: {h['prompts']} helpfulness prompts", "",
                  "The `helpful` head's reward of each rule's pick from the same N candidates (one request per prompt: "
                  "`early_rejection.py`'s prompts, 96 tokens); the head's own argmax is the ceiling of this judge, "
                  "not a fair competitor. Mean +- SE; difference against n=1 paired per prompt.", "",
                  "| rule | mean helpful reward of the pick | vs n=1 |", "|---|---|---|"]
        for name, r in h["rows"].items():
            lines.append(f"| {name} | {r['mean']:+.3f} +- {r['se']:.3f} | {r['vs_n1']:+.3f} +- {r['vs_n1_se']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
