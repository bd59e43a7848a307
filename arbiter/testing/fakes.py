"""Test doubles for the service: a scripted ``FakeEngine`` (the Engine protocol of
``arbiter/generation/base.py``), heads with known weights, and a uvicorn server in a background thread.

With the fake engine every candidate's text and feature vector are known in advance, so a head with known
weights gives known rewards and the tests can check the exact argmax, tie-breaking, batching, back-pressure
and cancellation without a model. The fake tokenizer is character level (id = code point), so prompt and
answer token ids decode back exactly.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from arbiter.generation.base import Candidate, Engine, GenerationJob, GenerationResult, TokenLogprob
from arbiter.heads import BackboneFingerprint, HeadConfig, HeadRegistry, build_head, save_head

LOOPBACK = "127.0.0.1"
FAKE_D = 4
FAKE_FINGERPRINT = BackboneFingerprint(model_name="fake-backbone", hidden_size=FAKE_D, num_layers=3,
                                       vocab_hash="fake-vocab-0001")


class EngineCrash(BaseException):
    """Not an ``Exception``: the worker's per-batch handler lets it through, so the worker thread dies."""


# --- tokenizer -------------------------------------------------------------------------------------------


class FakeTokenizer:
    """Character-level tokenizer with a ChatML template (enough for ``arbiter.backbone.prompt_ids``)."""

    pad_token_id = 0
    eos_token_id = 2

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False, split_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


_USER_RE = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)


def last_user_message(prompt_text: str) -> str:
    found = _USER_RE.findall(prompt_text)
    return found[-1] if found else ""


# --- engine ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scripted:
    text: str
    features: tuple[float, ...]  # the layer -1 feature, [d]


DEFAULT_SCRIPT = (
    Scripted("alpha", (0.1, 0.0, 0.0, 0.0)),
    Scripted("bravo", (0.5, 0.2, 0.0, 0.0)),
    Scripted("charlie", (0.3, 0.9, 0.0, 0.0)),
    Scripted("delta", (0.5, -0.4, 0.0, 0.0)),
)


