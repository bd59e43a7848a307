"""Verifier heads from the model's own samples (docs/methods.md "Verifier heads"; Cobbe et al. 2021).

The library half of ``arbiter train verifier``: questions with gold answers, a resumable on-disk cache of the
candidates the serving sampler draws for them (with the serving features at the closing token), labelling by
an answer extractor, pairing right vs wrong candidates of one question, a split by question text, and the
best-of-N evaluation of a head under the server's own selection code (``arbiter.selection.select``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from arbiter.answers import canonical_number, extractor, options_of, render_canonical

from .data import CHOICE_BUILTINS, LETTERS, MATH_BUILTINS, SST2_LABELS, DataError, DataReport, load_choices, load_math
from .data.io import _iter_jsonl
from .data.math import math_prompt
from .stats import accuracy_se

if TYPE_CHECKING:
    import torch

log = logging.getLogger("arbiter.training.verifier")

VERIFIER_BUILTINS = tuple(s for s in CHOICE_BUILTINS if s != "sst2/dev") + MATH_BUILTINS


@dataclass(frozen=True)
class AnswerSpec:
    """How an answer is read from a candidate (an ``arbiter.answers`` extractor) and compared with the gold one.
    The server's vote policies read answers with the same spec (it becomes the head's selection rule)."""

    extractor: str
    pattern: str | None = None
    field: str | None = None
    labels: tuple[str, ...] | None = None
    # last_number: a candidate cut off by max_tokens gave no answer (its last number is a partial step).
    finished_only: bool = False
    # How an answer is rendered for answer-level verification (``arbiter.answers.render_canonical``): {answer};
    # {option}, the listed text of an option letter (choice_letter). None: no answer-level pairs.
    template: str | None = None

    def fn(self) -> Callable[[str], str | None]:
        return extractor(self.extractor, pattern=self.pattern, field=self.field,
                         labels=list(self.labels) if self.labels else None)

    def rule(self, select: str, weights: Any = None, free: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``selection`` entry of a head config (``arbiter.heads.SelectionRule``) for policy ``select``
        (verify: with this spec's canonical template and the fitted ``weights``, a ``selection.VerifyWeights``; a
        training-free policy: with ``free``'s score and kept share)."""
        out: dict[str, Any] = {"select": select, **{k: v for k, v in (free or {}).items() if v is not None}}
        if select not in ("argmax", "confidence"):
            out.update({"extractor": self.extractor, "pattern": self.pattern, "field": self.field,
                        "labels": list(self.labels) if self.labels else None})
        if select == "verify":
            out.update({"canonical": self.template, "vote_weight": weights.vote if weights else 0.0,
                        "text_weight": weights.text if weights else 0.0})
        return {k: v for k, v in out.items() if v is not None}

    def render(self, question: "Question", answer: str) -> str | None:
        """``answer`` (canonical, as ``fn`` returns it) rendered for answer-level verification, or None."""
        if self.template is None:
            return None
        return render_canonical(self.template, answer, question_options(question))

    def canonical(self, answer: Any) -> str | None:
        """A gold answer in the extractor's canonical form (what ``fn`` returns for a right candidate)."""
        if answer is None:
            return None
        if self.extractor == "last_number":
            return canonical_number(answer)
        if self.extractor == "label_words" and self.labels:
            low = {x.lower(): x for x in self.labels}
            return low.get(str(answer).strip().lower())
        if self.extractor == "choice_letter":
            return str(answer).strip().rstrip(".").upper() or None
        return str(answer).strip() or None


SST2_SPEC = AnswerSpec("label_words", labels=SST2_LABELS, template="{answer}")
CHOICE_SPEC = AnswerSpec("choice_letter", template="{answer}. {option}")
MATH_SPEC = AnswerSpec("last_number", finished_only=True, template="{answer}")
# The canonical form a user file's extractor gets unless the config names one (choice_letter: the letter and the
# option's text, from the row's "choices" or the lettered lines of its question).
DEFAULT_CANONICAL = {"choice_letter": "{answer}. {option}"}


def question_options(q: "Question") -> list[str] | None:
    """The options' texts of a lettered question (A first): its row's (``meta["options"]``), else the lettered
    lines of its last user turn; None when it lists none."""
    return options_of(q.messages, q.meta.get("options")) or None


