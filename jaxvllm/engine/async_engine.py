"""AsyncLLMEngine: the `LLMEngine` driven by one background thread, with a stream per request
for asyncio code (the OpenAI server).

`LLMEngine` is not thread-safe, so exactly one thread touches it:

    event loop (HTTP handlers)                    engine thread
    --------------------------                    -------------
    await add_requests(...)  -- "add" command -->  engine.add_request (ValueError goes back)
    async for i, out in stream  <-- latest output  engine.step(), one RequestOutput per request
    stream.close() / disconnect -- "abort" ----->  engine.abort_request (frees the KV blocks)

Commands wait in a deque and wake the thread through an event; the thread sleeps when there is
nothing to run. The engine's outputs are cumulative (text and token ids so far), so a stream
keeps only the latest one per request: a slow reader skips intermediate states instead of
queueing them, and memory stays bounded. A request that asked for another RequestOutputKind
gets it from its stream, as the reader takes each output: DELTA the part new since the
reader's last one, FINAL_ONLY the finished output alone. After every step the thread hands
`SchedulerStats` and `IterationStats` to the stat loggers (the periodic log line here,
Prometheus in the server).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
import weakref
from typing import Any, AsyncIterator, Optional, Protocol, Sequence

from jaxvllm.outputs import DeltaTracker, RequestOutput
from jaxvllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down, or a step raised): no request can run."""


# ---------------------------------------------------------------------------------------------
# Stats handed to the stat loggers after each step
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of the usable blocks in use, 0..1
    # deltas since the previous record (the engine keeps cumulative counts)
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found
    num_preemptions: int = 0


@dataclasses.dataclass
class FinishedRequestStats:
    request_id: str
    finish_reason: str  # "stop", "length" or "abort"
    e2e_latency: float  # seconds from arrival to the last output
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclasses.dataclass
class IterationStats:
    num_prompt_tokens: int = 0  # prompts of requests that produced their first token
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = dataclasses.field(default_factory=list)
    inter_token_latencies: list[float] = dataclasses.field(default_factory=list)
    finished: list[FinishedRequestStats] = dataclasses.field(default_factory=list)


class StatLogger(Protocol):
    def record(self, scheduler: SchedulerStats, iteration: IterationStats) -> None: ...

    def log(self) -> None: ...


