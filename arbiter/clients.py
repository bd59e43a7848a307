"""Arbiter's heads as another tool's reward model.

``ArbiterRewardModel``: an its_hub outcome reward model (``its_hub.api.AbstractOutcomeRewardModel``) that scores
conversations through a running server's ``POST /v1/score``, so its_hub's ``BestOfN``, beam search and particle
filtering can rank their candidates by an Arbiter head (README, "From its_hub"). Candidates that share a prompt go
in one request (one batched feature pass on the server). Needs ``its_hub`` (``pip install its-hub``); this module is
imported only by code that uses it.
"""

from __future__ import annotations

from typing import Any, Sequence

import httpx
from its_hub.api import AbstractOutcomeRewardModel


def _message(m: Any) -> dict[str, Any]:
    return m.to_dict() if hasattr(m, "to_dict") else dict(m)


def _text(content: Any) -> str:
    """A message's content as text (its_hub allows a list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


class ArbiterRewardModel(AbstractOutcomeRewardModel):  # type: ignore[misc]  # its_hub ships no types
    """Scores each conversation's last (assistant) message under ``head`` (default: the server's default head)
    given the messages before it, through ``{base_url}/v1/score``.

    ``base_url`` is the server's root or its ``/v1`` URL (what an OpenAI client is given); ``api_key`` is sent as a
    bearer token when the server has ``ARBITER_API_KEY`` set."""

    def __init__(self, base_url: str, model: str, head: str | None = None, *, api_key: str | None = None,
                 timeout: float = 120.0):
        self.url = base_url.rstrip("/").removesuffix("/v1") + "/v1/score"
        self.model = model
        self.head = head
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout

    def _groups(self, conversations: Sequence[Sequence[Any]]) -> dict[str, tuple[list[dict[str, Any]], list[int]]]:
        """Conversations by prompt (the messages before the last): (prompt messages, conversation indices)."""
        import json

        groups: dict[str, tuple[list[dict[str, Any]], list[int]]] = {}
        for i, conv in enumerate(conversations):
            msgs = [_message(m) for m in conv]
            if not msgs or msgs[-1].get("role") != "assistant":
                raise ValueError(f"conversation {i} does not end with an assistant message (the answer to score)")
            prompt = msgs[:-1]
            groups.setdefault(json.dumps(prompt, sort_keys=True), (prompt, []))[1].append(i)
        return groups

    def _body(self, prompt: list[dict[str, Any]], answers: list[str]) -> dict[str, Any]:
        return {"model": self.model, "messages": prompt, "candidates": answers,
                **({"heads": [self.head]} if self.head else {})}

    @staticmethod
    def _rewards(reply: httpx.Response) -> list[float]:
        if reply.status_code != 200:
            raise RuntimeError(f"/v1/score answered {reply.status_code}: {reply.text[:300]}")
        out = reply.json()
        head = out["heads"][0]
        return [float(item["rewards"][head]) for item in sorted(out["data"], key=lambda d: d["index"])]

    def _batch(self, messages: Any) -> tuple[list[list[Any]], bool]:
        batch = bool(messages) and isinstance(messages[0], (list, tuple))
        return (list(messages) if batch else [messages]), batch

    def score(self, messages: Any, **kwargs: Any) -> list[float] | float:
        conversations, batch = self._batch(messages)
        scores = [0.0] * len(conversations)
        with httpx.Client(timeout=self.timeout, headers=self.headers) as client:
            for prompt, idx in self._groups(conversations).values():
                answers = [_text(_message(conversations[i][-1]).get("content")) for i in idx]
                for i, r in zip(idx, self._rewards(client.post(self.url, json=self._body(prompt, answers)))):
                    scores[i] = r
        return scores if batch else scores[0]

    async def ascore(self, messages: Any, orchestrator: Any = None, **kwargs: Any) -> list[float] | float:
        import asyncio

        conversations, batch = self._batch(messages)
        scores = [0.0] * len(conversations)
        groups = list(self._groups(conversations).values())
        async with httpx.AsyncClient(timeout=self.timeout, headers=self.headers) as client:
            replies = await asyncio.gather(*[
                client.post(self.url, json=self._body(prompt, [_text(_message(conversations[i][-1]).get("content"))
                                                               for i in idx]))
                for prompt, idx in groups])
        for (_, idx), reply in zip(groups, replies):
            for i, r in zip(idx, self._rewards(reply)):
                scores[i] = r
        return scores if batch else scores[0]