class FakeEngine(Engine):
    """Scripted engine: job row ``i`` gets ``script[i % len(script)]`` (or, with ``echo``, the text
    ``"<last user message>#<i>"``); its features are known (``feature(text, layer)``), those of answer prefixes
    too where ``prefixes`` gives them (pruning: ``GenerationJob.prune``, one character per token). With
    ``GenerationJob.confidence``, character t of a candidate's text has DeepConf confidence c_t (``token_confidence``
    per text, else 1.0), log-prob -1 / c_t and self-certainty c_t / 2, accumulated as the HF engine's decode loop
    does (``arbiter.confidence.Trace``, with its online stop), so every confidence a test sees is worked by hand.

    Records every generation batch (``batches``: one list of jobs per ``generate`` call) and every feature
    pass (``feature_calls``). With ``gate`` set, ``generate`` emits the first half of each streaming row's
    text, then blocks until the gate opens, polling the jobs' ``cancelled`` flags (``cancel_seen`` is set
    when one is seen; a batch whose jobs are all cancelled returns at once). ``die`` raises ``EngineCrash``
    (worker death), ``fail`` raises ``RuntimeError`` (one failed batch).
    """

    def __init__(self, script: Sequence[Scripted] = DEFAULT_SCRIPT, *, fingerprint: BackboneFingerprint = FAKE_FINGERPRINT,
                 model_name: str = "fake-backbone", context_length: int = 4096, echo: bool = False,
                 gate: threading.Event | None = None, die: bool = False, fail: bool = False,
                 prefixes: dict[str, Sequence[float]] | None = None,
                 token_confidence: dict[str, Sequence[float]] | None = None):
        self.script = list(script)
        self.fingerprint = fingerprint
        self.model_name = model_name
        self.context_length = context_length
        self.end_id = 2
        self.vocab_size = 0x110000  # one token per Unicode code point
        self.tokenizer = FakeTokenizer()
        self.adapter_name = None
        self.adapters = None
        self.echo = echo
        self.gate = gate
        self.die = die
        self.fail = fail
        self.batches: list[list[GenerationJob]] = []
        self.feature_calls: list[tuple[int, tuple[int, ...]]] = []  # (rows, layers)
        self.started = threading.Event()  # set when a generate call begins
        self.cancel_seen = threading.Event()
        self._by_text = {s.text: torch.tensor(s.features, dtype=torch.float32) for s in self.script}
        # Known features of answer prefixes (what pruning scores at a checkpoint); others hash like any text.
        self._by_text.update({t: torch.tensor(list(v), dtype=torch.float32) for t, v in (prefixes or {}).items()})
        self.token_confidence = {t: list(v) for t, v in (token_confidence or {}).items()}

    # -- known features ------------------------------------------------------------------------------
    def feature(self, text: str, layer: int = -1) -> torch.Tensor:
        """The feature of an answer: the scripted vector, or a fixed hash of the text; [d].

        Block ``l >= 0`` reads ``(l + 2) *`` the layer -1 vector, so heads on different layers score differently.
        """
        d = self.fingerprint.hidden_size
        v = self._by_text.get(text)
        if v is None:
            raw = hashlib.sha256(text.encode("utf-8")).digest()
            v = torch.tensor([raw[k % len(raw)] / 127.5 - 1.0 for k in range(d)], dtype=torch.float32)  # [d]
        return v.clone() if layer < 0 else v * float(layer + 2)

    # -- Engine protocol -------------------------------------------------------------------------------
    def _row(self, job: GenerationJob, i: int) -> tuple[str, str]:
        if self.echo:
            text = f"{last_user_message(self.tokenizer.decode(job.prompt_ids))}#{i}"
        else:
            text = self.script[i % len(self.script)].text
        finish = "stop"
        cuts = [(text.find(s), -len(s)) for s in job.params.stop if s in text]
        if cuts:
            at, neg_len = min(cuts)
            text = text[: at - neg_len if job.params.include_stop else at]
        elif len(text) > job.params.max_tokens:
            text, finish = text[: job.params.max_tokens], "length"
        return text, finish

    def generate(self, jobs: Sequence[GenerationJob], *, admit: Any = None, deliver: Any = None) -> list[GenerationResult]:
        self.batches.append(list(jobs))
        self.started.set()
        if self.die:
            raise EngineCrash("the fake engine's worker thread dies here")
        if self.fail:
            raise RuntimeError("the fake engine failed this batch")
        rows = {id(job): [self._row(job, job.first_index + i) for i in range(job.n)] for job in jobs}
        emitted = {id(job): [0] * job.n for job in jobs}
        if self.gate is not None:
            for job in jobs:  # streaming rows show progress before the engine blocks
                if job.on_delta is not None:
                    for i, (text, _) in enumerate(rows[id(job)]):
                        half = len(text) // 2
                        if half:
                            job.on_delta(i, text[:half], None)
                            emitted[id(job)][i] = half
            while not self.gate.wait(0.01):
                cancelled = [job.cancelled.is_set() for job in jobs]
                if any(cancelled):
                    self.cancel_seen.set()
                if all(cancelled):  # like the HF engine: cancelled rows leave, nothing left to wait for
                    break
        results = []
        for job in jobs:
            if job.cancelled.is_set():
                self.cancel_seen.set()
                results.append(GenerationResult([Candidate([], "", "cancelled") for _ in range(job.n)], len(job.prompt_ids)))
                continue
            cands = []
            for i, (text, finish) in enumerate(rows[id(job)]):
                if job.on_delta is not None and len(text) > emitted[id(job)][i]:
                    job.on_delta(i, text[emitted[id(job)][i]:], None)
                feats = {l: self.feature(text, l) for l in job.feature_layers} if job.feature_layers else None
                cands.append(Candidate(self.tokenizer(text)["input_ids"], text, finish, feats))
            if job.prune is not None:
                self._prune(job, cands)
            if job.confidence is not None:
                self._confidence(job, cands)
            elif job.params.logprobs is not None:  # the same per-token log-probs, -1 / c_t (class docstring)
                for c in cands:
                    conf = self.token_confidence.get(c.text, [1.0] * len(c.text))
                    c.logprobs = [TokenLogprob(t, -1.0 / x) for t, x in zip(c.token_ids, conf)]
            results.append(GenerationResult(cands, len(job.prompt_ids)))
        return results

    def _confidence(self, job: GenerationJob, cands: list[Candidate]) -> None:
        """Each candidate's confidence, character by character (class docstring), and DeepConf's online stop as the
        HF engine applies it: candidates decode in step, so at token t every live one adds its t-th confidence and
        one whose last full window falls below ``stop_below`` stops there, unless that leaves fewer than
        ``min_keep``."""
        from arbiter.confidence import Trace

        spec = job.confidence
        assert spec is not None
        traces = [Trace(spec.window) for _ in cands]
        stopped = 0
        for t in range(max((len(c.text) for c in cands), default=0)):
            for c, tr in zip(cands, traces):
                if t >= len(c.text) or c.pruned:
                    continue
                ct = self.token_confidence.get(c.text, [1.0] * len(c.text))[t]
                tr.add(-1.0 / ct, ct, ct / 2)
                g = tr.group()
                if (spec.stop_below is not None and g is not None and g < spec.stop_below
                        and len(cands) - stopped - 1 >= spec.min_keep):
                    c.text, c.token_ids = c.text[: t + 1], c.token_ids[: t + 1]
                    c.finish_reason, c.pruned_at, c.features = "pruned", t + 1, None
                    stopped += 1
        for c, tr in zip(cands, traces):
            c.confidence = tr.summary()
            if job.params.logprobs is not None:  # each token's log-prob as the trace saw it (no alternatives listed)
                c.logprobs = [TokenLogprob(t, lp) for t, lp in zip(c.token_ids, tr.logprob)]

    prunes = True

    def _prune(self, job: GenerationJob, cands: list[Candidate]) -> None:
        """Pruning as the HF engine's decode loop does it (one token = one character here): at checkpoint t, the
        candidates still generating (t characters out and not cut there by max_tokens) get the picking head's
        reward of their first t characters' feature; ``PruneSpec.dropped`` says which go."""
        from arbiter.heads import head_rewards

        spec, head = job.prune, job.heads[0]
        assert spec is not None
        for c in cands:
            c.partial_rewards = []
        for t in spec.at:
            live = [i for i, c in enumerate(cands) if c.pruned_at is None
                    and (len(c.text) > t or (len(c.text) == t and c.finish_reason == "stop"))]
            if not live:
                continue
            got = head_rewards(head.module, torch.stack([self.feature(cands[i].text[:t], head.config.layer) for i in live])).tolist()
            for i, r in zip(live, got):
                cands[i].partial_rewards.append((t, r))  # type: ignore[union-attr]
            pruned = sum(1 for c in cands if c.pruned_at is not None)
            for k in spec.dropped(got, live, len(cands) - len(live) - pruned):
                c = cands[live[k]]
                c.text, c.token_ids = c.text[:t], c.token_ids[:t]
                c.finish_reason, c.pruned_at, c.features = "pruned", t, None

    def prompt_logprobs(self, ids, top_k, *, adapter=None) -> list:
        """Known prompt log-probs: position t (> 0) has -0.1 x (1 + token id mod 5), itself its only alternative."""
        return [None] + [TokenLogprob(int(t), -0.1 * (1 + int(t) % 5), ((int(t), -0.1 * (1 + int(t) % 5)),)[:top_k])
                         for t in list(ids)[1:]]

    def features(self, prompt_ids, answer_ids, layers, *, cancelled=None, adapter=None) -> dict[int, torch.Tensor]:
        layers = sorted(set(layers) | {-1})
        self.feature_calls.append((len(answer_ids), tuple(layers)))
        texts = [self.tokenizer.decode(a) for a in answer_ids]
        return {l: torch.stack([self.feature(t, l) for t in texts]) if texts else torch.empty(0, FAKE_D)
                for l in layers}  # layer -> [N, d]