def default_spec(source: str) -> AnswerSpec | None:
    """The builtin sources' answer spec (None for a user file: the config names its extractor)."""
    if source == "sst2":
        return SST2_SPEC
    if source in CHOICE_BUILTINS:
        return CHOICE_SPEC
    if source in MATH_BUILTINS:
        return MATH_SPEC
    return None


def question_key(messages: Sequence[dict]) -> str:
    """The text a question is known by for splitting and de-duplication: its user turns, lower-cased, with
    whitespace collapsed (two rows with the same text are one question)."""
    text = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")
    return re.sub(r"\s+", " ", text).strip().lower()


def normalise_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


@dataclass
class Question:
    messages: list[dict]
    gold: str  # canonical gold answer (AnswerSpec.canonical)
    source: str
    row: int
    key: str  # question_key(messages)
    text: str  # the question's own text (the SST-2 sentence, the MC stem, the problem) for overlap checks
    meta: dict = field(default_factory=dict)


def _user_questions(path: str, spec: AnswerSpec, report: DataReport) -> Iterator[Question]:
    """A user's JSONL: ``{"messages": [...] | "question": str, "answer": ...}`` per line."""
    for i, row in _iter_jsonl(Path(path).expanduser(), report):
        report.total += 1
        if not isinstance(row, dict):
            report.drop("unparseable", f"row {i}: not an object")
            continue
        msgs = row.get("messages")
        if msgs is None and isinstance(row.get("question"), str) and row["question"].strip():
            msgs = [{"role": "user", "content": row["question"].strip()}]
        if (not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs)
                or msgs[-1].get("role") != "user"):
            report.drop("missing_field", f"row {i}: needs 'question' or 'messages' ending with a user turn")
            continue
        gold = spec.canonical(row.get("answer"))
        if gold is None:
            report.drop("missing_field" if row.get("answer") is None else "unparseable",
                        f"row {i}: answer {str(row.get('answer'))[:40]!r} is not a {spec.extractor} answer")
            continue
        text = str(row.get("question") or msgs[-1].get("content", ""))
        opts = row.get("choices", row.get("options"))
        if opts is not None and (not isinstance(opts, list) or not all(isinstance(o, str) and o.strip() for o in opts)):
            report.drop("unparseable", f"row {i}: choices must be a list of non-empty strings")
            continue
        yield Question(list(msgs), gold, path, i, question_key(msgs), text,
                       {"options": [o.strip() for o in opts]} if opts else {})


def load_questions(source: str, *, limit: int | None = None, seed: int = 0,
                   spec: AnswerSpec | None = None) -> tuple[list[Question], DataReport]:
    """Questions with gold answers of one source (a builtin of ``VERIFIER_BUILTINS`` or a user JSONL), in the
    loaders' seeded order, the first ``limit`` after exact-text de-duplication (``question_key``)."""
    spec = spec or default_spec(source)
    if spec is None:
        raise DataError(f"{source}: a user file needs an answer extractor (the config's 'extractor')")
    report = DataReport(source)
    items: list[Question] = []
    if source in CHOICE_BUILTINS:
        cqs, report = load_choices(source, seed=seed)
        for cq in cqs:
            gold = SST2_LABELS[cq.answer] if source.startswith("sst2") else LETTERS[cq.answer]
            text = cq.meta.get("sentence") or cq.prompt[-1]["content"].split("\n\n")[0]
            meta = {} if source.startswith("sst2") else {"options": [o.split(". ", 1)[1] for o in cq.options]}
            items.append(Question(list(cq.prompt), gold, source, cq.meta.get("row", 0), question_key(cq.prompt), text,
                                  meta))
    elif source in MATH_BUILTINS:
        probs, report = load_math(source, seed=seed)
        for p in probs:
            msgs = math_prompt(p)
            items.append(Question(msgs, p.answer, source, p.meta.get("row", 0), question_key(msgs), p.question))
    else:
        items = list(_user_questions(source, spec, report))
        report.kept = len(items)
        items = report.take(items, seed=seed, limit=None)
    seen: set[str] = set()
    out = []
    for q in items:
        if q.key in seen:
            report.drop("duplicate_text", f"{q.source} row {q.row}: same text as an earlier question")
            continue
        seen.add(q.key)
        out.append(q)
        if limit is not None and len(out) >= limit:
            break
    report.kept = len(out)
    return out, report


