"""Verifiable math problems, answer extraction and pairs from the model's own samples."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

# canonical_number / extract_final_answer live in arbiter.answers (the server's vote extractors use them too).
from arbiter.answers import canonical_number, extract_final_answer

from .io import _data_file, _is_user_file, _iter_jsonl
from .records import DataError, DataReport, PreferencePair

# --------------------------------------------------------------------------------------------------
# Math: verifiable problems, answer extraction, pairs from the model's own samples
# --------------------------------------------------------------------------------------------------

MATH_BUILTINS = ("gsm8k", "svamp")
_MATH_INSTRUCTION = 'Solve the problem step by step. End with a last line of the form "The answer is N".'


@dataclass
class MathProblem:
    question: str
    answer: str  # canonical number string (see canonical_number)
    meta: dict = field(default_factory=dict)




def is_correct(text: str, problem: MathProblem) -> bool:
    from decimal import Decimal

    got = extract_final_answer(text)
    return got is not None and Decimal(got) == Decimal(problem.answer)


def math_prompt(problem: MathProblem) -> list[dict]:
    """The chat prompt used for sampling (and as the prompt of the resulting pairs)."""
    return [{"role": "user", "content": f"{problem.question.strip()}\n\n{_MATH_INSTRUCTION}"}]


def _math_rows(name: str, report: DataReport) -> Iterator[MathProblem]:
    if name == "gsm8k":
        for i, row in _iter_jsonl(_data_file("gsm8k", "train.jsonl.gz"), report):
            report.total += 1
            q = row.get("question") if isinstance(row, dict) else None
            sol = row.get("answer") if isinstance(row, dict) else None
            if not isinstance(q, str) or not q.strip() or not isinstance(sol, str):
                report.drop("missing_field", f"row {i}: no question/answer")
                continue
            m = re.search(r"####\s*(.+?)\s*$", sol)
            ans = canonical_number(m.group(1)) if m else None
            if ans is None:
                report.drop("unparseable", f"row {i}: no '#### <number>' in the solution: {sol[-80:]}")
                continue
            yield MathProblem(q.strip(), ans, {"source": name, "row": i, "solution": sol})
    elif name == "svamp":
        with open(_data_file("svamp", "SVAMP.json"), encoding="utf-8") as f:
            rows = json.load(f)
        for i, row in enumerate(rows):
            report.total += 1
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("Body", "Question")):
                report.drop("missing_field", f"row {i}: no Body/Question")
                continue
            ans = canonical_number(row.get("Answer"))
            if ans is None:
                report.drop("unparseable", f"row {i}: Answer {row.get('Answer')!r} is not a number")
                continue
            q = f"{row['Body'].strip()} {row['Question'].strip()}".strip()
            meta = {"source": name, "row": i, "id": row.get("ID"), "equation": row.get("Equation"), "type": row.get("Type")}
            yield MathProblem(q, ans, meta)
    elif _is_user_file(name):
        # A user's JSONL: {"question": str, "answer": number (or a string holding one)}.
        for i, row in _iter_jsonl(Path(name).expanduser(), report):
            report.total += 1
            q = row.get("question") if isinstance(row, dict) else None
            if not isinstance(q, str) or not q.strip():
                report.drop("missing_field", f"row {i}: no question")
                continue
            ans = canonical_number(row.get("answer"))
            if ans is None:
                report.drop("unparseable", f"row {i}: answer {str(row.get('answer'))[:40]!r} is not a number")
                continue
            yield MathProblem(q.strip(), ans, {"source": name, "row": i})
    else:
        raise DataError(f"unknown math source {name!r}; available: {', '.join(MATH_BUILTINS)} "
                        "or a .jsonl file of {\"question\", \"answer\"}")


def load_math(source: str, *, limit: int | None = None, seed: int = 0) -> tuple[list[MathProblem], DataReport]:
    """Math problems of a builtin source ("gsm8k" train, "svamp"); same ordering / limit rules as load_pairs."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    report = DataReport(source)
    problems = []
    for p in _math_rows(source, report):
        problems.append(p)
        report.kept += 1
    return report.take(problems, seed=seed, limit=limit), report


