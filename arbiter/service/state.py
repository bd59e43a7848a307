"""The service's runtime state, held on ``app.state.arbiter``."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from arbiter import __version__
from arbiter.heads import HeadRegistry

from .metrics import Metrics
from .settings import Settings
from .tokens import TokenText

if TYPE_CHECKING:
    from arbiter.generation.base import Engine

    from .worker import Worker



T = TypeVar("T")


def _ready(value: T | None, what: str) -> T:
    if value is None:
        raise RuntimeError(f"{what} is not ready yet (routes check readiness first)")
    return value

@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    registry: HeadRegistry | None = None
    engine: Engine | None = None
    worker: Worker | None = None
    load_error: str | None = None
    model_id: str = ""
    model_aliases: frozenset[str] = frozenset()
    system_fingerprint: str = ""
    started: int = field(default_factory=lambda: int(time.time()))
    head_load_errors: dict[str, str] = field(default_factory=dict)
    token_text: TokenText | None = None
    vocab_size: int = 0  # logits per position: the range logit_bias keys must fall in
    stopping: threading.Event = field(default_factory=threading.Event)  # set at shutdown (background threads end)

    def default_head(self) -> str | None:
        if self.registry is None:
            return None
        names = self.registry.names()
        if self.settings.default_head in names:
            return self.settings.default_head
        return names[0] if names else None

    # Typed access for code that runs only once the service is ready (routes check readiness first).
    def require_engine(self) -> Engine:
        return _ready(self.engine, "the engine")

    def require_worker(self) -> Worker:
        return _ready(self.worker, "the engine worker")

    def require_registry(self) -> HeadRegistry:
        return _ready(self.registry, "the head registry")

    def require_token_text(self) -> TokenText:
        return _ready(self.token_text, "the engine's token text")

    def bind_engine(self, engine: Engine) -> None:
        self.engine = engine
        self.model_id = self.settings.served_model_name or engine.model_name
        self.model_aliases = frozenset({engine.model_name, self.model_id})
        self.system_fingerprint = f"arbiter-{__version__}-{engine.fingerprint.vocab_hash[:8]}"
        self.token_text = TokenText(engine.tokenizer)
        self.vocab_size = int(engine.vocab_size)