def load_sources(sources: Sequence[str], *, limit: int | None, seed: int,
                 spec: AnswerSpec) -> tuple[list[Question], dict[str, dict[str, Any]]]:
    """The questions of several sources (``load_questions`` each), a text that two sources share kept once;
    with each source's counts. The verifier recipe and ``held_out_questions`` both read questions through it."""
    out: list[Question] = []
    reports: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for src in sources:
        qs, rep = load_questions(src, limit=limit, seed=seed, spec=spec)
        reports[src] = {"total": rep.total, "kept": len(qs), "dropped": dict(rep.dropped)}
        for q in qs:
            if q.key not in seen:
                seen.add(q.key)
                out.append(q)
    return out, reports


def spec_of(provenance: dict[str, Any]) -> AnswerSpec:
    """The answer spec a verifier head was made with, from its provenance (``answers``)."""
    a = provenance["answers"]
    return AnswerSpec(**{**a, "labels": tuple(a["labels"]) if a.get("labels") else None})


def held_out_questions(provenance: dict[str, Any], split: str = "test") -> list[Question]:
    """The questions of ``split`` of a verifier head, re-derived from its provenance (sources, limit, seed, split
    rule): what a benchmark evaluates on without ever touching the training questions."""
    s = provenance["splits"]
    qs, _ = load_sources(provenance["data"], limit=provenance["limit"], seed=provenance["seed"], spec=spec_of(provenance))
    return [q for q in qs if split_of(q.key, dev_fraction=s["dev_fraction"], test_fraction=s["test_fraction"],
                                      seed=s["seed"]) == split]


def seen_questions(provenance: dict[str, Any]) -> list[Question]:
    """Every question a verifier head was made from: its sampled questions (all splits) and, with ``answer_limit``,
    the unsampled training questions its answer level read (what a text-disjoint benchmark must exclude)."""
    more = (provenance.get("answer_level") or {}).get("answer_limit")
    limit = provenance["limit"] if more is None or provenance["limit"] is None else max(more, provenance["limit"])
    qs, _ = load_sources(provenance["data"], limit=limit, seed=provenance["seed"], spec=spec_of(provenance))
    return qs


def split_of(key: str, *, dev_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """train / dev / test by a hash of the question text: the same text always lands in the same split, whatever
    else is in the data (a benchmark re-derives the held-out questions from the head's provenance)."""
    u = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    return "test" if u < test_fraction else ("dev" if u < test_fraction + dev_fraction else "train")


def question_seed(key: str, seed: int) -> int:
    """The request seed question ``key`` is sampled with (its candidates then follow the server's per-candidate
    rule): order-independent, so a changed limit or source list re-uses every cached question."""
    return (int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) + seed) % (1 << 62)


# --------------------------------------------------------------------------------------------------
# the sample cache
# --------------------------------------------------------------------------------------------------


@dataclass
class Sampled:
    """One question's candidates as the serving sampler drew them."""

    texts: list[str]
    token_ids: list[list[int]]
    finish: list[str]
    features: dict[int, "torch.Tensor"]  # layer -> [N, d] float32 (the serving feature at the closing token)


class SampleCache:
    """Candidates per (prompt token ids, request seed) under one model + sampling setting, on disk.

    ``<root>/<key>/shard-NNNNN.safetensors``: each shard holds a batch of questions (features per layer as
    tensors, texts / ids / finish reasons as JSON in the safetensors metadata), written atomically (temp file +
    rename), so an interrupted run keeps every finished shard and ``--resume`` samples only what is missing.
    ``key`` = sha256 of the backbone fingerprint, dtype, sampling parameters and feature layers."""

    def __init__(self, root: str | Path, setting: dict[str, Any]):
        self.setting = setting
        self.key = hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.dir = Path(root).expanduser() / self.key
        self.entries: dict[str, Sampled] = {}
        self._shards = 0

    @staticmethod
    def entry_id(prompt_ids: Sequence[int], seed: int) -> str:
        return hashlib.sha256(json.dumps([list(prompt_ids), seed]).encode()).hexdigest()[:24]

    def load(self) -> int:
        """Read every complete shard; returns the number of questions cached. A corrupt shard is skipped (and
        sampled again)."""
        import torch
        from safetensors import safe_open

        if not self.dir.is_dir():
            return 0
        for path in sorted(self.dir.glob("shard-*.safetensors")):
            self._shards = max(self._shards, int(path.stem.split("-")[1]) + 1)
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = json.loads((f.metadata() or {})["entries"])
                    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items)
            except Exception as e:  # noqa: BLE001 - a torn or foreign file: sample its questions again
                log.warning("sample cache: skipping unreadable %s (%s)", path.name, e)
                continue
            row = 0
            for ent in meta:
                n = len(ent["texts"])
                feats = {int(k.split(".")[1]): t[row : row + n].to(torch.float32) for k, t in tensors.items()}
                self.entries[ent["id"]] = Sampled(ent["texts"], ent["token_ids"], ent["finish"], feats)
                row += n
        return len(self.entries)

    def add(self, batch: Sequence[tuple[str, Sampled]]) -> None:
        """Write one shard of (entry id, sampled) and keep them in memory."""
        import torch
        from safetensors.torch import save_file

        if not batch:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "setting.json").exists():
            (self.dir / "setting.json").write_text(json.dumps(self.setting, indent=2, sort_keys=True, default=str))
        layers = sorted(batch[0][1].features)
        tensors = {f"layer.{l}": torch.cat([s.features[l] for _, s in batch]).contiguous() for l in layers}
        meta = [{"id": i, "texts": s.texts, "token_ids": s.token_ids, "finish": s.finish} for i, s in batch]
        path = self.dir / f"shard-{self._shards:05d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"entries": json.dumps(meta)})
        tmp.replace(path)
        self._shards += 1
        self.entries.update(dict(batch))


