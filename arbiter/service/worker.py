"""The one worker thread that owns the model.

Requests are queued (bounded: a full queue raises ``QueueFull`` -> 429) and the worker merges every
generation request waiting at the start of a batch into one generation batch, up to
``max_batch_rows`` sequences. With an engine that supports it (``engine.continuous``: the HF engine),
batching is continuous: requests that arrive while the batch decodes join it between decode steps while
rows are free, and each request is answered as soon as its own rows finish. Score requests are batched
between generation batches. A batch is bounded by rows (``max_batch_rows``) and by tokens (``max_batch_tokens``:
rows x the longest (prompt + max_tokens), README "Memory"); a request that can never fit is refused at submit
(``OverBudget``, a 400). When the engine raises for a batch, the requests it had not answered run again one by
one, so only the culprit fails; an unrecoverable device error kills the worker (below). Results go back
to the event loop through futures; a request whose client went away is marked cancelled and dropped
before it runs, or its rows leave the batch at the next decode step.

If the worker thread itself dies, ``dead`` is set, every waiting request fails with 503, ``/health``
turns 503, and ``on_death`` asks the server to exit non-zero so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from arbiter.generation.base import Abandoned, Engine, GenerationJob, GenerationResult
from arbiter.heads import LoadedHead

from .rerank import score_candidates

log = logging.getLogger("arbiter.worker")


class QueueFull(Exception):
    pass


class WorkerDead(Exception):
    pass


class OverBudget(Exception):
    """A request that can never fit the token budget (``ARBITER_MAX_BATCH_TOKENS``): refused (400), never queued."""

    def __init__(self, needed: int, limit: int):
        super().__init__(f"this request needs {needed} batch tokens ((prompt + max_tokens) x rows), more than the "
                         f"server's ARBITER_MAX_BATCH_TOKENS={limit}")
        self.needed, self.limit = needed, limit


class DeviceLost(BaseException):
    """An error the device does not recover from (CUDA's sticky errors): the worker dies and the server exits
    non-zero, so a supervisor restarts it. A BaseException: the batch handler must not treat it as one bad batch."""


def is_fatal(e: BaseException) -> bool:
    """CUDA reports an illegal address / device-side assert once and then fails every later call in the process
    (a "sticky" error): only a restart recovers."""
    name = type(e).__name__
    text = str(e)
    return name == "AcceleratorError" or "CUDA error" in text or "device-side assert" in text \
        or "CUBLAS_STATUS" in text or "cudaErrorIllegalAddress" in text


@dataclass
class _Item:
    kind: str  # "generate" | "score" | "prompt_logprobs"
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    job: GenerationJob | None = None
    heads: Sequence[LoadedHead] = ()
    score_args: tuple[list[int], list[list[int]]] | None = None
    score_adapter: str | None = None
    top_k: int = 0  # prompt_logprobs: alternatives per position
    enqueued: float = field(default_factory=time.monotonic)
    streamed: bool = False  # text already went to the client: a failed batch cannot re-run this job unseen

    @property
    def span(self) -> int:
        """Positions one row of this request may occupy: prompt + max_tokens + the closing token (generation),
        the longest prompt + answer + closing token (scoring)."""
        if self.job is not None:
            return len(self.job.prompt_ids) + self.job.params.max_tokens + 1
        assert self.score_args is not None
        p, ans = self.score_args
        return len(p) + max((len(a) for a in ans), default=0) + 1

    @property
    def adapter(self) -> str | None:
        return self.job.adapter if self.job else self.score_adapter

    @property
    def rows(self) -> int:
        if self.job is not None:
            return self.job.n
        assert self.score_args is not None
        return len(self.score_args[1])

    def cancelled(self) -> bool:
        return self.future.cancelled() or (self.job is not None and self.job.cancelled.is_set())


@dataclass
class GenerateOutcome:
    result: GenerationResult
    rewards: Any  # torch.Tensor [N, H] or None
    queue_s: float
    run_s: float
    found: list[str | None] | None = None  # each candidate's extracted answer, when the rule votes (serving fills it)
    verified: dict[str, float | None] | None = None  # select=verify: each answer's canonical reward (serving fills it)


_LIBC: Any = None
TRIM_AFTER_BYTES = 256 << 20  # after a batch whose KV cache reached this, the heap is trimmed at once (~30 ms)


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``). A batch's tensors under glibc's mmap
    threshold (a layer's KV block is often tens of MB) come from the heap, and freed heap memory stays with the
    process: without this, RSS steps up to the largest batch seen and stays there
    (benchmarks/reports/soak_hf_before_trim.md: +650 MiB), and two large batches in a row need nearly twice one's
    memory. Called when the worker goes idle and after every batch whose cache reached ``TRIM_AFTER_BYTES``.
    About 30 ms; a no-op without glibc."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def batch_tokens(rows: int, span: int) -> int:
    """What a batch costs under the token budget: every row padded to the longest span (the HF engine's KV cache is
    one [rows, T] block, left padded, so a short prompt beside a long one pays the long one's length)."""
    return rows * span


class Worker:
    def __init__(self, engine: Engine, *, max_queue: int, max_batch_rows: int, metrics: Any = None,
                 on_death: Callable[[BaseException], None] | None = None, continuous: bool = True,
                 max_batch_tokens: int | None = None):
        self.engine = engine
        self.continuous = continuous and engine.continuous
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens  # None: rows alone bound a batch
        self._q: queue.Queue[_Item | None] = queue.Queue(maxsize=max_queue)
        self._pending: deque[_Item] = deque()
        self._worked = False  # a batch ran since the worker last went idle
        self._kv_per_token = engine.kv_bytes_per_token() or 0  # fixed for the engine's life: read once
        self._thread = threading.Thread(target=self._main, name="arbiter-worker", daemon=True)
        self._stop = threading.Event()
        self.dead: BaseException | None = None
        self.metrics = metrics
        self.on_death = on_death
        self.busy = False
        self._running: list[_Item] = []  # the batch in the engine now (failed too if the thread dies)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued work (graceful drain), then stop."""
        self._stop.set()
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.dead is None

    def depth(self) -> int:
        return self._q.qsize() + len(self._pending)

    # -- submitting (event loop side) --------------------------------------------------------------
    def _fits(self, rows: int, span: int, item: _Item) -> bool:
        """Whether ``item`` can join a batch of ``rows`` rows whose longest span is ``span``."""
        if rows + item.rows > self.max_batch_rows:
            return False
        return self.max_batch_tokens is None or batch_tokens(rows + item.rows, max(span, item.span)) <= self.max_batch_tokens

    def _submit(self, item: _Item) -> asyncio.Future[Any]:
        if self.dead is not None or self._stop.is_set():
            raise WorkerDead("the engine worker is not running")
        need = batch_tokens(item.rows, item.span)
        if self.max_batch_tokens is not None and need > self.max_batch_tokens:
            raise OverBudget(need, self.max_batch_tokens)
        if item.job is not None and item.job.on_delta is not None:
            emit = item.job.on_delta

            def on_delta(i: int, text: str, lps: Any = None) -> None:
                item.streamed = True
                emit(i, text, lps)

            item.job.on_delta = on_delta
        try:
            self._q.put_nowait(item)
        except queue.Full:
            raise QueueFull() from None
        if self.metrics:
            self.metrics.queue_depth.set(self.depth())
        return item.future

    def submit_generate(self, job: GenerationJob, heads: Sequence[LoadedHead] = ()) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        job.heads = tuple(heads)  # the engine may compute these heads' rewards itself (Candidate.rewards)
        return self._submit(_Item("generate", loop.create_future(), loop, job=job, heads=tuple(heads)))

    def submit_prompt_logprobs(self, ids: list[int], top_k: int, adapter: str | None = None) -> asyncio.Future[Any]:
        """Each position's log-prob of its token given the ones before (``Engine.prompt_logprobs``: what the legacy
        completions' ``echo`` with ``logprobs`` returns, and log-likelihood evaluation reads)."""
        loop = asyncio.get_running_loop()
        return self._submit(_Item("prompt_logprobs", loop.create_future(), loop, score_args=(ids, [[]]),
                                  score_adapter=adapter, top_k=top_k))

    def submit_score(self, prompt_ids: list[int], answers: list[list[int]], heads: Sequence[LoadedHead],
                     adapter: str | None = None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        return self._submit(_Item("score", loop.create_future(), loop, heads=tuple(heads), score_args=(prompt_ids, answers),
                                  score_adapter=adapter))

    # -- worker thread -----------------------------------------------------------------------------
    @staticmethod
    def _resolve(item: _Item, value: Any = None, exc: BaseException | None = None) -> None:
        def done() -> None:
            if item.future.done():
                return
            if exc is not None:
                item.future.set_exception(exc)
            else:
                item.future.set_result(value)

        try:
            item.loop.call_soon_threadsafe(done)
        except RuntimeError:  # loop closed: nobody is waiting any more
            pass

    def _next_batch(self) -> list[_Item]:
        if not self._pending and self._q.empty():
            if self._worked:
                release_free_memory()  # going idle after work: hand the batch's freed heap back (README "Memory")
                self._worked = False
        first = self._pending.popleft() if self._pending else self._q.get()
        self._worked = True
        if first is None:
            return []
        batch = [first]
        rows, span = first.rows, first.span
        while True:
            try:
                item = self._pending.popleft() if self._pending else self._q.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._stop.set()
                break
            # One batch = one kind and one adapter (the weights are switched per batch).
            if item.kind != first.kind or item.adapter != first.adapter or not self._fits(rows, span, item):
                self._pending.appendleft(item)  # first in line for the next batch (FIFO kept)
                break
            batch.append(item)
            rows, span = rows + item.rows, max(span, item.span)
        return batch

    def _main(self) -> None:
        try:
            while True:
                if self._stop.is_set() and self._q.empty() and not self._pending:
                    break
                batch = self._next_batch()
                if not batch:
                    if self._stop.is_set() and self._q.empty() and not self._pending:
                        break
                    continue
                live = [it for it in batch if not it.cancelled()]
                for it in batch:
                    if it not in live:
                        self._resolve(it, exc=asyncio.CancelledError())
                if self.metrics:
                    self.metrics.queue_depth.set(self.depth())
                if not live:
                    continue
                ads = self.engine.adapters
                while ads is not None and ads.draining(live[0].adapter):
                    time.sleep(0.005)  # an unload of this adapter is waiting for the lock: it goes first (bounded)
                self.busy = True
                self._running = live
                try:
                    if live[0].kind == "generate":
                        self._run_generate(live)
                    elif live[0].kind == "prompt_logprobs":
                        self._run_prompt_logprobs(live)
                    else:
                        self._run_score(live)
                except Exception as e:  # isolated by _run_generate; a failed score batch fails its requests
                    if is_fatal(e):
                        raise DeviceLost(f"unrecoverable device error: {e}") from e
                    log.exception("batch failed")
                    for it in live:
                        self._resolve(it, exc=e)
                finally:
                    self.busy = False
                self._running = []  # not in the finally: a dying thread still needs the list below
                if self._kv_bytes(live) >= TRIM_AFTER_BYTES:
                    release_free_memory()  # a large batch's freed cache must not stay with the process for the next
        except BaseException as e:  # the thread itself is dying: fail everything, tell the server
            self.dead = e
            log.critical("engine worker died: %r", e)
            # The batch that was in the engine fails too; its requests must not wait for their deadline.
            for it in self._running:
                self._resolve(it, exc=WorkerDead("the engine worker died"))
            self._fail_all(WorkerDead("the engine worker died"))
            if self.on_death:
                self.on_death(e)
            raise
        self._fail_all(WorkerDead("the server is shutting down"))

    def _kv_bytes(self, items: list[_Item]) -> int:
        """The KV-cache bytes a batch of ``items`` held at most (rows x longest span x the engine's bytes per token)."""
        per = self._kv_per_token
        return batch_tokens(sum(it.rows for it in items), max((it.span for it in items), default=0)) * per

    def _fail_all(self, exc: BaseException) -> None:
        while self._pending:
            self._resolve(self._pending.popleft(), exc=exc)
        while True:
            try:
                it = self._q.get_nowait()
            except queue.Empty:
                break
            if it is not None:
                self._resolve(it, exc=exc)

    def _run_generate(self, items: list[_Item]) -> None:
        """Run one generation batch; when the engine raises, isolate the culprit (below)."""
        t0 = time.monotonic()
        if self.metrics:
            self.metrics.batch_rows.observe(sum(it.rows for it in items))
        started = {id(it.job): t0 for it in items}
        by_job = {id(it.job): it for it in items}
        delivered: set[int] = set()

        def deliver(job: GenerationJob, res: GenerationResult | BaseException) -> None:
            it = by_job.get(id(job))
            if it is None:
                return
            delivered.add(id(job))
            if isinstance(res, BaseException):  # the engine refused this job alone (JobError)
                self._resolve(it, exc=res)
            else:
                self._deliver(it, res, started[id(job)])

        try:
            if not self.continuous:
                jobs = [it.job for it in items if it.job is not None]  # generate items always carry their job
                for it, res in zip(items, self.engine.generate(jobs)):
                    assert it.job is not None
                    deliver(it.job, res)
                return
            self.engine.generate([it.job for it in items if it.job is not None], admit=self._admitter(items, by_job, started, delivered),
                                 deliver=deliver)
        except Exception as e:
            if is_fatal(e):
                raise
            self._isolate([it for it in by_job.values() if id(it.job) not in delivered], e)

    def _isolate(self, undone: list[_Item], error: Exception) -> None:
        """One failure fails one request: the batch raised, so each job it had not answered yet runs again alone.
        A job whose text already streamed to its client fails with the batch's error (a re-run would repeat
        text the client holds); an error that persists for a lone job is that job's alone (500)."""
        log.error("generation batch of %d request(s) failed (%r): re-running them one by one", len(undone), error)
        for it in undone:
            if it.cancelled():
                self._resolve(it, exc=asyncio.CancelledError())
                continue
            if it.streamed:
                self._resolve(it, exc=error)
                continue
            assert it.job is not None
            t0 = time.monotonic()
            try:
                res = self.engine.generate([it.job])[0]
            except Exception as e:
                if is_fatal(e):
                    raise
                log.error("request failed alone too: %r", e)
                self._resolve(it, exc=e)
                continue
            if isinstance(res, BaseException):
                self._resolve(it, exc=res)
            else:
                self._deliver(it, res, t0)

    def _admitter(self, items: list[_Item], by_job: dict[int, _Item], started: dict[int, float],
                  delivered: set[int]) -> Callable[[int], list[GenerationJob]]:
        """Continuous batching: queued generation requests join the running batch while rows and tokens are free."""
        adapter = items[0].adapter
        adapters = self.engine.adapters

        def admit(rows_in_batch: int) -> list[GenerationJob]:
            out: list[GenerationJob] = []
            if adapters is not None and adapters.draining(adapter):
                return out  # an unload of this batch's adapter waits: let the batch drain (adapters.AdapterSet.unload)
            rows = rows_in_batch
            # The running batch's longest span: of the requests still in it (a conservative bound on its cache).
            span = max((it.span for k, it in by_job.items() if k not in delivered), default=0)
            while True:
                try:
                    it = self._pending.popleft() if self._pending else self._q.get_nowait()
                except queue.Empty:
                    break
                if it is None:  # shutdown requested: finish what runs, admit nothing more
                    self._stop.set()
                    break
                if it.cancelled():
                    self._resolve(it, exc=asyncio.CancelledError())
                    continue
                if it.kind != "generate" and it.adapter == adapter:
                    # A score pass (verify's canonical answers, /v1/score, echoed prompt log-probs) is a few small
                    # forwards: served here, between two decode steps, instead of waiting for the running batch
                    # to drain (which under continuous batching may be long): verify then costs its compute.
                    self._run_inline(it)
                    continue
                if it.kind != "generate" or it.adapter != adapter or not self._fits(rows, span, it):
                    self._pending.appendleft(it)  # first in line once the batch has room / for the next batch
                    break
                rows, span = rows + it.rows, max(span, it.span)
                assert it.job is not None
                by_job[id(it.job)] = it
                started[id(it.job)] = time.monotonic()
                self._running.append(it)
                out.append(it.job)
            if out and self.metrics:
                self.metrics.queue_depth.set(self.depth())
                self.metrics.admitted_rows.inc(sum(j.n for j in out))
            return out

        return admit

    def _deliver(self, it: _Item, res: GenerationResult, started: float) -> None:
        rewards = None
        try:
            if it.heads and res.candidates and all(c.features is not None or c.rewards is not None
                                                   for c in res.candidates if not c.pruned):
                rewards = score_candidates(res.candidates, it.heads)
                if self.metrics:
                    self.metrics.candidates_scored.inc(len(res.candidates))
        except Exception as e:
            self._resolve(it, exc=e)
            return
        self._resolve(it, GenerateOutcome(res, rewards, started - it.enqueued, time.monotonic() - started))

    def _alone(self, it: _Item, run: Callable[[], None]) -> None:
        """Run one request's work; its failure fails that request only (a lost device still stops the worker)."""
        try:
            run()
        except Exception as e:
            if is_fatal(e):
                raise
            self._resolve(it, exc=e)

    def _run_inline(self, it: _Item) -> None:
        """One score or prompt-log-prob request between decode steps; its failure is its own (never the batch's)."""
        self._alone(it, lambda: (self._run_prompt_logprobs if it.kind == "prompt_logprobs" else self._run_score)([it]))

    def _run_prompt_logprobs(self, items: list[_Item]) -> None:
        for it in items:  # one forward per prompt; a failure fails its own request only
            assert it.score_args is not None
            ids = it.score_args[0]
            self._alone(it, lambda it=it, ids=ids: self._resolve(  # type: ignore[misc]
                it, self.engine.prompt_logprobs(ids, it.top_k, adapter=it.adapter)))

    def _run_score(self, items: list[_Item]) -> None:
        # All score requests of the batch go through one engine pass (Engine.score: the feature pass and the
        # heads, or the engine's own rewards), over the union of their heads.
        prompts, answers, owners = [], [], []
        union: list[LoadedHead] = []
        for k, it in enumerate(items):
            assert it.score_args is not None
            p, ans = it.score_args
            for a in ans:
                prompts.append(p)
                answers.append(a)
                owners.append(k)
            union += [h for h in it.heads if not any(h is u for u in union)]
        try:
            # Polled inside the pass: once every request of the batch is gone (deadline or disconnect: the
            # route cancels its future), the worker stops computing instead of finishing a pass for nobody.
            all_rewards = self.engine.score(prompts, answers, union, adapter=items[0].adapter,
                                            cancelled=lambda: all(it.cancelled() for it in items))  # [N, H]
        except Abandoned:
            log.info("score pass abandoned: its %d request(s) are gone", len(items))
            for it in items:
                self._resolve(it, exc=asyncio.CancelledError())
            return
        except Exception as e:
            if is_fatal(e) or len(items) == 1:
                raise  # one request's own failure (500), or the device is gone
            log.error("score batch of %d request(s) failed (%r): re-running them one by one", len(items), e)
            for it in items:
                try:
                    self._run_score([it])
                except Exception as lone:
                    if is_fatal(lone):
                        raise
                    self._resolve(it, exc=lone)
            return
        for k, it in enumerate(items):
            idx = [i for i, o in enumerate(owners) if o == k]
            cols = [next(j for j, u in enumerate(union) if u is h) for h in it.heads]
            rewards = all_rewards[idx][:, cols]  # [n_k, H_k]
            if self.metrics:
                self.metrics.candidates_scored.inc(len(idx))
            self._resolve(it, rewards)
