"""Answer extraction shared by serving (vote-based selection, ``rerank.select``) and training / evaluation
(math pairs, best-of-N, verifier heads): the final number of a solution, an option letter, a label word, a regex
group, a JSON field.

Every extractor maps a candidate's text to a canonical answer string or None (no answer found); votes group
candidates by that string.
"""

from __future__ import annotations

import json
import re
import string
import time
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def canonical_number(text: Any) -> str | None:
    """'42', '42.0', '+42', '$42' -> '42'; '1,234.50' -> '1234.5'; '-0.0' -> '0'; junk -> None."""
    if isinstance(text, bool) or text is None:
        return None
    if isinstance(text, float):
        text = repr(text)
    s = str(text).strip().replace(",", "").replace("$", "").replace(" ", "")
    s = s.rstrip("%").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


# A number not glued to a word or another number ("x2", "3.4.5"); thousands separators only in groups of 3.
_NUMBER = re.compile(r"(?<![\w.])(-?)\$?\s?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?![\d])")
_ANSWER_MARKERS = (
    re.compile(r"####\s*([^\n]*)"),
    re.compile(r"\\boxed\{([^{}]*)\}"),
    # "answer is N" / "answer: N" / "answer = N", not the word inside "answers" or "answered".
    re.compile(r"\banswer(?:\s+is\b\s*:?|\s*[:=])\s*([^\n]*)", re.IGNORECASE),
)


def _numbers(text: str) -> list[str]:
    out = []
    for m in _NUMBER.finditer(text):
        c = canonical_number(m.group(1) + m.group(2))
        if c is not None:
            out.append(c)
    return out


def extract_final_answer(text: str) -> str | None:
    """The final numeric answer of a solution as a canonical number string, or None.

    Tried in order, each on its last occurrence: "#### N" (GSM8K), "\\boxed{N}", "answer is N" /
    "answer: N"; the first number after the marker wins. Otherwise the last number in the text.
    """
    if not isinstance(text, str):  # a caller's None or a JSON value: no answer (typed callers never send one)
        return None  # type: ignore[unreachable]  # reachable from untyped callers
    for marker in _ANSWER_MARKERS:
        for m in reversed(list(marker.finditer(text))):
            nums = _numbers(m.group(1))
            if nums:
                return nums[0]
    nums = _numbers(text)
    return nums[-1] if nums else None


def extract_choice_letter(text: str, k: int = 26) -> str | None:
    """The option letter an answer gives: a leading 'B.' / 'B)' / '(B)' / 'B:', or 'answer is B'."""
    letters = LETTERS[: max(1, min(k, 26))]
    m = re.match(rf"\s*\(?([{letters}])[\.\):]", text) or re.search(rf"answer is:?\s*\(?([{letters}])\b", text, re.I)
    return m.group(1).upper() if m else None


def extract_label_word(text: str, labels: Sequence[str]) -> str | None:
    """The label (as spelled in ``labels``) that occurs first in the text as a whole word, case-insensitively:
    "The sentiment is Positive." -> "positive" for labels ("negative", "positive"); None if none occurs."""
    best: tuple[int, str] | None = None
    for label in labels:
        m = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text, re.IGNORECASE)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), label)
    return best[1] if best else None


def extract_json_field(text: str, path: str) -> str | None:
    """``path`` (dotted, e.g. "answer" or "result.value") of the first JSON object in the text, as a string."""
    start = text.find("{")
    while start >= 0:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
        except RecursionError:  # nesting deeper than the interpreter's limit: no answer, never a crash
            return None
        except ValueError:
            start = text.find("{", start + 1)
            continue
        for part in path.split("."):
            if not isinstance(obj, dict) or part not in obj:
                return None
            obj = obj[part]
        if obj is None or isinstance(obj, (dict, list)):
            return None if obj is None else json.dumps(obj, sort_keys=True)
        return str(obj).strip()
    return None


REGEX_TIMEOUT_S = 0.05  # a client-supplied pattern may backtrack badly: each match is cut off after this


def compile_regex(pattern: str) -> Any:
    """A client pattern with exactly one capturing group, compiled by the ``regex`` module (match timeouts)."""
    import regex

    rx = regex.compile(pattern)
    if rx.groups != 1:
        raise ValueError(f"the pattern must have exactly one capturing group, it has {rx.groups}")
    return rx


EXTRACTORS = ("last_number", "choice_letter", "label_words", "regex", "json_field")


class ExtractionOverrun(Exception):
    """Extracting a request's candidates took longer than its time budget (``Extractor.many``)."""


