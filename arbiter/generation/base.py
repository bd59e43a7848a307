"""The engine interface: sample N candidates per prompt in one batch, and score answers in one pass.

It fits both backends: the HF engine captures the reward features inside its own decode loop (one extra
decode step feeding ``<|im_end|>``); the vLLM engine samples with vLLM's ``n`` and computes the features
in a separate pooling pass over the finished candidates (``features``).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import torch

from arbiter.chat import answer_ids, prompt_ids
from arbiter.heads import BackboneFingerprint

if TYPE_CHECKING:
    from arbiter.generation.adapters import AdapterSet
    from arbiter.structured import StructuredOutput


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # OpenAI's sampler adjustments, applied to the logits before temperature / top-p:
    # logits[j] += bias[j]; logits[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty,
    # count = how often token j was already generated in this candidate.
    logit_bias: tuple[tuple[int, float], ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # None: no log-probs. k >= 0: each generated token's log-prob and the k most likely alternatives,
    # under the adjusted logits (bias and penalties applied, before temperature and top-p).
    logprobs: int | None = None
    # OpenAI's response_format json_object / json_schema: every candidate constrained to it (engines with
    # ``structured``; arbiter.structured). None: free text.
    structured: StructuredOutput | None = None
    # vLLM's include_stop_str_in_output: the stop string that ends a candidate stays at the end of its text.
    include_stop: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-prob), most likely first


# Streaming callback, called from the worker thread as text becomes final:
# (candidate index, text delta, log-probs of the tokens generated since the last call or None).
DeltaCallback = Callable[[int, str, "list[TokenLogprob] | None"], None]


def candidate_seed(request_seed: int, index: int) -> int:
    """THE per-candidate seed rule of every engine: candidate ``index`` of a request seeded ``request_seed`` draws
    from a generator seeded ``request_seed * 1_000_003 + index``, so candidate i never depends on N (and adaptive
    rounds continue the sequence)."""
    return (request_seed * 1_000_003 + index) % (2**63 - 1)


@dataclass(frozen=True)
class PruneSpec:
    """Early rejection (docs/features.md, "Pruning"): when a job's live candidates have generated ``at[i]`` tokens,
    the picking head (``GenerationJob.heads[0]``) scores each one's prefix (``close``: as a closed answer; else from
    the hidden state the decode loop already holds at its last token), and only the best ``ceil(keep x live)`` go on,
    never leaving fewer than ``min_keep`` candidates in all (finished ones count). ``keep == 1`` records the
    partial rewards and drops nothing."""

    at: tuple[int, ...]  # checkpoints, tokens generated per candidate, ascending
    keep: float  # share of the live candidates kept at each checkpoint, in (0, 1]
    min_keep: int = 1  # candidates (finished + live) that always survive: at least the request's n
    # True: score each prefix as a closed answer (one extra decode step per checkpoint feeds the closing token, the
    # position the heads were trained on; the cache is cut back after it). False: the state at the prefix's last
    # token, free.
    close: bool = True

    def survivors(self, live: int, finished: int) -> int:
        """How many of ``live`` candidates go on past a checkpoint when ``finished`` others already ended."""
        return min(live, max(math.ceil(self.keep * live - 1e-9), self.min_keep - finished, 0))

    def dropped(self, rewards: Sequence[float], order: Sequence[int], finished: int) -> list[int]:
        """THE ranking rule at a checkpoint: positions (into ``rewards``) of the live candidates that stop, the
        lowest partial rewards first dropped, ties to the higher ``order`` (candidate index); ``survivors`` go on."""
        ranked = sorted(range(len(rewards)), key=lambda i: (-rewards[i], order[i]))
        return ranked[self.survivors(len(rewards), finished):]


def checkpoints_valid(at: Sequence[float], low: float = 1, high: float = float("inf")) -> bool:
    """Checkpoints are distinct and ascending, each in [low, high) (token counts: >= 1; fractions: (0, 1))."""
    return list(at) == sorted(set(at)) and all(low <= t < high for t in at)


@dataclass
class GenerationJob:
    """One request's share of a generation batch."""

    prompt_ids: list[int]
    n: int
    params: SamplingParams
    feature_layers: tuple[int, ...] = ()  # () = plain sampling, no reward features needed
    on_delta: DeltaCallback | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Candidate i of this job is seeded as candidate first_index + i of the request (adaptive rounds continue
    # the request's candidate sequence instead of repeating its first candidates).
    first_index: int = 0
    adapter: str | None = None  # a switchable LoRA adapter (ARBITER_ADAPTERS) by name; None = the base model
    # The heads that will score this job's candidates (LoadedHead objects, pinned: a head swapped meanwhile stays
    # the one this job reads). An engine that computes rewards itself (the vLLM engine) fills Candidate.rewards.
    heads: tuple[Any, ...] = ()
    prune: PruneSpec | None = None  # early rejection by the first head's partial rewards (engines with ``prunes``)
    confidence: ConfidenceSpec | None = None  # each candidate's confidence (Candidate.confidence), DeepConf's stop


@dataclass(frozen=True)
class ConfidenceSpec:
    """A job's per-candidate confidence (``arbiter.confidence``: mean log-prob, DeepConf token and group confidences,
    self-certainty), computed while decoding. ``stop_below``: DeepConf's online stop (arXiv 2508.15260): a candidate
    whose last full window of ``window`` tokens has a mean token confidence below it stops there (finish_reason
    "pruned", ``pruned_at`` its token count: no answer, no vote), never leaving fewer than ``min_keep`` candidates."""

    window: int = 2048  # arbiter.confidence.GROUP_WINDOW
    stop_below: float | None = None
    min_keep: int = 1


@dataclass
class Candidate:
    token_ids: list[int]  # answer tokens, without the closing <|im_end|>
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "pruned"
    features: dict[int, torch.Tensor] | None = None  # layer -> [d] at the closing <|im_end|>
    logprobs: list[TokenLogprob] | None = None  # one per answer token, when SamplingParams.logprobs is set
    # Rewards the engine computed itself, one per head of the job (its ``heads`` order); None where that head is
    # to be scored from ``features`` (the serving layer's arbiter.service.rerank.score_candidates reads both).
    rewards: tuple[float | None, ...] | None = None
    # Pruning (GenerationJob.prune): the picking head's reward of this candidate's prefix at each checkpoint it
    # reached alive, as (tokens, reward); ``pruned_at`` is the checkpoint that dropped it (finish_reason "pruned").
    partial_rewards: list[tuple[int, float]] | None = None
    pruned_at: int | None = None
    confidence: Any = None  # arbiter.confidence.Confidence of the answer tokens (GenerationJob.confidence)

    @property
    def pruned(self) -> bool:
        """Dropped at a checkpoint: no final feature or reward, no vote, never picked."""
        return self.finish_reason == "pruned"


@dataclass
class GenerationResult:
    candidates: list[Candidate]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.candidates)