def sample_questions(backbone: Any, questions: Sequence[Question], *, n: int, params: Any, seed: int,
                     feature_layers: Sequence[int], cache_dir: str | Path, batch_prompts: int = 8,
                     progress: bool = True) -> tuple[list[Sampled], dict[str, Any]]:
    """``n`` candidates per question through THE serving sampler (``training.sampling.sample``: the HF engine the
    server runs, each question a request with seed ``question_seed``), cached on disk (``SampleCache``): a second
    call, or a resumed run, samples only the questions not cached yet. Returns the samples in question order and
    the sampler's throughput (candidates/s, tokens/s, over what was sampled now)."""
    import torch
    from tqdm.auto import tqdm

    from arbiter.chat import prompt_ids

    from .sampling import sample

    setting = {"backbone": backbone.fingerprint.model_dump(), "dtype": backbone.dtype, "n": n,
               "temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens,
               "feature_layers": sorted(feature_layers), "engine": "hf"}
    cache = SampleCache(Path(cache_dir), setting)
    cached = cache.load()
    ids = [prompt_ids(backbone.tokenizer, q.messages) for q in questions]
    seeds = [question_seed(q.key, seed) for q in questions]
    eids = [SampleCache.entry_id(p, s) for p, s in zip(ids, seeds)]
    todo = [j for j, e in enumerate(eids) if e not in cache.entries]
    log.info("sample cache %s: %d questions cached, %d to sample", cache.dir, cached, len(todo))
    t0, tokens = time.perf_counter(), 0
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="sampling candidates", unit="q",
               disable=not progress)
    try:
        for b0 in range(0, len(todo), batch_prompts):
            chunk = todo[b0 : b0 + batch_prompts]
            res = sample(backbone, [ids[j] for j in chunk], n=n, params=params, seeds=[seeds[j] for j in chunk],
                         feature_layers=feature_layers, batch_prompts=batch_prompts, progress=False)
            batch = []
            for j, r in zip(chunk, res):
                feats = {l: torch.stack([c.features[l] for c in r.candidates]).float()  # type: ignore[index]
                         for l in feature_layers}
                batch.append((eids[j], Sampled([c.text for c in r.candidates], [list(c.token_ids) for c in r.candidates],
                                               [c.finish_reason for c in r.candidates], feats)))
                tokens += sum(len(c.token_ids) for c in r.candidates)
            cache.add(batch)
            bar.update(len(chunk))
            dt = time.perf_counter() - t0
            bar.set_postfix(samples_s=f"{(b0 + len(chunk)) * n / max(dt, 1e-9):.1f}")
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    stats = {"cache": str(cache.dir), "questions_cached_before": len(questions) - len(todo), "questions_sampled": len(todo),
             "sample_seconds": round(dt, 1), "candidates_per_s": round(len(todo) * n / dt, 2) if todo and dt > 0 else None,
             "tokens_per_s": round(tokens / dt, 1) if todo and dt > 0 else None, "completion_tokens": tokens}
    return [cache.entries[e] for e in eids], stats


