"""Multiple choice (and SST-2) questions and the DPH paper's recipe for turning them into pairs."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .io import _data_file, _is_user_file, _iter_jsonl, _open_text
from .records import DataError, DataReport, PreferencePair
from .rows import _RowError

# --------------------------------------------------------------------------------------------------
# Multiple choice (and SST-2) -> pairs
# --------------------------------------------------------------------------------------------------
#
# Lettered tasks show the options in the prompt (as the DPH paper does for ARC / OpenBookQA / CSQA) and each
# option's answer text is "<letter>. <option text>", e.g. "B. enforce": the letter ties the answer to the
# listing and the text keeps it meaningful on its own. SST-2 answers are the bare words "negative"/"positive".
# ``ChoiceQuestion.options`` holds these answer texts exactly, so scoring option i at evaluation scores the
# same text that training used as chosen / rejected.

LETTERS = "ABCDEFGHIJ"
CHOICE_BUILTINS = ("commonsense_qa", "arc_challenge", "openbookqa", "sst2", "sst2/dev")
SST2_LABELS = ("negative", "positive")  # label 0, label 1
_MC_INSTRUCTION = "Answer with the letter and the text of the correct option."
_SST2_INSTRUCTION = 'What is the sentiment of the following sentence? Answer with "negative" or "positive".'


@dataclass
class ChoiceQuestion:
    prompt: list[dict]  # chat messages ending with the user turn that shows the question (and options)
    options: list[str]  # the answer texts, e.g. ["A. ignore", "B. enforce", ...] or ["negative", "positive"]
    answer: int  # index of the correct option
    meta: dict = field(default_factory=dict)


def mc_prompt(question: str, choices: Sequence[str]) -> list[dict]:
    """The user turn for a lettered multiple-choice question."""
    listing = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return [{"role": "user", "content": f"{question}\n\n{listing}\n\n{_MC_INSTRUCTION}"}]


def sst2_prompt(sentence: str) -> list[dict]:
    return [{"role": "user", "content": f"{_SST2_INSTRUCTION}\n\nSentence: {sentence}"}]


def _lettered(question: Any, choices: Any, gold: Any) -> tuple[list[dict], list[str], int, list[str]]:
    if not isinstance(question, str) or not question.strip():
        raise _RowError("missing_field", "empty or missing question")
    if not isinstance(choices, list) or len(choices) < 2:
        raise _RowError("missing_field", f"needs >= 2 choices, got {str(choices)[:60]}")
    if len(choices) > len(LETTERS):
        raise _RowError("unparseable", f"{len(choices)} choices: more than {len(LETTERS)} letters")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise _RowError("empty_answer", f"a choice is empty: {choices}")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise _RowError("unparseable", f"gold index {gold!r} out of range for {len(choices)} choices")
    texts = [c.strip() for c in choices]
    # Exact (case-sensitive) comparison: ARC lists genotypes 'Rr', 'rr' and 'RR' as different options.
    if texts.count(texts[gold]) > 1:  # the correct text is also listed as a wrong option: ambiguous question
        raise _RowError("ambiguous", f"correct option {texts[gold]!r} appears twice in {texts}")
    options = [f"{LETTERS[i]}. {t}" for i, t in enumerate(texts)]
    return mc_prompt(question.strip(), texts), options, gold, texts


def _mc_rows(name: str, report: DataReport) -> Iterator[tuple[int, ChoiceQuestion]]:
    if name == "commonsense_qa":
        for i, row in _iter_jsonl(_data_file("commonsense_qa", "train_rand_split.jsonl.gz"), report):
            report.total += 1
            try:
                q = row.get("question") if isinstance(row, dict) else None
                if not isinstance(q, dict) or not isinstance(q.get("choices"), list):
                    raise _RowError("missing_field", "no question.choices")
                labels = [c.get("label") if isinstance(c, dict) else None for c in q["choices"]]
                key = row.get("answerKey")
                if key not in labels:
                    raise _RowError("missing_field", f"answerKey {key!r} not among labels {labels}")
                choices = [c.get("text") for c in q["choices"]]
                prompt, options, gold, texts = _lettered(q.get("stem"), choices, labels.index(key))
            except _RowError as e:
                report.drop(e.reason, f"row {i}: {e.detail}")
                continue
            yield i, ChoiceQuestion(prompt, options, gold, {"source": name, "row": i, "id": row.get("id"), "choices": texts})
    elif name in ("arc_challenge", "openbookqa"):
        path = _data_file("arc_challenge", "arc_challenge.jsonl") if name == "arc_challenge" else _data_file(
            "openbookqa", "openbook_qa.jsonl"
        )
        for i, row in _iter_jsonl(path, report):
            report.total += 1
            try:
                if not isinstance(row, dict):
                    raise _RowError("unparseable", "row is not an object")
                query = row.get("query")
                if isinstance(query, str) and query.startswith("Question: "):  # Eval Gauntlet prefix (ARC)
                    query = query[len("Question: "):]
                prompt, options, gold, texts = _lettered(query, row.get("choices"), row.get("gold"))
            except _RowError as e:
                report.drop(e.reason, f"row {i}: {e.detail}")
                continue
            yield i, ChoiceQuestion(prompt, options, gold, {"source": name, "row": i, "choices": texts})
    elif name in ("sst2", "sst2/dev"):
        path = _data_file("sst2", "train.tsv.gz" if name == "sst2" else "dev.tsv")
        with _open_text(path) as f:
            header = f.readline().rstrip("\n").split("\t")
            if header[:2] != ["sentence", "label"]:
                raise DataError(f"{path}: expected a 'sentence\\tlabel' header, got {header}")
            for i, line in enumerate(f, start=1):  # row = line number in the file (header is line 0)
                if not line.strip():
                    continue
                report.total += 1
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2 or parts[1].strip() not in ("0", "1"):
                    report.drop("unparseable", f"row {i}: {line}")
                    continue
                sentence = parts[0].strip()
                if not sentence:
                    report.drop("missing_field", f"row {i}: empty sentence")
                    continue
                yield i, ChoiceQuestion(
                    sst2_prompt(sentence), list(SST2_LABELS), int(parts[1]), {"source": name, "row": i, "sentence": sentence}
                )
    elif _is_user_file(name):
        # A user's JSONL: {"question": str, "choices": [str, ...], "answer": index | option text | letter}.
        for i, row in _iter_jsonl(Path(name).expanduser(), report):
            report.total += 1
            try:
                if not isinstance(row, dict):
                    raise _RowError("unparseable", "row is not an object")
                choices = row.get("choices")  # type: ignore[assignment]  # checked by _choice_index
                gold = _choice_index(row.get("answer"), choices)
                prompt, options, gold, texts = _lettered(row.get("question"), choices, gold)
            except _RowError as e:
                report.drop(e.reason, f"row {i}: {e.detail}")
                continue
            yield i, ChoiceQuestion(prompt, options, gold, {"source": name, "row": i, "choices": texts})
    else:
        raise DataError(f"unknown multiple-choice source {name!r}; available: {', '.join(CHOICE_BUILTINS)} "
                        "or a .jsonl file of {\"question\", \"choices\", \"answer\"}")


def _choice_index(answer: Any, choices: Any) -> int:
    """The gold index from an index, the option's exact text, or its letter (A, B, ...)."""
    if isinstance(answer, bool):
        raise _RowError("unparseable", f"answer {answer!r} is not an index, option text or letter")
    if isinstance(answer, int):
        return answer
    if isinstance(answer, str) and isinstance(choices, list):
        texts = [c.strip() if isinstance(c, str) else c for c in choices]
        if answer.strip() in texts:
            return texts.index(answer.strip())
        letter = answer.strip().rstrip(".").upper()
        if len(letter) == 1 and letter in LETTERS[: len(choices)]:
            return LETTERS.index(letter)
    raise _RowError("unparseable" if answer is not None else "missing_field",
                    f"answer {str(answer)[:40]!r} is not an index, one of the option texts, or an option letter")