# Continuous batching (worker <-> engine): admit(rows in the running batch) -> new jobs to merge in;
# deliver(job, result or the exception that failed it) as soon as that job's rows are done.
Admit = Callable[[int], "Sequence[GenerationJob]"]
Deliver = Callable[["GenerationJob", "GenerationResult | BaseException"], None]


class Engine(Protocol):
    """What the serving layer needs of an engine. The HF and vLLM engines subclass it (and inherit the encoding
    methods, which are THE chat encoding of ``arbiter.chat``); a test double may too."""

    model_name: str
    tokenizer: Any  # a transformers tokenizer: the chat template, encode / decode (arbiter.chat uses it)
    fingerprint: BackboneFingerprint
    context_length: int
    end_id: int
    vocab_size: int  # logits per position (token ids 0 .. vocab_size - 1)
    adapter_name: str | None  # the LoRA adapter merged into the served weights (ARBITER_ADAPTER); None: the base
    adapters: AdapterSet | None  # switchable LoRA adapters (ARBITER_ADAPTERS, HF engine); None: none supported
    continuous: bool = False  # generate() takes admit / deliver: queued jobs join the running batch
    prunes: bool = False  # honours GenerationJob.prune (partial rewards from the decode loop: the HF engine)
    structured: bool = False  # honours SamplingParams.structured (constrained decoding: the HF and vLLM engines)
    dtype: str | None = None  # the dtype the model runs in ("float32", "bfloat16", ...); None: not known

    def encode_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Prompt token ids of OpenAI-style messages, ending with the assistant header (docs/features.md)."""
        return prompt_ids(self.tokenizer, messages)

    def encode_answer(self, text: str) -> list[int]:
        """Token ids of an assistant answer, without the closing token (the feature passes add it)."""
        return answer_ids(self.tokenizer, text, self.end_id, close=False)

    def supported_features(self) -> frozenset[int] | None:
        """The layers whose head features this engine computes (-1: after the final norm); None: every layer."""
        return None

    def kv_bytes_per_token(self) -> int | None:
        """Bytes of KV cache one sequence position of one row costs in this engine's own memory, which sizes the
        default token budget (ARBITER_MAX_BATCH_TOKENS); None: the engine bounds its KV memory itself (vLLM)."""
        return None

    def generate(self, jobs: Sequence[GenerationJob], *, admit: Admit | None = None,
                 deliver: Deliver | None = None) -> Sequence[GenerationResult | BaseException]:
        """Sample every job's n candidates in one batch; features for jobs that ask for them. ``admit`` /
        ``deliver``: continuous batching (see above); a job's entry is its result or the error that failed it."""

    def features(self, prompt_ids: Sequence[list[int]], answer_ids: Sequence[list[int]], layers: Sequence[int], *,
                 cancelled: Callable[[], bool] | None = None, adapter: str | None = None) -> dict[int, torch.Tensor]:
        """Head features of complete answers (closed by <|im_end|> here): layer -> [N, d], one batched pass.

        ``cancelled`` is polled while the pass runs; once it returns True the pass stops and raises
        ``Abandoned`` (the requests it served are gone: a deadline passed or the clients left)."""
        raise NotImplementedError

    def prompt_logprobs(self, ids: Sequence[int], top_k: int, *, adapter: str | None = None) -> list[TokenLogprob | None]:
        """Per position of ``ids``, the log-prob of its token given the ones before, with the ``top_k`` most likely
        tokens there (None for the first position: nothing predicts it); the model's own distribution (temperature
        1, no bias). One teacher-forced forward."""
        raise NotImplementedError

    def score(self, prompt_ids: Sequence[list[int]], answer_ids: Sequence[list[int]], heads: Sequence[Any], *,
              cancelled: Callable[[], bool] | None = None, adapter: str | None = None) -> torch.Tensor:
        """Rewards [N, H] (float32, CPU) of complete answers under ``heads`` (LoadedHead objects): by default the
        feature pass of every layer they read, then each head (``arbiter.heads.head_rewards``); an engine that
        computes rewards itself overrides it."""
        from arbiter.heads import head_rewards

        layers = sorted({h.config.layer for h in heads})
        feats = self.features(prompt_ids, answer_ids, layers, cancelled=cancelled, adapter=adapter)
        if not heads:
            return torch.zeros(len(prompt_ids), 0)
        return torch.stack([head_rewards(h.module, feats[h.config.layer]) for h in heads], dim=1)  # [N, H]


class JobError(ValueError):
    """An engine refused one job's parameters; only that request fails (400), never its batch."""


class AdapterGone(JobError):
    """The job's adapter was unloaded while the job waited in the queue (404, like a request naming it now)."""


class Abandoned(Exception):
    """A feature pass stopped because nobody waits for its result any more."""