# --------------------------------------------------------------------------------------------------
# labels and pairs
# --------------------------------------------------------------------------------------------------


def label(sampled: Sampled, gold: str, spec: AnswerSpec, fn: Callable[[str], str | None] | None = None) -> tuple[
        list[str | None], list[bool]]:
    """(extracted answers, right?) per candidate. An unanswered candidate is wrong; with ``finished_only`` a
    candidate cut off by max_tokens is unanswered."""
    fn = fn or spec.fn()
    answers = [None if (spec.finished_only and f != "stop") else fn(t) for t, f in zip(sampled.texts, sampled.finish)]
    return answers, [a is not None and a == gold for a in answers]


@dataclass
class Pair:
    question: int  # index into the question list
    chosen: int  # candidate index (a right one)
    rejected: int  # candidate index (a wrong one)


def make_pairs(questions: Sequence[Question], samples: Sequence[Sampled], rights: Sequence[Sequence[bool]], *,
               per_question: int, seed: int) -> tuple[list[Pair], dict[str, int]]:
    """Right-vs-wrong pairs within each question. Candidates with identical (normalised) texts count once;
    empty texts are never used. Per question at most ``per_question`` pairs, balanced: the right and the wrong
    candidates are each shuffled (seeded per question) and paired round-robin, so every candidate is used
    about equally often before any repeats."""
    stats = {"questions": len(questions), "with_pairs": 0, "all_right": 0, "all_wrong": 0, "duplicates": 0, "pairs": 0}
    out: list[Pair] = []
    for qi, (q, s, ok) in enumerate(zip(questions, samples, rights)):
        seen: dict[str, int] = {}
        for i, t in enumerate(s.texts):
            k = normalise_text(t)
            if not k:
                continue
            if k in seen:
                stats["duplicates"] += 1
                continue
            seen[k] = i
        uniq = list(seen.values())
        good = [i for i in uniq if ok[i]]
        bad = [i for i in uniq if not ok[i]]
        if not good or not bad:
            stats["all_right" if good else "all_wrong"] += 1
            continue
        rng = random.Random(f"{seed}:{q.key}")
        rng.shuffle(good)
        rng.shuffle(bad)
        m = min(per_question, len(good) * len(bad))
        left = [(g, b) for g in good for b in bad]  # in shuffled order
        used = dict.fromkeys(good + bad, 0)
        combos: list[tuple[int, int]] = []
        while len(combos) < m:  # greedy: the unused pair whose two candidates were used least so far
            g, b = min(left, key=lambda gb: (max(used[gb[0]], used[gb[1]]), used[gb[0]] + used[gb[1]]))
            left.remove((g, b))
            used[g] += 1
            used[b] += 1
            combos.append((g, b))
        out += [Pair(qi, g, b) for g, b in combos]
        stats["with_pairs"] += 1
    stats["pairs"] = len(out)
    return out, stats


# --------------------------------------------------------------------------------------------------
# answer-level pairs (docs/methods.md "Answer-level verification")
# --------------------------------------------------------------------------------------------------


@dataclass
class AnswerPair:
    question: int  # index into the question list
    chosen: str  # the gold answer (canonical, as the extractor returns it)
    rejected: str  # a wrong answer: one the model sampled, or another answer of a closed set


def listed_answers(q: Question, spec: AnswerSpec) -> list[str] | None:
    """The closed set of answers a question allows, in the extractor's canonical form: the label words
    (label_words with labels), the letters of its listed options (choice_letter); None for an open answer
    (numbers, a regex, a JSON field), where only the model's own wrong answers can be paired."""
    if spec.extractor == "label_words" and spec.labels:
        return list(spec.labels)
    if spec.extractor == "choice_letter":
        opts = question_options(q)
        return list(LETTERS[: len(opts)]) if opts else None
    return None


