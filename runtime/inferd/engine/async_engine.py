"""The engine's one face to the server: load (`start`), validate a request (`check_prompt`),
submit it and stream its events (`generate`), abort, `stats`, swap the weights in place
(`swap_weights`, weight_swap.py), unload (`drain`, `shutdown`), and the model's tokenizer
(`encode`, `apply_chat_template`, `token_texts`). The server reaches
nothing behind it: no scheduler, block manager or runner.

The engine itself is single-threaded; one background thread owns it and runs steps while there
is work. Callers on an asyncio loop talk to it through a queue per request. Leaving the async
iterator early (a client disconnect, a cancelled task) aborts the request in the engine, so its
KV blocks are freed at the next step.

An exception anywhere in the engine thread leaves the engine in an unknown state: every request
in it fails, later ones are refused (EngineDeadError), and `on_error` tells the owner, which
decides what a dead engine means for the process (the server exits so that it is restarted).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from inferd.config import EngineConfig
from inferd.engine import weight_swap
from inferd.engine.llm_engine import InvalidRequestError, LLMEngine
from inferd.engine.scheduler import QueueFull
from inferd.engine.weight_swap import SwapInProgress, SwapJob, SwapReport, WeightSwapError, WeightSwapRolledBack
from inferd.outputs import EngineStats, StepOutput
from inferd.sampling_params import SamplingParams

__all__ = [
    "AsyncLLMEngine",
    "EngineDeadError",
    "InvalidRequestError",
    "QueueFull",
    "SwapInProgress",
    "SwapReport",
    "WeightSwapError",
    "WeightSwapRolledBack",
]

log = logging.getLogger("inferd.async")


class EngineDeadError(RuntimeError):
    pass


class Reservation:
    """Room for n sequences in the batch and the bounded queue, held from a request's admission
    until each sequence is submitted (or the request ends first): a burst admitted together cannot
    overfill the queue while its audit records are being written."""

    def __init__(self, engine: AsyncLLMEngine, n: int):
        self.engine, self.left = engine, n

    def _take_locked(self) -> None:
        if self.left:
            self.left -= 1
            self.engine._reserved -= 1

    def release(self) -> None:
        """Give back what no submitted sequence took (again: nothing)."""
        with self.engine._lock:
            self.engine._reserved -= self.left
            self.left = 0


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, on_error: Callable[[AsyncLLMEngine, BaseException], None] | None = None):
        self.engine = engine
        self.on_error = on_error
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: list[tuple[str, object, SamplingParams, str, int]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._reserved = 0  # sequences admitted, not yet submitted (Reservation)
        self._stopping = False
        self.error: BaseException | None = None
        self._swap_busy = threading.Lock()  # one swap at a time, from staging to the end
        self._swap: SwapJob | None = None  # staged, for the engine thread to carry out
        self._after_swap: SwapJob | None = None  # resumed, waiting for its first token
        self._held = None  # the scheduler's waiting sequences, aside while a swap drains
        self._last_token_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="inferd-engine", daemon=True)
        self._thread.start()

    @classmethod
    def start(
        cls, config: EngineConfig, on_error: Callable[[AsyncLLMEngine, BaseException], None] | None = None
    ) -> AsyncLLMEngine:
        """Load the model, run one warm-up generation, and start serving it. Blocks (minutes for
        a large model); raises what the load raised."""
        engine = LLMEngine(config)
        if engine.tokenizer is None:
            raise ValueError(f"{config.model} has no tokenizer.json: the server needs one")
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        return cls(engine, on_error=on_error)

    # ---- caller side (any thread or asyncio loop) -----------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_prompt(self, token_ids: list[int], max_tokens: int | None = None) -> int:
        """Raise InvalidRequestError for a prompt the engine cannot run; return the room it leaves
        for output tokens."""
        return self.engine.check_prompt(token_ids, max_tokens)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None, **variables) -> str:
        """The prompt text; `tools` and template `variables` as Tokenizer.apply_chat_template."""
        return self.engine.tokenizer.apply_chat_template(messages, tools=tools, **variables)

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's own text (logprobs report them one by one)."""
        return [self.engine.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]

    def stats(self) -> EngineStats:
        # Read from outside the engine thread: lengths and counters, a moment's snapshot.
        return self.engine.stats()

    def drain(self, timeout: float) -> None:
        """Wait until the requests in flight are done (or `timeout` passed), then shut down."""
        deadline = time.monotonic() + timeout
        while self.num_unfinished and time.monotonic() < deadline:
            time.sleep(0.05)
        self.shutdown()

    def reserve(self, n: int) -> Reservation | None:
        """Room for `n` more sequences in the batch and the bounded waiting queue, held until they
        are submitted with it (generate's `reservation`) or released; None when there is none (the
        server refuses with 429 at once; the scheduler's QueueFull is the hard bound behind this)."""
        cfg = self.engine.config
        with self._lock:
            if len(self._streams) + self._reserved + n > cfg.max_num_seqs + cfg.max_num_waiting:
                return None
            self._reserved += n
            return Reservation(self, n)

    async def generate(
        self,
        prompt,
        params: SamplingParams,
        request_id: str | None = None,
        tenant: str = "",
        priority: int = 0,
        reservation: Reservation | None = None,
    ) -> AsyncIterator[StepOutput]:
        """The request's events: a TokenEvent per step while it runs, then its RequestOutput.
        `tenant` (the API key's id) and `priority` (its class) are how the batch is shared; the
        sequence takes its place from `reservation` when given."""
        request_id = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:  # under the lock: a request is either refused here or failed by _run
            if self.error is not None:
                raise EngineDeadError(f"the engine stopped after an error: {self.error}")
            if self._stopping:  # drained for a swap or an unload: nothing would run this request
                raise EngineDeadError("the engine is shutting down (a model swap or unload): retry")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
            if reservation is not None:
                reservation._take_locked()
            self._pending.append((request_id, prompt, params, tenant, priority))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def swap_weights(
        self, path: str, drain_timeout: float = 1.0, public_key: bytes | None = None, on_staged: Callable | None = None
    ) -> SwapReport:
        """Serve the weights of the model at `path` (same architecture, shape, dtype, tokenizer)
        in place of the current ones, in this process: stage them in host memory while the old
        ones serve, drain (new requests wait; running ones go on for up to `drain_timeout`
        seconds, then are recomputed with the new weights), copy, resume. Blocks; call it off the
        event loop. WeightSwapError: refused or rolled back, the old weights serve;
        EngineDeadError: the engine stopped. `on_staged(staged)` runs once
        the swap is staged and queued for the engine thread, before the drain."""
        if not self._swap_busy.acquire(blocking=False):
            raise SwapInProgress("a weight swap is already in progress: wait for it to finish")
        try:
            if self.error is not None or self._stopping:
                raise EngineDeadError("the engine is not running: nothing to swap")
            old = self.engine.config.model
            staged = weight_swap.stage(self.engine, path, public_key)
            backup = weight_swap.snapshot(self.engine.runner.model)
            report = SwapReport(old, staged.path, staged.nbytes, staged.seconds)
            job = SwapJob(staged, backup, drain_timeout, report)
            with self._lock:
                self._swap = job
            if on_staged is not None:
                on_staged(staged)
            self._wake.set()
            while not job.done.wait(0.5):
                if not self._thread.is_alive() and not job.done.is_set():
                    raise EngineDeadError("the engine stopped during the weight swap")
            if job.error is not None:
                raise job.error
            return job.report
        finally:
            self._swap_busy.release()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.engine.close()  # tensor-parallel workers stop with the engine that leads them

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    # ---- engine thread --------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # the engine is in an unknown state: fail everything, stop
            log.exception("the engine thread failed: every request in it fails and the engine stops")
            with self._lock:
                self.error = e
                ids = list(self._streams)
            for request_id in ids:
                self._deliver(request_id, EngineDeadError(f"the engine failed: {type(e).__name__}: {e}"))
            self._end_swap(EngineDeadError(f"the engine failed during the weight swap: {type(e).__name__}: {e}"))
            if self.on_error is not None:
                self.on_error(self, e)
        self._end_swap(EngineDeadError("the engine shut down during the weight swap"))

    def _end_swap(self, error: BaseException) -> None:
        for job in (self._swap, self._after_swap):
            if job is not None and not job.done.is_set():
                job.error = job.error or error
                job.done.set()

    def _loop(self) -> None:
        engine = self.engine
        while not self._stopping:
            with self._lock:
                swap = self._swap
                pending = []
                if swap is None:  # while a swap drains, new requests wait here
                    pending, self._pending = self._pending, []
                aborts, self._aborts = self._aborts, []
            for request_id in aborts:
                engine.abort_request(request_id)
            for request_id, prompt, params, tenant, priority in pending:
                try:
                    engine.add_request(prompt, params, request_id, tenant, priority)
                except Exception as e:  # bad input: this request fails, the engine goes on
                    self._deliver(request_id, e)
            if swap is not None:
                self._swap_step(swap)
                continue
            if not engine.has_unfinished_requests():
                if self._after_swap is not None:  # nothing left to resume: the swap is over
                    self._after_swap.done.set()
                    self._after_swap = None
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            self._publish(engine.step())

    def _publish(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            self._deliver(out.request_id, out)
        if not outputs:
            return
        self._last_token_at = time.monotonic()
        job, self._after_swap = self._after_swap, None
        if job is not None:
            if job.last_token_before is not None:
                job.report.token_gap_s = self._last_token_at - job.last_token_before
            job.done.set()

    def _swap_step(self, job: SwapJob) -> None:
        """One turn of the engine loop during a swap: a drain step, or (drain over) the swap."""
        engine = self.engine
        now = time.monotonic()
        if job.drain_started is None:
            job.drain_started = now
            self._held = engine.scheduler.hold_waiting()
        if engine.scheduler.running and now - job.drain_started < job.drain_timeout:
            self._publish(engine.step())
            return
        self._publish(engine.finish_step())
        stopped = time.monotonic()
        report = job.report
        report.preempted = engine.scheduler.preempt_all(self._held)
        self._held = None
        if report.preempted:
            job.last_token_before = self._last_token_at
        try:
            weight_swap.apply(engine, job.staged, job.backup)
        except WeightSwapError as e:  # rolled back: the old weights serve
            job.error = e
        resumed = time.monotonic()
        report.drain_s, report.copy_s = stopped - job.drain_started, resumed - stopped
        report.paused_s = resumed - job.drain_started
        job.staged, job.backup = None, None  # the host copies go now, not with the caller's report
        with self._lock:
            self._swap = None
        if job.error is None and report.preempted:
            self._after_swap = job  # done at the first token after the swap
        else:
            job.done.set()
