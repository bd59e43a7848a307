"""Preference pairs from the model's OWN answers, labelled by a verifier, for heads that rerank free-form output.

A head trained on canonical answers (the `sst2` head: "positive" vs "negative") scores the model's free-form
samples ("The sentiment of the sentence is negative.") poorly: benchmarks/reports/bestofn_api.md shows rerank
below plain sampling with it. This script samples what the server samples (the service's own HF engine and
sampler, same chat encoding, same max_tokens cut) and keeps, per question with at least one right and one wrong
sample, a pair (a right sample, a wrong or unanswered one), drawn per question with a seeded RNG. It writes a
TRL-format JSONL (`prompt` messages, `chosen`, `rejected`) that `arbiter train head` reads unchanged:

    python benchmarks/sampled_pairs.py --task sst2 --questions 1200 --out runs/sst2_sampled.jsonl
    arbiter train head --config head_sst2 data=[runs/sst2_sampled.jsonl] limit=null name=sst2_sampled \\
        head_dir=heads/sst2_sampled out=runs/sst2_sampled progress=false
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bestofn_api import extract_label, extract_letter  # noqa: E402

from arbiter.backbone import load_backbone, prompt_ids  # noqa: E402
from arbiter.service.engine.base import GenerationJob, SamplingParams  # noqa: E402
from arbiter.service.engine.hf import HFEngine  # noqa: E402
from arbiter.training.data import (  # noqa: E402
    LETTERS,
    SST2_LABELS,
    extract_final_answer,
    load_choices,
    load_math,
    math_prompt,
)

MATH_HELD = 100  # the first problems of each math source's seeded order are the benchmark's (bestofn_api.py)


class _Q:
    def __init__(self, prompt: list[dict]) -> None:
        self.prompt = prompt


def _letter(text: str, k: int) -> str | None:
    return extract_letter(text, k)


def _math_answer(text: str) -> str | None:
    return extract_final_answer(text)  # canonical number string, as MathProblem.answer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["sst2", "mc", "svamp", "gsm8k"], default="sst2")
    ap.add_argument("--questions", type=int, default=1000)
    ap.add_argument("--k", type=int, default=8, help="samples per question")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=4, help="questions per generation batch (x k rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=25, help="progress line and partial output every this many batches")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.task == "sst2":  # train split only: the benchmark's questions come from the dev split
        qs, _ = load_choices("sst2", limit=args.questions, seed=args.seed)
        gold = [SST2_LABELS[q.answer] for q in qs]
        extract = [extract_label] * len(qs)
    elif args.task == "mc":  # the first 3000 CommonsenseQA questions of the seeded order (the benchmark uses those after them)
        qs, _ = load_choices("commonsense_qa", limit=min(args.questions, 3000), seed=0)
        gold = [LETTERS[q.answer] for q in qs]
        extract = [functools.partial(_letter, k=len(q.options)) for q in qs]
    else:  # math: problems after the first MATH_HELD of the seeded order; right = the final number is the gold one
        problems, _ = load_math(args.task, seed=0)
        problems = problems[MATH_HELD : MATH_HELD + args.questions]
        qs = [_Q(math_prompt(p)) for p in problems]
        gold = [p.answer for p in problems]
        extract = [_math_answer] * len(qs)
    math_task = args.task in ("svamp", "gsm8k")
    bb = load_backbone(dtype="auto")
    engine = HFEngine(bb)
    rows, stats = [], {"questions": len(qs), "samples": 0, "right": 0, "unanswered": 0, "pairs": 0}
    t0 = time.monotonic()
    for b0 in range(0, len(qs), args.batch):
        chunk = range(b0, min(b0 + args.batch, len(qs)))
        jobs = [GenerationJob(prompt_ids(bb.tokenizer, qs[i].prompt), args.k,
                              SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                             seed=args.seed * 1_000_003 + i)) for i in chunk]
        for i, res in zip(chunk, engine.generate(jobs)):
            texts = [c.text for c in res.candidates]
            # An answer cut by max_tokens gave no answer (its last number is a partial step, not a final one).
            answers = [extract[i](c.text) if c.finish_reason == "stop" or not math_task else None
                       for c in res.candidates]
            right = [t for t, a in zip(texts, answers) if a == gold[i] and t.strip()]
            wrong = [t for t, a in zip(texts, answers) if a != gold[i] and t.strip()]
            stats["samples"] += len(texts)
            stats["right"] += sum(a == gold[i] for a in answers)
            stats["unanswered"] += sum(a is None for a in answers)
            if right and wrong:
                rng = random.Random(f"{args.seed}:{i}")
                rows.append({"prompt": qs[i].prompt, "chosen": rng.choice(right), "rejected": rng.choice(wrong),
                             "meta": {"question": i, "gold": gold[i]}})
        done = chunk.stop
        if done % (args.batch * args.every) == 0 or done == len(qs):
            print(f"{done}/{len(qs)} questions, {len(rows)} pairs, {time.monotonic() - t0:.0f} s", flush=True)
            stats["pairs"], stats["seconds"], stats["questions_done"] = len(rows), round(time.monotonic() - t0, 1), done
            _write(Path(args.out), rows, {**stats, **vars(args)})  # a partial file survives an interrupted run
    print(json.dumps(stats))


def _write(out: Path, rows: list[dict], stats: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(out)
    (out.parent / (out.stem + ".stats.json")).write_text(json.dumps(stats, indent=2) + "\n")


if __name__ == "__main__":
    main()