def canonical_answers(questions: Sequence[Question], answers: Sequence[Sequence[str | None]],
                      spec: AnswerSpec, *, listed: bool = False) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Per question, every answer worth verifying rendered in ``spec``'s canonical form: the gold answer, each
    distinct answer the model sampled, and with ``listed`` every answer of a closed set (``listed_answers``).
    Answers that cannot be rendered (a letter naming no listed option) are left out and counted; a question
    whose GOLD answer cannot be rendered gets no answer-level pair."""
    out: list[dict[str, str]] = []
    stats: dict[str, Any] = {"rendered": 0, "unrendered_samples": 0, "unrendered_gold": 0, "examples": []}
    for q, aa in zip(questions, answers):
        got: dict[str, str] = {}
        extra = (listed_answers(q, spec) or []) if listed else []
        for a in dict.fromkeys([q.gold, *(x for x in aa if x is not None), *extra]):
            text = spec.render(q, a)
            if text is None:
                stats["unrendered_gold" if a == q.gold else "unrendered_samples"] += 1
                if a == q.gold and len(stats["examples"]) < 5:
                    stats["examples"].append(f"{q.source} row {q.row}: gold {a!r} cannot be rendered as "
                                             f"{spec.template!r} (options: {question_options(q)})")
                continue
            got[a] = text
        stats["rendered"] += len(got)
        out.append(got)
    return out, stats


def make_answer_pairs(questions: Sequence[Question], answers: Sequence[Sequence[str | None]],
                      canon: Sequence[dict[str, str]], *, per_question: int,
                      spec: AnswerSpec | None = None) -> tuple[list[AnswerPair], dict[str, int]]:
    """(gold answer, a wrong answer) per question, in canonical form: first the wrong answers the model actually
    sampled, most frequent first (its real mistakes); then, given ``spec``, the other answers of a closed set
    (``listed_answers``: the other label, the other options), so a question the model never got wrong, or was
    never sampled, still teaches the head; at most ``per_question``."""
    stats = {"questions": len(questions), "with_pairs": 0, "never_wrong": 0, "gold_unrendered": 0, "pairs": 0,
             "sampled_pairs": 0, "listed_pairs": 0}
    out: list[AnswerPair] = []
    for qi, (q, aa, c) in enumerate(zip(questions, answers, canon)):
        if q.gold not in c:
            stats["gold_unrendered"] += 1
            continue
        counts: dict[str, int] = {}
        for a in aa:
            if a is not None and a != q.gold and a in c:
                counts[a] = counts.get(a, 0) + 1
        sampled = sorted(counts, key=lambda a: (-counts[a], a))
        listed = [a for a in (listed_answers(q, spec) or []) if a != q.gold and a in c and a not in counts] if spec else []
        wrong = (sampled + listed)[:per_question]
        if not wrong:
            stats["never_wrong"] += 1
            continue
        out += [AnswerPair(qi, q.gold, w) for w in wrong]
        stats["with_pairs"] += 1
        stats["sampled_pairs"] += sum(w in counts for w in wrong)
        stats["listed_pairs"] += sum(w not in counts for w in wrong)
    stats["pairs"] = len(out)
    return out, stats


def canonical_features(backbone: Any, questions: Sequence[Question], canon: Sequence[dict[str, str]],
                       layers: Sequence[int], *, progress: bool = True) -> list[dict[str, dict[int, "torch.Tensor"]]]:
    """The head features of every rendered answer (prompt + canonical answer + closing token, read as the HF
    engine reads ``/v1/score`` and the verify rule's answers: ``arbiter.backbone.shared_prefix_end_features``, the
    prompt run once for all its answers): per question, answer -> layer -> [d]."""
    from tqdm.auto import tqdm

    from arbiter.backbone import shared_prefix_end_features
    from arbiter.chat import answer_ids, prompt_ids
    from arbiter.training.feature_cache import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_BATCH, _pad_id

    keys = [(qi, a) for qi, c in enumerate(canon) for a in c]
    pids: dict[int, list[int]] = {}
    pre = [pids.setdefault(qi, prompt_ids(backbone.tokenizer, questions[qi].messages)) for qi, _ in keys]
    suf = [answer_ids(backbone.tokenizer, canon[qi][a], backbone.end_id) for qi, a in keys]
    out: list[dict[str, dict[int, torch.Tensor]]] = [{} for _ in questions]
    if not keys:
        return out
    with tqdm(total=sum(len(p) for p in pids.values()) + sum(len(x) for x in suf), desc="canonical answers",
              unit="tok", unit_scale=True, disable=not progress) as bar:
        feats = shared_prefix_end_features(backbone.model, pre, suf, sorted(set(layers)), batch_tokens=DEFAULT_BATCH_TOKENS,
                                           pad_id=_pad_id(backbone), max_batch=DEFAULT_MAX_BATCH, progress=bar.update)
    for k, (qi, a) in enumerate(keys):
        out[qi][a] = {l: f[k] for l, f in feats.items()}
    return out


def verified_rewards(head: Any, feats: Sequence[dict[str, dict[int, "torch.Tensor"]]], layer: int,
                     head_rewards: Callable[..., "torch.Tensor"]) -> list[dict[str, float | None]]:
    """Each question's answers' canonical rewards under ``head`` (what the verify rule ranks groups by)."""
    import torch

    keys = [(qi, a) for qi, f in enumerate(feats) for a in f]
    out: list[dict[str, float | None]] = [{} for _ in feats]
    if not keys:
        return out
    r = head_rewards(head, torch.stack([feats[qi][a][layer] for qi, a in keys])).tolist()
    for (qi, a), v in zip(keys, r):
        out[qi][a] = float(v)
    return out


# --------------------------------------------------------------------------------------------------
# best-of-N under the server's selection code
# --------------------------------------------------------------------------------------------------

RULES = ("argmax", "weighted_vote", "majority_vote", "verify")
# The verify rule's group-score weights tried on dev (selection.VerifyWeights: vote share, best text reward).
VERIFY_GRID = tuple((v, t) for v in (0.0, 0.5, 1.0, 2.0, 4.0) for t in (0.0, 0.5))


def best_of_n(rewards: Sequence["torch.Tensor"], answers: Sequence[Sequence[str | None]],
              rights: Sequence[Sequence[bool]], verified: Sequence[dict[str, float | None]] | None = None,
              weights: Any = None, rules: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy of n=1 (candidate 0, plain sampling), each rule (``arbiter.selection.select`` on the head's
    rewards, exactly as the server picks; verify with ``verified[q]``, each answer's canonical reward, and the
    ``weights``), and oracle (any right), with paired wins / losses against n=1 and standard errors.
    ``rewards[q]``: [N] of question q's candidates."""

    n = len(rewards)
    rules = [r for r in (rules or RULES) if r != "verify" or verified is not None]
    right: dict[str, list[bool]] = {"n=1": [bool(r[0]) for r in rights], "oracle": [any(r) for r in rights]}
    for rule in rules:
        right[rule] = rule_right(rewards, answers, rights, rule, verified if rule == "verify" else None, weights)
    # majority without any head: the same vote with equal rewards (ties -> the lower index)
    out: dict[str, Any] = {"questions": n}
    for name, r in right.items():
        acc = sum(r) / n if n else float("nan")
        row: dict[str, Any] = {"accuracy": acc, "se": accuracy_se(acc, n)}
        if name != "n=1":
            row["wins"] = sum(a and not b for a, b in zip(r, right["n=1"]))
            row["losses"] = sum(b and not a for a, b in zip(r, right["n=1"]))
        out[name] = row
    return out


