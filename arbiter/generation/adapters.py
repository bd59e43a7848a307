"""Several LoRA adapters on one base model (``ARBITER_ADAPTERS=name=dir,...``), switched per batch.

A request picks an adapter by ``model`` (as vLLM does). The HF engine batches requests per adapter: before a
batch runs, ``activate(name)`` makes the model's weights exactly base + scale * B @ A of that adapter (or the
base for None). Switching restores the pristine base weights of every module the previous adapter touched from
a copy taken when an adapter first touched it, so any number of switches never drifts from the base (no
subtract-and-add rounding). The copy costs one weight matrix per adapted module.

Heads trained on an adapter's hidden states record it (``provenance.adapter``); routes refuse a head whose adapter
is not the request's (``head_adapter``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class AdapterNotLoaded(KeyError):
    pass


class AdapterBusy(RuntimeError):
    """An unload that waited its bound for the adapter's running batch (the admin API answers 409)."""


@dataclass
class LoadedAdapter:
    name: str
    path: str
    deltas: list[tuple[str, torch.Tensor, torch.Tensor, float]] = field(repr=False)  # (module, A, B, scale)
    info: dict[str, Any] = field(default_factory=dict)


class AdapterSet:
    def __init__(self, model: Any):
        self.model = model
        self._modules = dict(model.named_modules())
        self._pristine: dict[str, torch.Tensor] = {}  # module -> base weight, copied on first touch
        self._adapters: dict[str, LoadedAdapter] = {}
        self.active: str | None = None
        self._touched: set[str] = set()  # modules whose weights differ from the base now
        self._lock = threading.RLock()
        self._draining: set[str] = set()  # adapters an unload is waiting for

    def names(self) -> list[str]:
        return sorted(self._adapters)

    def get(self, name: str) -> LoadedAdapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise AdapterNotLoaded(name) from None

    def load(self, name: str, path: str | Path, *, shown: str | None = None) -> LoadedAdapter:
        """Parse and check the adapter (arbiter.backbone.read_lora; ``shown`` names it in errors); nothing changes
        on error."""
        from arbiter.backbone import read_lora

        info, deltas = read_lora(self.model, path, shown=shown)
        dev = next(self.model.parameters()).device
        ad = LoadedAdapter(name, str(Path(path).resolve()),
                           [(m, a.float().to(dev), b.float().to(dev), s) for m, a, b, s in deltas], info)
        with self._lock:
            self._adapters[name] = ad
        return ad

    @property
    def lock(self) -> threading.RLock:
        """Held by the engine for a whole batch: the weights stay one adapter's while it runs."""
        return self._lock

    def draining(self, name: str | None) -> bool:
        """Whether an unload of ``name`` is waiting: the worker then admits no more requests for it into the
        running batch, so the batch drains and the unload gets the lock."""
        return name is not None and name in self._draining

    def unload(self, name: str, *, wait_s: float | None = None) -> None:
        """Remove adapter ``name`` once no batch runs on it. With ``wait_s``, give up after that long
        (``AdapterBusy``) instead of waiting for a batch that steady traffic keeps alive."""
        self.get(name)
        self._draining.add(name)
        try:
            if not self._lock.acquire(timeout=-1 if wait_s is None else wait_s):
                raise AdapterBusy(f"adapter {name!r} is still serving a batch after {wait_s:g} s; retry the unload")
            try:
                self.get(name)
                if self.active == name:
                    self.activate(None)
                del self._adapters[name]
            finally:
                self._lock.release()
        finally:
            self._draining.discard(name)

    @torch.no_grad()
    def activate(self, name: str | None) -> None:
        """Make the weights those of adapter ``name`` (None: the base model)."""
        with self._lock:
            if name == self.active:
                return
            target = self.get(name) if name is not None else None
            for m in self._touched:  # back to the exact base weights
                self._modules[m].weight.copy_(self._pristine[m])
            self._touched = set()
            self.active = None
            if target is not None:
                for m, a, b, scale in target.deltas:
                    w = self._modules[m].weight
                    if m not in self._pristine:
                        self._pristine[m] = w.detach().clone()
                    w.add_(((b @ a) * scale).to(w.dtype))  # [out, r] @ [r, in] -> [out, in]
                    self._touched.add(m)
                self.active = name