# --- heads -----------------------------------------------------------------------------------------------


def linear_head(name: str, weights: Sequence[float], *, fp: BackboneFingerprint = FAKE_FINGERPRINT, layer: int = -1):
    """An identity-pooler head whose reward is exactly ``weights . feature``; returns (module, config)."""
    cfg = HeadConfig(name=name, backbone=fp, hidden_size=fp.hidden_size, layer=layer, pooler="identity")
    head = build_head(cfg)
    with torch.no_grad():
        head.reward.weight.copy_(torch.tensor([list(weights)], dtype=torch.float32))  # [1, d]
    return head, cfg


def registry_with(*heads, fp: BackboneFingerprint = FAKE_FINGERPRINT, root: str | Path | None = None) -> HeadRegistry:
    """A registry holding the given (module, config) pairs in memory."""
    reg = HeadRegistry(root, fp)
    for module, cfg in heads:
        reg.add(module, cfg)
    return reg


def save_random_head(fp: BackboneFingerprint, directory: str | Path, *, name: str, pooler: str = "identity",
                     layer: int = -1, ffn_size: int | None = None, seed: int = 0, scale: float = 1.0):
    """Save a head with seeded random weights (reward weights scaled up so rewards spread); returns its module."""
    cfg = HeadConfig(name=name, backbone=fp, hidden_size=fp.hidden_size, pooler=pooler, layer=layer,
                     ffn_size=ffn_size, provenance={"made_by": "arbiter.testing.fakes", "seed": seed})
    g = torch.Generator().manual_seed(seed)
    head = build_head(cfg)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() > 1 else 0.01))
        head.reward.weight.mul_(scale)
    save_head(head, cfg, directory)
    return head.eval()


