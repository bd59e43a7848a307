"""The service's runtime state, held on ``app.state.arbiter``."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from arbiter import __version__
from arbiter.heads import HeadRegistry

from .metrics import Metrics
from .settings import Settings
from .tokens import TokenText


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    registry: HeadRegistry | None = None
    engine: object | None = None
    worker: object | None = None
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

    def bind_engine(self, engine) -> None:
        self.engine = engine
        self.model_id = self.settings.served_model_name or engine.model_name
        self.model_aliases = frozenset({engine.model_name, self.model_id})
        self.system_fingerprint = f"arbiter-{__version__}-{engine.fingerprint.vocab_hash[:8]}"
        self.token_text = TokenText(engine.tokenizer)
        self.vocab_size = int(engine.vocab_size)
