"""Best-of-N through the API: does rerank return better answers than plain sampling?

Starts `arbiter serve` (embedded SmolLM2-135M, the committed heads, dtype auto) and sends held-aside questions
through `/v1/chat/completions` with the official `openai` client. Per question, on the same seeds:
  greedy       temperature 0, n=1;
  rerank N     one request with `rerank: {candidates: N, heads: [<task head>], return_candidates: true}`
               at temperature T: the server's pick is "rerank"; from the same N returned candidates (same
               seed) also "n=1" (candidate 0, i.e. plain sampling), "weighted vote" (the server's weighted_vote policy
               over the same rewards), "majority vote" over the extracted
               answers, and "oracle pass@N" (any candidate right).
Tasks (questions the task head never trained on):
  sst2   the shared SST-2 dev split (disjoint from the train split the `sst2` head used); answer = label word;
  mc     ARC-Challenge and OpenBookQA questions of the `mc` head's test split (the recipe's own split, reproduced);
         answer = the option letter;
  svamp  the first 100 SVAMP problems of the seeded order (the `math` head's pairs come from problems after them);
  gsm8k  the first 100 GSM8K train problems of the seeded order (never sampled for the `math` head);
         answer = the final number (``extract_final_answer``), head `math`.
Writes benchmarks/reports/bestofn_api.md (and .json). Usage:
    python benchmarks/bestofn_api.py [--questions 100] [--n 8] [--temperature 1.0] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _serve  # noqa: E402
import torch  # noqa: E402
from _provenance import git_commit  # noqa: E402

from arbiter.answers import extract_choice_letter  # noqa: E402
from arbiter.service.rerank import AdaptiveRule, select, settled  # noqa: E402
from arbiter.training.data import (  # noqa: E402
    LETTERS,
    SST2_LABELS,
    extract_final_answer,
    load_choices,
    load_math,
    math_prompt,  # noqa: E402
)

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "reports" / "bestofn_api"


def extract_label(text: str) -> str | None:
    """The first SST-2 label word in the answer (None if neither appears)."""
    hits = [(m.start(), m.group(0).lower()) for m in re.finditer(r"\b(positive|negative)\b", text, re.I)]
    return min(hits)[1] if hits else None


def extract_letter(text: str, k: int) -> str | None:
    """The option letter the answer gives (the server's choice_letter extractor)."""
    return extract_choice_letter(text, k)


ADAPTIVE = AdaptiveRule(round=2, margin=1.0, supermajority=0.75)  # the server's defaults
MATH_HELD = 100  # the first problems of each math source's seeded order (sampled_pairs.py never samples them)
TASK_HEAD = {"sst2": "sst2", "mc": "mc", "svamp": "math", "gsm8k": "math"}
MAX_TOKENS = {"sst2": 16, "mc": 24, "svamp": 200, "gsm8k": 200}


def mc_test_questions() -> list:
    """ARC-Challenge and OpenBookQA questions in the `mc` head's TEST split, reproduced with the recipe's own
    split over the same config (head_mc), so none was trained on or used to pick the variant."""
    import random

    from transformers import AutoTokenizer

    from arbiter.backbone import end_of_turn, materialize, prompt_ids, resolve_model
    from arbiter.training.config import load_config
    from arbiter.training.data.splits import load_tokenized, split_indices
    from arbiter.training.recipes.head import HeadRecipeConfig

    cfg = load_config(HeadRecipeConfig, ROOT / "arbiter" / "training" / "configs" / "head_mc.yaml")
    tok = AutoTokenizer.from_pretrained(str(materialize(resolve_model(None))))
    _, end = end_of_turn(tok)
    tokd, _ = load_tokenized(cfg, tok, end)
    test = {tuple(tokd[i].prompt_ids) for i in split_indices(tokd, cfg)["test"]}
    out = []
    for src in ("arc_challenge", "openbookqa"):
        qs, _ = load_choices(src, seed=0)
        out += [q for q in qs if tuple(prompt_ids(tok, q.prompt)) in test]
    random.Random(0).shuffle(out)
    return out


def tasks(n_questions: int, n_mc: int | None = None, n_math: int | None = None,
          only: list[str] | None = None) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    want = lambda t: not only or t in only  # noqa: E731
    if want("sst2"):
        sst, _ = load_choices("sst2/dev", limit=n_questions, seed=0)
        out["sst2"] = [{"messages": q.prompt, "gold": SST2_LABELS[q.answer], "k": 2} for q in sst]
    if want("mc"):
        held = mc_test_questions()[: n_questions if n_mc is None else n_mc]
        out["mc"] = [{"messages": q.prompt, "gold": LETTERS[q.answer], "k": len(q.options)} for q in held]
    for src in ("svamp", "gsm8k"):
        if want(src):
            probs, _ = load_math(src, seed=0)
            held = probs[: min(MATH_HELD, n_questions if n_math is None else n_math)]
            out[src] = [{"messages": math_prompt(p), "gold": p.answer, "k": 0} for p in held]
    return out


def start_server(threads: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    return _serve.start_server({"ARBITER_HEADS_DIR": str(ROOT / "heads"), "ARBITER_THREADS": str(threads),
                                "ARBITER_LOG_LEVEL": "info", "ARBITER_MAX_CANDIDATES": "16",
                                "ARBITER_REQUEST_TIMEOUT_S": "600"}, log_path)


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", nargs="*", default=None, help="only these tasks (default: all)")
    ap.add_argument("--mc-questions", type=int, default=None, help="mc questions (default: --questions)")
    ap.add_argument("--math-questions", type=int, default=None, help="questions per math task (default: --questions)")
    ap.add_argument("--report", default="bestofn_api", help="report name under benchmarks/reports/")
    ap.add_argument("--concurrency", type=int, default=1, help="questions in flight at once")
    args = ap.parse_args()
    global REPORT
    REPORT = REPORT.parent / args.report
    commit = git_commit()
    log_path = ROOT / "runs" / f"{args.report}_server.log"  # runs/ is not committed
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(args.threads, log_path)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    dtype_line = next((ln for ln in log_path.read_text().splitlines() if "backbone dtype" in ln), "")
    max_tokens = MAX_TOKENS
    loaded = sorted(h["id"] for h in httpx.get(f"{url}/v1/heads").json()["data"])
    results, t_start = {}, time.monotonic()
    try:
        for task, qs in tasks(args.questions, args.mc_questions, args.math_questions, args.tasks).items():
            # Every committed head for this task scores the same candidates (the first one is the server's pick);
            # each head's pick is the argmax of its rewards, ties to the lower index, as the server picks.
            head = TASK_HEAD[task]
            if head not in loaded:
                print(f"skipping {task}: head {head!r} is not committed", flush=True)
                continue
            heads = [head] + [h for h in loaded if h.startswith(head + "_")]
            def ask(i: int, q: dict, head: str = head, heads: list = heads, task: str = task) -> dict:
                if task == "sst2":
                    ex = extract_label
                elif task == "mc":
                    ex = lambda t, k=q["k"]: extract_letter(t, k)  # noqa: E731
                else:
                    ex = extract_final_answer
                g = client.chat.completions.create(model=model, messages=q["messages"], temperature=0,
                                                   max_tokens=max_tokens[task])
                r = client.chat.completions.create(
                    model=model, messages=q["messages"], temperature=args.temperature, seed=1000 + i,
                    max_tokens=max_tokens[task],
                    extra_body={"rerank": {"candidates": args.n, "heads": heads, "return_candidates": True}})
                cand_rows = r.model_extra["rerank"]["candidates"]
                cands = [c["text"] for c in cand_rows]
                answers = [ex(t) for t in cands]
                picks = {h: max(range(len(cand_rows)), key=lambda j: (cand_rows[j]["rewards"][h], -j)) for h in heads}
                votes = Counter(a for a in answers if a is not None)
                majority = max(votes, key=lambda a: (votes[a], -answers.index(a))) if votes else None
                # The server's weighted_vote policy (rerank.select) over the same candidates and task-head rewards.
                wv = select(torch.tensor([[c["rewards"][head]] for c in cand_rows]), "weighted_vote", answers)
                weighted = answers[wv.order[0]]
                # Adaptive N replayed on the same candidates with the server's stopping rule (rerank.settled):
                # candidate i is seeded per index, so a server running rounds of 2 samples exactly this prefix.
                rew = torch.tensor([[c["rewards"][head]] for c in cand_rows])
                adaptive = {}
                for name, policy in (("adaptive_argmax", "argmax"), ("adaptive_majority", "majority_vote")):
                    k = 2
                    while k < len(cand_rows) and not settled(rew[:k], policy, answers[:k], ADAPTIVE):
                        k += 2
                    k = min(k, len(cand_rows))
                    sel = select(rew[:k], policy, answers[:k])
                    adaptive[name] = (answers[sel.order[0]] == q["gold"], k,
                                      sum(c["completion_tokens"] for c in cand_rows[:k]))
                return {
                    "gold": q["gold"],
                    "greedy": ex(g.choices[0].message.content) == q["gold"],
                    "n1": answers[0] == q["gold"],
                    "rerank": ex(r.choices[0].message.content) == q["gold"],
                    **{f"rerank:{h}": answers[picks[h]] == q["gold"] for h in heads},
                    "majority": majority == q["gold"],
                    "weighted": weighted == q["gold"],
                    **{name: v[0] for name, v in adaptive.items()},
                    **{f"{name}_k": v[1] for name, v in adaptive.items()},
                    **{f"{name}_tokens": v[2] for name, v in adaptive.items()},
                    "tokens": sum(c["completion_tokens"] for c in cand_rows),
                    "answers": answers, "rewards": [c["rewards"][head] for c in cand_rows],
                    "oracle": any(a == q["gold"] for a in answers),
                    "answered": sum(a is not None for a in answers) / len(answers),
                }

            # Questions go in parallel (--concurrency): the server batches them; each question's seed is its own.
            with ThreadPoolExecutor(args.concurrency) as pool:
                rows = list(pool.map(ask, range(len(qs)), qs))
            print(task, len(rows), {k: round(sum(x[k] for x in rows) / len(rows), 3)
                                    for k in ("greedy", "n1", "rerank", "weighted", "majority", "oracle")}, flush=True)
            n = len(rows)
            keys = ("greedy", "n1", "rerank", "weighted", "majority", "oracle", *(f"rerank:{h}" for h in heads))
            results[task] = {k: {"acc": sum(x[k] for x in rows) / n, "se": se(sum(x[k] for x in rows) / n, n)} for k in keys}
            results[task]["heads"] = heads
            results[task]["questions"] = n
            results[task]["answered_rate"] = sum(x["answered"] for x in rows) / n
            # Paired comparison rerank vs n=1 on the same questions and candidates.
            for name in ("adaptive_argmax", "adaptive_majority"):
                results[task][name] = {"acc": sum(x[name] for x in rows) / n, "se": se(sum(x[name] for x in rows) / n, n),
                                       "mean_candidates": sum(x[f"{name}_k"] for x in rows) / n,
                                       "tokens": sum(x[f"{name}_tokens"] for x in rows)}
            results[task]["tokens_fixed_n"] = sum(x["tokens"] for x in rows)
            results[task]["rows"] = rows  # per question: gold, answers and rewards of the N candidates, outcomes
            results[task]["rerank_wins"] = sum(x["rerank"] and not x["n1"] for x in rows)
            results[task]["rerank_losses"] = sum(x["n1"] and not x["rerank"] for x in rows)
    finally:
        proc.terminate()
        proc.wait(60)
    seconds = time.monotonic() - t_start
    meta = {"command": "python " + " ".join(["benchmarks/bestofn_api.py", *sys.argv[1:]]), "commit": commit,
            "n": args.n, "temperature": args.temperature, "threads": args.threads, "model": model,
            "server_dtype": dtype_line[-200:], "seconds": round(seconds, 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    REPORT.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    cols = [("greedy", "greedy"), ("n1", "n=1 sample"), ("rerank", f"**rerank N={args.n}** (argmax)"),
            ("weighted", "weighted vote (head)"), ("majority", f"majority vote of {args.n}"),
            ("oracle", f"oracle pass@{args.n}")]
    lines = ["# Best-of-N through the API: rerank vs plain sampling", "",
             f"Command: `{meta['command']}` on commit `{commit}`, {meta['date']}, {seconds / 60:.1f} min; `arbiter serve` on "
             f"{model} with the committed heads, {args.threads} threads; server log: `{dtype_line[-160:]}`.", "",
             f"Per question: one greedy request, and one rerank request (N={args.n}, temperature {args.temperature}, "
             "seed fixed per question, `return_candidates`) from which n=1 (candidate 0), weighted vote, majority vote and oracle "
             "are read, so every column but greedy sees the same candidates. Accuracy +- standard error.", "",
             "| task | questions | " + " | ".join(c for _, c in cols) + " | rerank wins / losses vs n=1 | answer extracted |",
             "|---|---|" + "---|" * len(cols) + "---|---|"]
    for task, r in results.items():
        lines.append(f"| {task} (head `{r['heads'][0]}`) | {r['questions']} | "
                     + " | ".join(f"{r[k]['acc']:.3f} +- {r[k]['se']:.3f}" for k, _ in cols)
                     + f" | {r['rerank_wins']} / {r['rerank_losses']} | {r['answered_rate']:.2f} |")
    lines += ["", f"Adaptive N (rounds of 2 up to {args.n}; replayed on the same candidates with the server's stopping "
              f"rule `rerank.settled`: argmax stops when the best reward beats the runner-up by > {ADAPTIVE.margin}, "
              f"majority vote when one answer holds >= {ADAPTIVE.supermajority} of the answered votes):", "",
              f"| task | fixed N={args.n}: argmax / majority | adaptive argmax (mean N, tokens vs fixed) | "
              "adaptive majority (mean N, tokens vs fixed) |", "|---|---|---|---|"]
    for task, r in results.items():
        tf = r["tokens_fixed_n"]
        cells = [f"{r[k]['acc']:.3f} +- {r[k]['se']:.3f} (N {r[k]['mean_candidates']:.1f}, {r[k]['tokens'] / tf:.0%} of tokens)"
                 for k in ("adaptive_argmax", "adaptive_majority")]
        lines.append(f"| {task} | {r['rerank']['acc']:.3f} / {r['majority']['acc']:.3f} | " + " | ".join(cells) + " |")
    extra = [(t, h, r[f"rerank:{h}"]) for t, r in results.items() for h in r["heads"][1:]]
    if extra:
        lines += ["", "Other heads of the same task, picking among the same candidates:", "",
                  "| task | head | rerank accuracy |", "|---|---|---|"]
        lines += [f"| {t} | `{h}` | {v['acc']:.3f} +- {v['se']:.3f} |" for t, h, v in extra]
    lines += ["", "Tasks: sst2 = the shared SST-2 dev split (never trained on), head `sst2`; mc = ARC-Challenge + "
              "OpenBookQA questions of the `mc` head's test split (never trained on nor used for selection), head `mc`; "
              f"svamp / gsm8k = the first {MATH_HELD} problems of each source's seeded order (the `math` head's pairs were "
              "sampled from SVAMP problems after them), head `math`, answer = the final number."]
    REPORT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