# --- a live server in a thread ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread; ``url`` is its base URL."""

    def __init__(self, app, *, start_timeout_s: float = 30.0):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        config = uvicorn.Config(app, host=LOOPBACK, port=self.port, log_level="warning", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.start_timeout_s = start_timeout_s

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the test server thread exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        if self.thread.is_alive():  # a request that never finishes must not hang the test session
            self.server.force_exit = True
            self.thread.join(5)

    @property
    def state(self):
        return self.app.state.arbiter


# --- a live `arbiter serve` process on the real model ------------------------------------------------------


def process_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and its children (vLLM's engine core is a child); 0 once it is gone."""
    import psutil

    try:
        p = psutil.Process(pid)
        total = p.memory_info().rss
        for c in p.children(recursive=True):
            try:
                total += c.memory_info().rss
            except psutil.Error:
                pass
        return int(total)
    except psutil.Error:
        return 0


class ArbiterProcess:
    """The real ``arbiter serve`` CLI as a subprocess on 127.0.0.1 (settings from ARBITER_* variables; the
    caller's ARBITER_* variables other than the model and cache are dropped). ``with`` starts it and waits
    for /health 200 (checking that it answers 503 "loading" meanwhile); leaving stops it."""

    def __init__(self, heads_dir: str | Path, log: str | Path, *, env: dict[str, str] | None = None,
                 start_timeout_s: float = 240.0):
        import os
        import sys

        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.heads_dir = Path(heads_dir)
        self.log = Path(log)
        self.start_timeout_s = start_timeout_s
        keep = {"ARBITER_MODEL", "ARBITER_CACHE_DIR"}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ARBITER_") or k in keep}
        # float32: the tests compare the server's rewards with float32 references computed in the test process
        # (ARBITER_DTYPE=auto would pick bfloat16 on a CPU with AMX).
        # The device: CPU, unless ARBITER_TEST_DEVICE names another (.ci/gpu runs the vLLM tests with cuda).
        self.env.update(ARBITER_THREADS="1", ARBITER_DEVICE=os.environ.get("ARBITER_TEST_DEVICE", "cpu"),
                        ARBITER_DTYPE="float32", ARBITER_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
        self.env.update(env or {})
        self.cmd = [sys.executable, "-m", "arbiter.cli", "serve", "--host", LOOPBACK, "--port", str(self.port),
                    "--heads-dir", str(self.heads_dir)]
        self.proc: Any = None  # subprocess.Popen once started
        self.seen: list = []

    def __enter__(self) -> "ArbiterProcess":
        import subprocess

        import httpx

        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"arbiter serve exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"arbiter serve never became healthy; saw {self.seen[-3:]}:\n{self.log.read_text()[-4000:]}")
                try:
                    r = httpx.get(f"{self.url}/health", timeout=5)
                except httpx.TransportError:
                    time.sleep(0.3)
                    continue
                self.seen.append((r.status_code, r.json()))
                if r.status_code == 200:
                    return self
                # While the model loads in the background the server already answers, with 503.
                if not (r.status_code == 503 and r.json()["status"] == "loading"):
                    raise AssertionError(f"unexpected /health answer while loading: {r.status_code} {r.text}")
                time.sleep(0.3)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
