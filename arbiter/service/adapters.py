"""The service's side of adapters: the ``ARBITER_ADAPTERS`` setting and which adapter a head was trained on. The
adapter set itself (switching weights per batch) lives in ``arbiter.generation.adapters``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arbiter.heads.config import NAME_PATTERN


def parse_adapters_setting(value: str | None) -> list[tuple[str, str]]:
    """``name=dir,name2=dir2`` -> [(name, dir)]; names are model ids (letters, digits, ``._-``)."""
    import re

    out: list[tuple[str, str]] = []
    for part in (value or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, path = part.partition("=")
        if not sep or not re.fullmatch(NAME_PATTERN, name.strip()) or not path.strip():
            raise ValueError(f"ARBITER_ADAPTERS entries are name=directory, got {part!r}")
        out.append((name.strip(), path.strip()))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError("ARBITER_ADAPTERS names must be unique")
    return out


def head_adapter(config: Any) -> str | None:
    """The adapter a head was trained on (its directory name), or None for a head on the base model."""
    prov = getattr(config, "provenance", None) or {}
    a = prov.get("adapter")
    return Path(str(a)).name if a else None