class Extractor:
    """One extractor: ``extractor(text)`` -> answer | None (a regex match is cut off after ``REGEX_TIMEOUT_S``
    and then finds nothing), and ``many(texts, budget_s)`` under one time budget for all the texts, which raises
    ``ExtractionOverrun`` instead of answering None once the budget is spent (serving: a 400)."""

    def __init__(self, name: str, fn: Callable[[str], str | None], rx: Any = None):
        self.name, self._fn, self._rx = name, fn, rx

    def __call__(self, text: str) -> str | None:
        if self._rx is None:
            return self._fn(text)
        try:
            return self._regex(text, REGEX_TIMEOUT_S)
        except TimeoutError:
            return None

    def _regex(self, text: str, timeout: float) -> str | None:
        # concurrent=True: the regex module releases the GIL while it matches, so a slow pattern run in a worker
        # thread (serving) never stalls the event loop.
        m = self._rx.search(text, timeout=timeout, concurrent=True)
        return m.group(1).strip() if m and m.group(1) is not None else None

    def many(self, texts: Sequence[str], budget_s: float) -> list[str | None]:
        deadline = time.monotonic() + budget_s
        out: list[str | None] = []
        for text in texts:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ExtractionOverrun(f"extracting {len(texts)} answer(s) took more than {budget_s:g} s")
            try:
                out.append(self._fn(text) if self._rx is None else self._regex(text, left))
            except TimeoutError:
                raise ExtractionOverrun(f"extracting {len(texts)} answer(s) took more than {budget_s:g} s") from None
        return out


def extractor(name: str, *, pattern: str | None = None, field: str | None = None, labels: Sequence[str] | None = None,
              k: int = 26) -> Extractor:
    """The extractor ``name`` (callable text -> answer | None). Raises ValueError for a bad pattern / field /
    label list."""
    if name == "last_number":
        return Extractor(name, extract_final_answer)
    if name == "choice_letter":
        return Extractor(name, lambda t: extract_choice_letter(t, k))
    if name == "label_words":
        if not labels or any(not isinstance(x, str) or not x.strip() for x in labels):
            raise ValueError("the label_words extractor needs a non-empty list of non-empty labels")
        words = [x.strip() for x in labels]
        return Extractor(name, lambda t: extract_label_word(t, words))
    if name == "regex":
        if not pattern:
            raise ValueError("the regex extractor needs a pattern")
        rx = compile_regex(pattern)
        return Extractor(name, lambda t: None, rx)
    if name == "json_field":
        if not field:
            raise ValueError("the json_field extractor needs a field")
        return Extractor(name, lambda t: extract_json_field(t, field))
    raise ValueError(f"unknown extractor {name!r}")


# --------------------------------------------------------------------------------------------------
# canonical forms (answer-level verification, README "Verifying answers")
# --------------------------------------------------------------------------------------------------

CANONICAL_FIELDS = ("answer", "option")  # the placeholders a canonical template may use
_LISTED = re.compile(r"^[ \t]*\(?([A-Z])[\.\):][ \t]+(\S[^\n]*?)[ \t]*$", re.MULTILINE)


def check_canonical(template: str, extractor_name: str | None) -> None:
    """ValueError unless ``template`` is a usable canonical form: ``str.format`` fields among
    ``CANONICAL_FIELDS`` (no format spec, no conversion), ``{answer}`` or ``{option}`` at least once, and
    ``{option}`` (the listed text of an option letter) only with the ``choice_letter`` extractor."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"canonical template {template!r}: {e}") from None
    fields = set()
    for _, name, spec, conv in parts:
        if name is None:
            continue
        if name not in CANONICAL_FIELDS or spec or conv:
            raise ValueError(f"canonical template {template!r}: only the fields {{answer}} and {{option}} are allowed "
                             f"(no format spec or conversion), got {{{name}{'!' + conv if conv else ''}"
                             f"{':' + spec if spec else ''}}}")
        fields.add(name)
    if not fields:
        raise ValueError(f"canonical template {template!r} uses neither {{answer}} nor {{option}}")
    if "option" in fields and extractor_name != "choice_letter":
        raise ValueError("canonical template: {option} (the text listed for an option letter) needs the choice_letter "
                         f"extractor, not {extractor_name}")


def listed_options(text: str) -> list[str]:
    """The options a prompt lists as lettered lines ("A. text", "B) text", "(C) text"), in letter order: the last
    run of lines lettered A, B, C, ... in ``text`` ([] when none). What ``{option}`` renders for a letter when
    the request gives no ``choices``."""
    runs: list[list[str]] = []
    for m in _LISTED.finditer(text):
        letter, body = m.group(1), m.group(2)
        if letter == "A":
            runs.append([body])
        elif runs and LETTERS.index(letter) == len(runs[-1]):
            runs[-1].append(body)
    runs = [r for r in runs if len(r) >= 2]
    return runs[-1] if runs else []


def options_of(messages: Sequence[dict[str, Any]], choices: Sequence[str] | None = None) -> list[str]:
    """The options' texts (A first) that ``{option}`` renders: ``choices`` when given, else the lettered lines of
    the last user message (``listed_options``); [] when there are none. Serving and training both read them here."""
    if choices:
        return [c.strip() for c in choices]
    last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    return listed_options(str(last.get("content") or "")) if last else []


def uses_option(template: str) -> bool:
    """Whether a canonical template renders ``{option}`` (then it needs the options' texts)."""
    return any(name == "option" for _, name, _, _ in string.Formatter().parse(template))


def render_canonical(template: str, answer: str, options: Sequence[str] | None = None) -> str | None:
    """An extracted answer in a head's canonical form: ``template`` with ``{answer}`` the answer and ``{option}``
    the text of option ``answer`` (a letter) in ``options``; None when the letter names no listed option (that
    answer cannot be verified)."""
    option = ""
    if uses_option(template):
        k = LETTERS.find(answer) if len(answer) == 1 else -1
        if k < 0 or not options or k >= len(options):
            return None
        option = options[k]
    return template.format(answer=answer, option=option)