def pick_rule(table: dict[str, Any]) -> str:
    """The rule with the best accuracy in a ``best_of_n`` table; ties go to the simpler rule (argmax, then the
    weighted vote, then the majority, then verify)."""
    return max((r for r in RULES if r in table), key=lambda r: (table[r]["accuracy"], -RULES.index(r)))


def fit_verify_weights(rewards: Sequence["torch.Tensor"], answers: Sequence[Sequence[str | None]],
                       rights: Sequence[Sequence[bool]], verified: Sequence[dict[str, float | None]]) -> tuple[Any, float]:
    """The verify weights (``VERIFY_GRID``) with the best dev accuracy, ties to the smaller weights (the plain
    canonical reward first): (``selection.VerifyWeights``, its accuracy)."""
    from arbiter.selection import VerifyWeights

    best: tuple[float, int] | None = None
    for i, (v, t) in enumerate(VERIFY_GRID):
        r = rule_right(rewards, answers, rights, "verify", verified, VerifyWeights(v, t))
        acc = sum(r) / len(r) if r else float("nan")
        if best is None or acc > best[0]:
            best = (acc, i)
    assert best is not None
    return VerifyWeights(*VERIFY_GRID[best[1]]), best[0]


def rule_right(rewards: Sequence["torch.Tensor"], answers: Sequence[Sequence[str | None]],
               rights: Sequence[Sequence[bool]], rule: str, verified: Sequence[dict[str, float | None]] | None = None,
               weights: Any = None) -> list[bool]:
    """Per question: is the candidate ``rule`` picks right (the server's selection code)?"""
    from arbiter.selection import select

    return [bool(rights[q][select(rewards[q][:, None], rule, answers[q], verified[q] if verified is not None else None,
                                  weights).order[0]]) for q in range(len(rewards))]