def sample_math_pairs(
    backbone: Any,
    problems: Sequence[MathProblem],
    *,
    k: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[list[PreferencePair], DataReport]:
    """Sample k answers per problem from the backbone and pair a correct one with an incorrect one.

    Sampling is the server's (``arbiter.training.sampling.sample``: the HF engine, temperature, top_p 1): problem j
    is sampled like a request with ``seed + j``. The pairing rules are :func:`pair_math_samples`.
    """
    from arbiter.chat import prompt_ids
    from arbiter.generation.base import SamplingParams
    from arbiter.training.sampling import sample

    if k < 2:
        raise ValueError(f"k must be >= 2 to get both a correct and an incorrect sample, got {k}")
    if max_new_tokens < 1 or temperature <= 0 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1 and temperature > 0")
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=1.0)
    results = sample(backbone, [prompt_ids(backbone.tokenizer, math_prompt(p)) for p in problems], n=k, params=params,
                     seeds=[seed + j for j in range(len(problems))], batch_prompts=batch_size, progress=progress,
                     desc="sampling math answers")
    samples = [[(c.text.strip(), c.finish_reason == "stop") for c in r.candidates] for r in results]
    sampler = {"k": k, "temperature": temperature, "top_p": 1.0, "max_new_tokens": max_new_tokens, "seed": seed,
               "engine": "hf"}
    return pair_math_samples(problems, samples, seed=seed, sampler=sampler)


def pair_math_samples(
    problems: Sequence[MathProblem],
    samples: Sequence[Sequence[tuple[str, bool]]],
    *,
    seed: int,
    sampler: dict[str, Any] | None = None,
) -> tuple[list[PreferencePair], DataReport]:
    """Pairs from sampled answers: ``samples[j]`` = (text, finished) of problem j's samples.

    A sample is correct if it finished (ended with <|im_end|> within the token budget) and its extracted final
    answer equals the problem's. Every other non-empty sample is incorrect (an unfinished sample is incorrect: it
    gave no answer in the budget; ``meta["rejected_finished"]`` tells them apart). For each problem with at least
    one correct and one incorrect sample, chosen and rejected are drawn uniformly among each (seeded per problem).
    Report: total = problems, kept = pairs, dropped "no_correct" / "no_incorrect"; stats count samples, correct,
    unfinished and empty ones. Never raises on zero pairs.
    """
    if len(samples) != len(problems):
        raise ValueError(f"{len(samples)} sample groups for {len(problems)} problems")
    report = DataReport("math-samples")
    report.stats.update(samples=0, correct=0, unfinished=0, empty=0)
    pairs: list[PreferencePair] = []
    for j, (problem, group) in enumerate(zip(problems, samples)):
        texts = [t for t, _ in group]
        finished = [f for _, f in group]
        n = len(group)
        correct = [f and is_correct(t, problem) for t, f in zip(texts, finished)]
        report.total += 1
        report.stats["samples"] += n
        report.stats["correct"] += sum(correct)
        report.stats["unfinished"] += finished.count(False)
        report.stats["empty"] += sum(1 for t in texts if not t)
        good = [i for i in range(n) if correct[i] and texts[i]]
        bad = [i for i in range(n) if not correct[i] and texts[i]]
        where = f"{problem.meta.get('source', '?')} row {problem.meta.get('row', '?')}"
        answers = [extract_final_answer(t) for t in texts]
        if not good:
            report.drop("no_correct", f"{where}: gold {problem.answer}, sampled {answers}")
            continue
        if not bad:
            report.drop("no_incorrect", f"{where}: all {len(good)} non-empty samples correct ({problem.answer})")
            continue
        rng = random.Random(f"{seed}:{problem.meta.get('source')}:{problem.meta.get('row', j)}")
        c, r = rng.choice(good), rng.choice(bad)
        meta = {
            "source": problem.meta.get("source"),
            "row": problem.meta.get("row"),
            "gold": problem.answer,
            "chosen_answer": answers[c],
            "rejected_answer": answers[r],
            "rejected_finished": finished[r],
            "n_correct": len(good),
            "sampler": sampler or {},
        }
        pairs.append(PreferencePair(math_prompt(problem), texts[c], texts[r], meta))
        report.kept += 1
    return pairs, report
