"""Name -> loaded head, with runtime load / swap / unload.

The registry holds an immutable mapping and replaces it with one assignment, so a request that took a
snapshot keeps scoring with the heads it started with while a swap or unload happens. Every new head is
fully loaded and validated before the assignment: a failed load leaves the old head serving.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from .config import BackboneFingerprint, HeadConfig
from .io import CONFIG_FILE, HeadLoadError, load_head
from .modules import DPHHead


@dataclass(frozen=True)
class LoadedHead:
    name: str
    module: DPHHead
    config: HeadConfig
    path: str


class HeadNotFound(KeyError):
    pass


class HeadRegistry:
    def __init__(self, root: str | os.PathLike[str] | None, backbone: BackboneFingerprint | None, device: str = "cpu",
                 *, supported_layers: frozenset[int] | None = None, engine: str = "this"):
        self.root = Path(root).resolve() if root else None
        self.backbone = backbone
        self.device = device
        # Layers the serving engine can capture (None: every layer of the backbone). A head on any other layer
        # is refused when it is loaded, never at request time.
        self.supported_layers = supported_layers
        self.engine = engine
        self._synced: dict[str, tuple[tuple[str, int, int], ...]] = {}  # top-level directory -> file signature, for heads sync() manages
        self._missing: set[str] = set()  # synced directories the last scan did not see
        self._heads: Mapping[str, LoadedHead] = MappingProxyType({})
        self._lock = threading.Lock()  # serialises writers; readers never take it

    # -- reading -----------------------------------------------------------------------------------
    def snapshot(self) -> Mapping[str, LoadedHead]:
        return self._heads

    def names(self) -> list[str]:
        return sorted(self._heads)

    def get(self, name: str) -> LoadedHead:
        try:
            return self._heads[name]
        except KeyError:
            raise HeadNotFound(name) from None

    # -- resolving paths safely --------------------------------------------------------------------
    def resolve(self, path: str) -> Path:
        """A path inside the heads directory; refuses traversal and symlinks that leave it."""
        if self.root is None:
            raise HeadLoadError("no heads directory is configured (ARBITER_HEADS_DIR)")
        if not path or "\x00" in path or os.path.isabs(path):
            raise HeadLoadError("head path must be a relative path inside the heads directory")
        candidate = self.root / path
        if candidate.is_symlink():
            raise HeadLoadError(f"{path!r} is a symlink; refusing to follow it")
        real = candidate.resolve()
        if real != self.root and self.root not in real.parents:
            raise HeadLoadError(f"{path!r} resolves outside the heads directory")
        if real == self.root:
            raise HeadLoadError("head path must name a sub-directory of the heads directory")
        return real

    def unservable(self, config: HeadConfig) -> str | None:
        """Why the serving engine cannot compute this head's feature, or None when it can."""
        layer = config.layer  # within the backbone's range: HeadConfig validates it against the fingerprint
        if self.supported_layers is not None and layer not in self.supported_layers:
            return (f"head {config.name!r} reads layer {layer}, which the {self.engine} engine cannot serve (it serves "
                    f"layers {sorted(self.supported_layers)})")
        return None

    # -- writing -----------------------------------------------------------------------------------
    def _load(self, directory: Path, name: str | None) -> LoadedHead:
        # Shown to clients (/v1/heads, admin answers, every error): relative to the heads directory, never the
        # server's layout.
        shown = directory.relative_to(self.root).as_posix() if self.root is not None else directory.name
        module, config = load_head(directory, expected_backbone=self.backbone, device=self.device, shown=shown)
        why = self.unservable(config)
        if why:
            raise HeadLoadError(why)
        return LoadedHead(name or config.name, module, config, shown)

    def load(self, path: str, name: str | None = None, *, replace: bool = False) -> LoadedHead:
        """Load a head from ``<root>/<path>``; ``replace`` allows swapping an existing name."""
        try:
            head = self._load(self.resolve(path), name)
        except OSError as e:  # e.g. a name too long for the file system: the request's fault, not a crash
            raise HeadLoadError(f"{path[:80]!r}: cannot read this head path ({e.strerror or type(e).__name__})") from None
        with self._lock:
            if head.name in self._heads and not replace:
                raise HeadLoadError(f"a head named {head.name!r} is already loaded; swap it instead")
            self._heads = MappingProxyType({**self._heads, head.name: head})
        return head

    def swap(self, name: str, path: str) -> LoadedHead:
        if name not in self._heads:
            raise HeadNotFound(name)
        return self.load(path, name, replace=True)

    def add(self, module: DPHHead, config: HeadConfig, name: str | None = None) -> LoadedHead:
        """Register an in-memory head (tests, embedding)."""
        bad = config.backbone.mismatches(self.backbone) if self.backbone else []
        if bad:
            raise HeadLoadError(f"head {config.name!r} was trained on another backbone: " + "; ".join(bad))
        why = self.unservable(config)
        if why:
            raise HeadLoadError(why)
        head = LoadedHead(name or config.name, module.eval().requires_grad_(False).to(self.device), config, "<memory>")
        with self._lock:
            self._heads = MappingProxyType({**self._heads, head.name: head})
        return head

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self._heads:
                raise HeadNotFound(name)
            self._heads = MappingProxyType({k: v for k, v in self._heads.items() if k != name})

    def _entries(self) -> dict[str, tuple[tuple[str, int, int], ...]]:
        """Top-level head directories under root -> a signature of their two files (mtime, size). A directory that
        vanishes or changes while it is read is left out of this scan (the next one sees it), never an error."""
        out: dict[str, tuple[tuple[str, int, int], ...]] = {}
        if self.root is None or not self.root.is_dir():
            return out
        for entry in sorted(self.root.iterdir()):
            try:
                if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir() or not (entry / CONFIG_FILE).exists():
                    continue
                out[entry.name] = tuple(sorted((f.name, (st := f.stat()).st_mtime_ns, st.st_size) for f in entry.iterdir()))
            except OSError:
                continue
        return out

    def load_all(self) -> tuple[list[str], dict[str, str]]:
        """Load every head directory under root at start-up; returns (loaded, {dir: error})."""
        loaded, errors = [], {}
        for name, sig in self._entries().items():
            try:
                loaded.append(self.load(name).name)
                self._synced[name] = sig
            except (HeadLoadError, OSError) as e:
                errors[name] = str(e)
        return loaded, errors

    def sync(self) -> dict[str, list[str]]:
        """Make the loaded heads follow the heads directory (replicas sharing one directory stay in step).

        A new top-level head directory is loaded, a changed one swapped in (validated first: a broken version
        leaves the old one serving), one removed (missing from two scans in a row) unloaded. Only heads that load_all / sync loaded from their own
        top-level directory are managed; heads loaded through the admin API from other paths are left alone.
        Returns {"added", "swapped", "removed", "errors"}."""
        out: dict[str, list[str]] = {"added": [], "swapped": [], "removed": [], "errors": []}
        now = self._entries()
        gone = set(self._synced) - set(now)
        # A directory missing from one scan may be mid-replacement (two renames where the exchange is not
        # available, a copy tool): it is unloaded only when the next scan misses it too.
        for d in sorted(gone & self._missing):
            del self._synced[d]
            for name, head in list(self._heads.items()):
                if head.path == d:
                    self.unload(name)
                    out["removed"].append(name)
        self._missing = gone - self._missing
        for d, sig in now.items():
            if self._synced.get(d) == sig:
                continue
            try:
                current = next((n for n, h in self._heads.items() if h.path == d), None)
                head = self.load(d, current, replace=current is not None)
                out["swapped" if current else "added"].append(head.name)
            except Exception as e:  # one bad head never stops the scan: the heads after it still sync
                out["errors"].append(f"{d}: {e}")
            self._synced[d] = sig  # a broken version is not retried until its files change again
        return out
