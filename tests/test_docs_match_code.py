"""Docs that must match the code. The README's settings table is the generator's output
(``python -m arbiter.service.settings``), verbatim. SECURITY.md names the test beside every promise (``file::test`` with the file abbreviations its header
defines, or ``::test`` for the file named just before it in the same cell): every test it names must exist, so a
renamed or deleted test cannot leave a promise standing on nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "SECURITY.md").read_text()


def _abbreviations() -> dict[str, str]:
    return dict(re.findall(r"`(\w+)` =\s*`(test_\w+\.py)`", DOC))


def _tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.name.startswith("test_")}


def test_every_test_security_md_names_exists():
    abbr = _abbreviations()
    assert len(abbr) >= 8, abbr
    cited: list[tuple[str, str]] = []
    for line in DOC.splitlines():
        current = None
        for ref in re.findall(r"`([\w./]*)::(test_\w+)`", line):
            file, name = ref
            if file:
                current = abbr.get(file, file.removeprefix("tests/"))
            assert current is not None, f"`::{name}` with no file before it: {line[:120]}"
            cited.append((current, name))
    assert len(cited) >= 60, len(cited)
    missing = []
    cache: dict[str, set[str]] = {}
    for file, name in cited:
        path = ROOT / "tests" / file
        if file not in cache:
            cache[file] = _tests(path) if path.is_file() else set()
        if name not in cache[file]:
            missing.append(f"{file}::{name}")
    assert not missing, missing


def test_the_readme_settings_table_is_the_generated_one():
    from arbiter.service.settings import settings_table

    assert settings_table() in (ROOT / "README.md").read_text(), "regenerate it: python -m arbiter.service.settings"
