"""Source hygiene that linters miss.

Commit 58d219d joined a line into the trailing comment of the line above it (``lora_alpha=section.alpha,  # type:
ignore[arg-type]  # peft takes a float alpha lora_dropout=section.dropout,``): the keyword argument became comment
text, every LoRA run silently trained with PEFT's default dropout, and ruff, mypy and the tests all passed. This test
refuses any trailing comment that ends in code of that shape (keyword arguments, or a call argument list cut at a
comma), in every Python file of the package, the tests and the benchmarks.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER,
        tokenize.STRING}


def code_in_comment(comment: str) -> str | None:
    """The tail of ``comment`` that parses as call arguments with a keyword (``x=y``) or as a cut-off argument
    list (``f(a.b, c)``-like ending in a comma), or None."""
    words = comment.lstrip("#").split()
    for i in range(len(words)):
        tail = " ".join(words[i:])
        if "=" not in tail and "(" not in tail:
            return None
        for args in (tail, tail.removesuffix(")")):  # a line joined in may close the call it belongs to
            try:
                node = ast.parse(f"f({args})").body[0].value  # type: ignore[attr-defined]
            except SyntaxError:
                continue
            # A joined line ends where its argument (",") or its call (")") did.
            if (node.keywords and tail.endswith((",", ")"))) or (
                    tail.endswith(",") and any(not isinstance(a, ast.Name) for a in node.args)):
                return tail
    return None


@pytest.mark.parametrize("comment,code", [
    ("# type: ignore[arg-type]  # peft takes a float alpha lora_dropout=section.dropout,", "lora_dropout=section.dropout,"),
    ("# noqa: E731  return_dict=True, use_cache=False)", "return_dict=True, use_cache=False)"),
    ("# type: ignore[arg-type]  # peft takes a float alpha", None),
    ("# [B, T] (1 = real token)", None),
    ("# policy == reference at step 1", None),
    ("# extractor=regex", None),
    ("# ids that end generation (end_id + the model's EOS ids); () = (end_id,)", None),
    ("# (module, A, B, scale)", None),
])
def test_the_detector(comment, code):
    assert code_in_comment(comment) == code


def test_no_code_hides_in_a_trailing_comment():
    found = []
    for top in ("arbiter", "tests", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            toks = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
            code_lines = {t.start[0] for t in toks if t.type not in SKIP}
            for t in toks:
                if t.type == tokenize.COMMENT and t.start[0] in code_lines and code_in_comment(t.string):
                    found.append(f"{path.relative_to(ROOT)}:{t.start[0]}: {t.string}")
    assert not found, "code inside trailing comments (a formatter joined two lines?):\n" + "\n".join(found)