def load_choices(source: str, *, limit: int | None = None, seed: int = 0) -> tuple[list[ChoiceQuestion], DataReport]:
    """Multiple-choice questions of a builtin source (commonsense_qa, arc_challenge, openbookqa, sst2, sst2/dev).

    Same ordering / limit / accounting rules as ``load_pairs``. Questions whose correct option text is
    listed twice are dropped as ``ambiguous``.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    report = DataReport(source)
    questions = []
    for _, q in _mc_rows(source, report):
        questions.append(q)
        report.kept += 1
    return report.take(questions, seed=seed, limit=limit), report


def choices_to_pairs(questions: Sequence[ChoiceQuestion], *, seed: int) -> list[PreferencePair]:
    """One pair per question: chosen = the correct option, rejected = a wrong option drawn uniformly.

    Each question's draw uses its own RNG seeded by (seed, source, row), so a question's pair does not depend
    on which other questions are in the list or their order. Wrong options with the same text as the correct
    one are never drawn.
    """
    pairs = []
    for n, q in enumerate(questions):
        if not 0 <= q.answer < len(q.options):
            raise DataError(f"question {n} ({q.meta}): answer index {q.answer} out of range")
        texts = q.meta.get("choices", q.options)
        gold_text = str(texts[q.answer]).strip()
        wrong = [j for j in range(len(q.options)) if j != q.answer and str(texts[j]).strip() != gold_text]
        if not wrong:
            raise DataError(f"question {n} ({q.meta.get('source')} row {q.meta.get('row')}) has no wrong option")
        rng = random.Random(f"{seed}:{q.meta.get('source')}:{q.meta.get('row', n)}")
        j = rng.choice(wrong)
        meta = {**q.meta, "answer_index": q.answer, "rejected_index": j}
        meta.pop("choices", None)
        meta.pop("sentence", None)
        pairs.append(PreferencePair(list(q.prompt), q.options[q.answer], q.options[j], meta))
    return pairs