class LoggingStatLogger:
    """vLLM's periodic line: prompt/generation throughput, running/waiting, KV usage."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._last_log = time.monotonic()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._sched = SchedulerStats()
        self._queries = 0
        self._hits = 0
        self._last_was_idle = True

    def record(self, scheduler: SchedulerStats, iteration: IterationStats) -> None:
        self._prompt_tokens += iteration.num_prompt_tokens
        self._generation_tokens += iteration.num_generation_tokens
        self._queries += scheduler.prefix_cache_queries
        self._hits += scheduler.prefix_cache_hits
        self._sched = scheduler

    def log(self) -> None:
        now = time.monotonic()
        elapsed = now - self._last_log
        if elapsed < self.interval:
            return
        s = self._sched
        busy = self._prompt_tokens or self._generation_tokens or s.num_running or s.num_waiting
        idle = not busy
        if not (idle and self._last_was_idle):  # one line when going idle, then silence
            hit_rate = 100.0 * self._hits / self._queries if self._queries else 0.0
            logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f "
                        "tokens/s, Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
                        "Prefix cache hit rate: %.1f%%", self._prompt_tokens / elapsed,
                        self._generation_tokens / elapsed, s.num_running, s.num_waiting,
                        100.0 * s.kv_cache_usage, hit_rate)
        self._last_was_idle = idle
        self._last_log = now
        self._prompt_tokens = self._generation_tokens = 0


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------


class RequestStream:
    """The outputs of one or more engine requests added together (the prompts of one HTTP
    request). Iterate for `(index, RequestOutput)` pairs, index being the position in the list
    given to `add_requests`; the iteration ends when every request has finished. `close()`
    aborts the requests still running; call it when the reader goes away."""

    def __init__(self, engine: "AsyncLLMEngine", request_ids: Sequence[str],
                 loop: asyncio.AbstractEventLoop,
                 output_kinds: Sequence[RequestOutputKind] = ()):
        self.request_ids = list(request_ids)
        # what each reader gets out of the engine's cumulative outputs (default: them)
        self._final_only = {rid for rid, kind in zip(self.request_ids, output_kinds)
                            if kind == RequestOutputKind.FINAL_ONLY}
        self._deltas = {rid: DeltaTracker() for rid, kind in zip(self.request_ids, output_kinds)
                        if kind == RequestOutputKind.DELTA}
        self._engine = engine
        self._loop = loop
        self._index = {rid: i for i, rid in enumerate(self.request_ids)}
        self._unfinished = set(self.request_ids)
        self._event = asyncio.Event()
        self._lock = threading.Lock()
        self._pending: dict[str, RequestOutput] = {}  # latest output per request, engine side
        self._error: Optional[BaseException] = None
        self._ready: collections.deque = collections.deque()
        self._closed = False

    # -- engine thread -----------------------------------------------------------------------

    def _put(self, request_id: str, output: RequestOutput) -> None:
        with self._lock:
            wake = not self._pending and self._error is None
            self._pending[request_id] = output
        if wake:
            self._wake()

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self._error is not None:
                return
            self._error = error
        self._wake()

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._event.set)
        except RuntimeError:
            pass  # the loop is closed: nobody is reading any more

    # -- event loop ---------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        while not self._ready:
            if not self._unfinished:
                raise StopAsyncIteration
            with self._lock:
                batch, self._pending = self._pending, {}
                error = self._error
            for rid, out in batch.items():
                if out.finished:
                    self._unfinished.discard(rid)
                elif rid in self._final_only:
                    continue
                if rid in self._deltas and (out := self._deltas[rid](out)) is None:
                    continue
                self._ready.append((self._index[rid], out))
            if self._ready:
                break
            if error is not None:
                self._unfinished.clear()
                raise error
            await self._event.wait()
            self._event.clear()
        return self._ready.popleft()

    def close(self) -> None:
        """Abort whatever has not finished (a no-op once every request has)."""
        if self._closed:
            return
        self._closed = True
        if self._unfinished:
            self._engine.abort(sorted(self._unfinished))
            self._unfinished.clear()


@dataclasses.dataclass
class _Tracked:
    """Engine-thread bookkeeping of one running request."""

    stream: RequestStream
    arrival: float  # time.monotonic() when the HTTP request arrived
    num_prompt_tokens: int = 0
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    num_generation_tokens: int = 0


@dataclasses.dataclass
class _Add:
    items: list[tuple[str, Any, SamplingParams]]
    arrival: float
    priority: int
    stream: RequestStream
    done: concurrent.futures.Future


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


def _shutdown_at_exit(engine_ref: "weakref.ref[AsyncLLMEngine]") -> None:
    engine = engine_ref()
    if engine is not None:
        engine.shutdown()


class AsyncLLMEngine:
    """Runs `engine` on a background thread; coroutines add requests and read their streams.

    `start()` launches the thread (idempotent), `shutdown()` aborts what is left, ends every
    open stream with `EngineDeadError` and joins the thread.
    """

    def __init__(self, engine, *, stat_loggers: Sequence[StatLogger] = (),
                 log_stats: bool = True, log_stats_interval: float = 10.0):
        self.engine = engine
        self.stat_loggers: list[StatLogger] = list(stat_loggers)
        if log_stats:
            self.stat_loggers.append(LoggingStatLogger(log_stats_interval))
        self._log_interval = log_stats_interval
        self._commands: collections.deque = collections.deque()
        self._wakeup = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._dead: Optional[BaseException] = None
        self._tracked: dict[str, _Tracked] = {}
        self._counters = (0, 0, 0)  # prefix queries, prefix hits, preemptions already reported
        self._start_lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._accepting = True  # False once the thread has stopped taking commands

    @classmethod
    def from_engine_args(cls, **kwargs) -> "AsyncLLMEngine":
        from jaxvllm.engine.engine import LLMEngine

        return cls(LLMEngine.from_engine_args(**kwargs))

    # -- what the server reads (constant after start-up) -------------------------------------

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def dead_error(self) -> Optional[BaseException]:
        return self._dead

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        with self._start_lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="jaxvllm-engine", daemon=True)
            self._thread.start()
            # A program that ends without shutdown() stops the thread before the interpreter
            # goes: a step still running then would finish into a finalizing interpreter
            # and abort the process.
            atexit.register(_shutdown_at_exit, weakref.ref(self))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine thread after its current step; abort every request left."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the engine thread did not stop within %.0f s", timeout)

    # -- requests -----------------------------------------------------------------------------

    async def add_requests(self, items: Sequence[tuple[str, Any, SamplingParams]], *,
                           arrival_time: Optional[float] = None,
                           priority: int = 0) -> RequestStream:
        """Add `(request_id, prompt, params)` requests together; all or none are added.

        Raises ValueError (bad input, from `LLMEngine.add_request`) or EngineDeadError.
        `arrival_time` is a `time.monotonic()` value (default: now), the origin of the
        time-to-first-token and end-to-end latencies.
        """
        self._check_alive()
        self.start()
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, [rid for rid, _, _ in items], loop,
                               [getattr(p, "output_kind", None) for _, _, p in items])
        done: concurrent.futures.Future = concurrent.futures.Future()
        arrival = time.monotonic() if arrival_time is None else arrival_time
        # the engine runs every request cumulative; the stream gives each its own kind
        items = [(rid, prompt, p.with_output_kind(RequestOutputKind.CUMULATIVE)
                  if isinstance(p, SamplingParams) else p)  # else: the engine rejects it
                 for rid, prompt, p in items]
        self._submit(_Add(items, arrival, priority, stream, done))
        try:
            await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            stream.close()  # the add may still land: abort it behind it
            raise
        return stream

    async def generate(self, prompt, sampling_params: SamplingParams, request_id: str,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """vLLM's `generate`: the outputs of one request until it finishes (cumulative,
        unless its params ask for another RequestOutputKind)."""
        stream = await self.add_requests([(request_id, prompt, sampling_params)],
                                         priority=priority)
        try:
            async for _, output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_ids: str | Sequence[str]) -> None:
        """Abort requests (thread-safe, returns at once; the engine thread frees them)."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        if ids:
            self._submit(("abort", ids))

    async def call(self, fn, *args):
        """Run `fn(llm_engine, *args)` on the engine thread, between steps, and return its
        result: the only safe way to read engine state that changes."""
        self._check_alive()
        self.start()
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("call", fn, args, done))
        return await asyncio.wrap_future(done)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running: {self._dead}")
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")

    def _submit(self, command) -> None:
        with self._submit_lock:
            if not self._accepting:
                self._reject(command, EngineDeadError("the engine is not running"))
                return
            self._commands.append(command)
        self._wakeup.set()

    # -- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                if not self._commands and not engine.has_unfinished_requests():
                    self._wakeup.wait(self._log_interval)
                self._wakeup.clear()
                if self._stopping:
                    break
                self._process_commands()
                iteration = IterationStats()
                deliveries = []
                if engine.has_unfinished_requests():
                    deliveries = self._collect(engine.step(), iteration)
                # stats first: a reader woken by its last output sees them up to date
                self._record(iteration)
                for stream, request_id, output in deliveries:
                    stream._put(request_id, output)
        except BaseException as e:  # a bug in a step: fail every stream, keep the server up
            logger.exception("the engine loop stopped")
            self._dead = e
        finally:
            self._stop_all()

    def _process_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if isinstance(command, _Add):
                self._add(command)
            elif command[0] == "abort":
                self._abort(command[1])
            elif command[0] == "call":
                _, fn, args, done = command
                if not done.set_running_or_notify_cancel():
                    continue
                try:
                    done.set_result(fn(self.engine, *args))
                except Exception as e:
                    done.set_exception(e)

    def _add(self, cmd: _Add) -> None:
        if not cmd.done.set_running_or_notify_cancel():
            return  # the caller went away before the add ran
        added = []
        wall_arrival = time.time() - (time.monotonic() - cmd.arrival)
        try:
            for rid, prompt, params in cmd.items:
                if rid in self._tracked:
                    raise ValueError(f"request id {rid!r} is already in use")
                self.engine.add_request(rid, prompt, params, arrival_time=wall_arrival,
                                        priority=cmd.priority)
                added.append(rid)
                self._tracked[rid] = _Tracked(cmd.stream, cmd.arrival)
        except Exception as e:
            for rid in added:
                self.engine.abort_request(rid)
                self._tracked.pop(rid, None)
            cmd.done.set_exception(e)
            return
        cmd.done.set_result(None)

    def _abort(self, request_ids: list[str]) -> None:
        now = time.monotonic()
        finished = []
        for rid in request_ids:
            tracked = self._tracked.pop(rid, None)
            if tracked is None:
                continue  # finished already
            self.engine.abort_request(rid)
            finished.append(FinishedRequestStats(rid, "abort", now - tracked.arrival,
                                                 tracked.num_prompt_tokens,
                                                 tracked.num_generation_tokens))
        if finished:
            self._record(IterationStats(finished=finished))

    def _collect(self, outputs: list[RequestOutput], stats: IterationStats) -> list:
        """Per-request timing and token counts; returns the (stream, id, output) to deliver."""
        now = time.monotonic()
        deliveries = []
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            generated = sum(len(c.token_ids) for c in out.outputs)
            new = generated - tracked.num_generation_tokens
            if new > 0:
                if tracked.first_token_time is None:
                    tracked.first_token_time = now
                    tracked.num_prompt_tokens = len(out.prompt_token_ids)
                    stats.num_prompt_tokens += tracked.num_prompt_tokens
                    stats.time_to_first_tokens.append(now - tracked.arrival)
                else:
                    stats.inter_token_latencies.append(now - tracked.last_token_time)
                tracked.last_token_time = now
                tracked.num_generation_tokens = generated
                stats.num_generation_tokens += new
            for c in out.outputs:
                if c.logprobs is not None:
                    c.logprobs = list(c.logprobs)  # the engine keeps appending to its list
            if out.finished:
                del self._tracked[out.request_id]
                reasons = [c.finish_reason for c in out.outputs if c.finish_reason]
                stats.finished.append(FinishedRequestStats(
                    out.request_id, reasons[0] if reasons else "stop", now - tracked.arrival,
                    len(out.prompt_token_ids), generated))
            deliveries.append((tracked.stream, out.request_id, out))
        return deliveries

    def _record(self, iteration: IterationStats) -> None:
        engine = self.engine
        kv = engine.kv_manager
        counters = (kv.prefix_cache_queries, kv.prefix_cache_hits, engine.scheduler.num_preemptions)
        deltas = [now - before for now, before in zip(counters, self._counters)]
        self._counters = counters
        sched = SchedulerStats(engine.scheduler.num_running, engine.scheduler.num_waiting,
                               kv.usage, *deltas)
        for stat_logger in self.stat_loggers:
            try:
                stat_logger.record(sched, iteration)
                stat_logger.log()
            except Exception:
                logger.exception("stat logger %s failed", type(stat_logger).__name__)

    def _stop_all(self) -> None:
        """Abort every request left and end every stream (the thread is about to exit)."""
        error = EngineDeadError("the engine is shutting down" if self._dead is None
                                else f"the engine stopped: {self._dead}")
        with self._submit_lock:
            self._accepting = False
            commands, self._commands = list(self._commands), collections.deque()
        for command in commands:
            self._reject(command, error)
        for rid, tracked in list(self._tracked.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:
                pass
            tracked.stream._fail(error)
        if self._tracked:
            self._tracked.clear()
            try:
                self._record(IterationStats())
            except Exception:
                pass

    @staticmethod
    def _reject(command, error: BaseException) -> None:
        if isinstance(command, _Add):
            done = command.done
        elif command[0] == "call":
            done = command[3]
        else:
            return  # an abort: nothing runs any more anyway
        if not done.done():
            done.set_exception(error)
