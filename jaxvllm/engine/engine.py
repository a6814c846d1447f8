"""LLMEngine: add_request / step / abort_request over the scheduler, runner and detokenizer.

One `step()` schedules a ragged batch under the token budget, runs it as one jitted call,
appends the sampled tokens, applies stop conditions and returns a `RequestOutput` for every
request that made progress. A request with `n > 1` runs as n child sequences.

Steps are pipelined with the device: `step()` collects the step in flight, folds its tokens
into the scheduler, schedules and dispatches the next step, and only then detokenizes, checks
stop strings and builds the outputs of the collected one, while the device runs the next.
A request that a stop string finishes is thus in the next step too; that step's token for it
is dropped (the scheduler skips a row that is no longer running).

With multi-step decoding (`num_scheduler_steps`) a step may give a request several tokens;
they are processed in order, and a stop string drops the tokens after the one completing it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, NamedTuple, Optional, Protocol, Sequence

import jax
import numpy as np

from jaxvllm import distributed, parallel
from jaxvllm.cache import enable_compilation_cache
from jaxvllm.config import EngineConfig
from jaxvllm.engine import autotune
from jaxvllm.engine.detokenizer import IncrementalDetokenizer
from jaxvllm.engine.kv_cache import KVCacheManager
from jaxvllm.engine.request import Request, RequestStatus
from jaxvllm.engine.runner import ModelRunner, StepResult
from jaxvllm.engine.sampler import all_plain, pow2_at_least
from jaxvllm.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from jaxvllm.models.attention import kv_cache_bytes_per_block
from jaxvllm.models.config import resolve_dtype
from jaxvllm.models.loader import load_model
from jaxvllm.models.transformer import SMALL_BATCH_ACTIVATIONS, small_batch_supported
from jaxvllm.outputs import CompletionOutput, DeltaTracker, Logprob, RequestOutput
from jaxvllm.sampling_params import RequestOutputKind, SamplingParams
from pallas_kernels import decode_layer

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20

_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop",
                   RequestStatus.FINISHED_LENGTH_CAPPED: "length",
                   RequestStatus.FINISHED_ABORTED: "abort"}


@dataclasses.dataclass
class _Sequence:
    """Engine-side state of one child sequence."""

    request: Request
    index: int
    detokenizer: IncrementalDetokenizer
    logprobs: Optional[list] = None
    cumulative_logprob: float = 0.0
    stop_reason: Any = None


@dataclasses.dataclass
class _Parent:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence]
    # [None] + one dict per later prompt token, filled as prefill chunks run
    prompt_logprobs: Optional[list] = None
    delta: Optional[DeltaTracker] = None  # RequestOutputKind.DELTA: what was sent so far

    @property
    def finished(self) -> bool:
        return all(s.request.status.is_finished for s in self.sequences)


class StepHandle(Protocol):
    """A dispatched step (`runner.execute_async`): `result()` waits for the device."""

    def result(self) -> StepResult: ...


class _Completed:
    """The handle of a step the runner ran to the end before returning (`runner.execute`)."""

    def __init__(self, result: StepResult):
        self._result = result

    def result(self) -> StepResult:
        return self._result


class _InFlight(NamedTuple):
    scheduler_output: SchedulerOutput
    handle: StepHandle
    asynchronous: bool  # host work done until result() overlaps the device


class _Collected(NamedTuple):
    """A step's results for the requests still running when it came back, in batch order."""

    sampled: list[tuple[Request, list[int]]]  # the tokens the step appended, in order
    logprobs: dict[str, tuple[list[int], list[float], int]]
    prompt_logprobs: list[tuple[Request, int, list]]  # (request, first position, rows)


def device_memory_stats() -> dict | None:
    """This process's first device's allocator statistics (None on CPU)."""
    return jax.local_devices()[0].memory_stats()


def stable_block_count(blocks: int) -> int:
    """`blocks` rounded down to a multiple of about 1/256 of itself (a power of two): the
    profile run's peak memory differs by a few kilobytes from one start to the next, and
    each KV cache shape is its own compilation, so a start whose count differed by a block
    could not use the step programs an earlier start left in the persistent compilation
    cache. Costs at most 0.4% of the blocks."""
    granule = 1 << max(blocks.bit_length() - 9, 0)
    return blocks - blocks % granule


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        enable_compilation_cache()
        # tensor parallel (or several processes): the mesh the model is sharded over
        self.mesh = None
        if config.tensor_parallel_size > 1 or jax.process_count() > 1:
            self.mesh = parallel.make_mesh(config.tensor_parallel_size)
        self.loaded = load_model(config.model, dtype=config.dtype,
                                 attention_backend=config.resolved_attention_backend(),
                                 mesh=self.mesh)
        self.model_config = self.loaded.config
        if self._unroll_layers():
            self.loaded.model.unroll_layers()
        # kernels measured against XLA's way at start-up (jaxvllm/engine/autotune.py)
        self.kernel_choices: dict[str, autotune.KernelChoice] = {}
        self.loaded.model.small_batch_matmuls = self._small_batch_matmuls()
        self.loaded.model.sampling_kernel_rows = self._sampling_kernel_rows()
        self.loaded.model.decode_layer_rows = self._decode_layer_rows()
        distributed.check_same_everywhere(
            (dataclasses.replace(config, model=None, tokenizer=None), self.model_config))
        self.tokenizer = self._load_tokenizer()
        self.max_model_len = self._max_model_len()
        self.vocab_size = self.model_config.vocab_size
        max_num_seqs = config.resolved_max_num_seqs()
        budget = max(config.resolved_max_num_batched_tokens(self.max_model_len), 1)
        if not config.enable_chunked_prefill:
            budget = max(budget, self.max_model_len)
        self.kv_dtype = self._kv_cache_dtype()
        self.num_blocks = distributed.from_process_zero(self._num_blocks(max_num_seqs))
        profile = self.num_blocks < 0
        if profile:  # a minimal cache for the profile run, resized right after
            self.num_blocks = 1 + math.ceil(self.max_model_len / config.block_size)
        self.runner = ModelRunner(self.loaded.model, num_blocks=self.num_blocks,
                                  block_size=config.block_size, max_model_len=self.max_model_len,
                                  max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                                  mesh=self.mesh, kv_dtype=self.kv_dtype,
                                  fine_decode_buckets=config.on_cpu)
        self.runner.num_scheduler_steps = self._num_scheduler_steps()
        if profile:
            self.num_blocks = distributed.from_process_zero(self._profile_num_blocks())
            self.runner.resize_kv_cache(self.num_blocks)
        wait = config.wait_for_precompile
        if self._precompile():
            self.runner.precompile(self.vocab_size)
            if wait if wait is not None else not config.on_cpu:
                self.runner.wait_for_compiles()
        elif wait:
            raise ValueError("wait_for_precompile=True needs the precompile, which is off for "
                             "this engine (precompile=False, the CPU's default, or not "
                             "possible with this attention backend or tensor parallelism)")
        self.kv_manager = KVCacheManager(self.num_blocks, config.block_size,
                                         enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                            max_model_len=self.max_model_len, policy=config.scheduling_policy,
                            enable_chunked_prefill=config.enable_chunked_prefill),
            self.kv_manager)
        self._parents: dict[str, _Parent] = {}
        self._child_to_parent: dict[str, _Parent] = {}
        self._seed_rng = np.random.default_rng(config.seed)
        eos = [self.tokenizer.eos_token_id] if self.tokenizer is not None else []
        self._eos_ids = [i for i in dict.fromkeys(eos + list(self.model_config.eos_token_ids))
                         if i is not None]
        self._in_flight: Optional[_InFlight] = None
        self._async_scheduling = self._resolve_async_scheduling()
        # multi-step decodes pipelined (see _schedule_ahead) unless async_scheduling=False
        self._pipelines_multi_step = self.config.async_scheduling is not False
        self._steps_scheduled_ahead = 0  # dispatched before the step in flight was collected
        self._output_steps = 0
        # output tokens sampled for requests still tracked, all steps together (whatever their
        # RequestOutputKind lets step() return)
        self.num_generation_tokens = 0
        self._output_seconds = 0.0  # detokenizing, stop strings and outputs of collected steps
        self._overlapped_seconds = 0.0  # the part of it spent while the next step ran

    @classmethod
    def from_engine_args(cls, **kwargs) -> "LLMEngine":
        return cls(EngineConfig.from_kwargs(**kwargs))

    # -- set-up ------------------------------------------------------------------------------

    def _load_tokenizer(self):
        from jaxvllm.tokenizer import load_tokenizer

        try:
            return load_tokenizer(self.loaded.source, self.config.tokenizer)
        except FileNotFoundError:
            if self.config.tokenizer is not None:
                raise
            return None  # a model without tokenizer files takes token ids only

    def _max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        if self.config.max_model_len is None:
            return limit
        if self.config.max_model_len > limit:
            raise ValueError(f"max_model_len={self.config.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({limit})")
        return self.config.max_model_len

    def _option(self, name: str, possible: bool, needs: str, default: bool) -> bool:
        """An on/off engine option: its value, or `default` when unset (None), and never on
        where it is not `possible` (asking for it there is a ValueError naming what it
        `needs`)."""
        wanted = getattr(self.config, name)
        if wanted and not possible:
            raise ValueError(f"{name}=True needs {needs}")
        return possible and (wanted if wanted is not None else default)

    def _precompile(self) -> bool:
        return self._option(
            "precompile", self.runner.planner is None and self.mesh is None,
            "an attention backend without a host plan "
            f"(not {self.config.resolved_attention_backend()!r}) and tensor_parallel_size=1",
            default=not self.config.on_cpu)

    def _resolve_async_scheduling(self) -> bool:
        return self._option("async_scheduling", self.mesh is None,
                            "tensor_parallel_size=1 on one process", default=False)

    def _num_scheduler_steps(self) -> int:
        """`num_scheduler_steps`, or its default (8 on a GPU, 1 on the CPU); more than 1 only
        on one device and with an attention variant that needs no host plan (like
        `_option`, which is for on/off options)."""
        wanted = self.config.num_scheduler_steps
        possible = self.mesh is None and self.runner.planner is None
        if wanted is not None and wanted > 1 and not possible:
            raise ValueError(f"num_scheduler_steps={wanted} needs tensor_parallel_size=1 on one "
                             "process and an attention backend without a host plan")
        if wanted is None:
            return 8 if possible and not self.config.on_cpu else 1
        return wanted

    def _unroll_layers(self) -> bool:
        return self._option("unroll_layers", self.mesh is None,
                            "tensor_parallel_size=1 on one process", default=True)

    def _measured(self, name: str, possible: bool, measure) -> Optional[int]:
        """For a kernel option left unset where it is possible, on a GPU: the most rows a
        step runs the kernels for, as `measure()` (an `autotune` function) found; else None."""
        if getattr(self.config, name) is not None or not possible \
                or not autotune.should_measure():
            return None
        choice = self.kernel_choices[name] = measure()
        logger.info("%s", autotune.describe(choice))
        return choice.rows

    def _small_batch_matmuls(self) -> bool | int:
        """True, False, or (unset, on a GPU) the most rows a step runs the small-batch
        kernels for, as measured at start-up."""
        possible = (self.loaded.model.layers.unstacked
                    and small_batch_supported(self.model_config))
        rows = self._measured("small_batch_matmuls", possible,
                              lambda: autotune.small_batch_rows(self.loaded.model))
        if rows is not None:
            return rows
        return self._option("small_batch_matmuls", possible,
                            "unrolled layers (unroll_layers, one device) and a model with "
                            "RMSNorm before its projections and an activation among "
                            f"{SMALL_BATCH_ACTIVATIONS}", default=False)

    def _decode_layer_rows(self) -> int:
        """The most rows of a decode-only step that runs each layer as one kernel
        (`decode_layer_kernel`; off unless asked for)."""
        backend = self.config.resolved_attention_backend()
        on = self._option(
            "decode_layer_kernel", self.loaded.model.layer_kernel_possible(),
            "unrolled layers (unroll_layers, one device), a pre-norm RMSNorm model with a "
            "gated MLP and rotary embeddings over whole power-of-two heads (no q/k norms, no "
            "O or MLP biases) and the Triton attention backend "
            f"(not {backend!r})", default=False)
        return decode_layer.MAX_ROWS if on else 0

    def _sampling_kernel_rows(self) -> int:
        """The most rows a step samples with the sampler's kernels (pallas_kernels/
        sampling.py): all (True), none (False), or (unset, on a GPU) as measured at
        start-up."""
        rows = self._measured("sampling_kernels", self.mesh is None,
                              lambda: autotune.sampling_kernel_rows(
                                  self.model_config.vocab_size, np.float32))  # the logits'
        if rows is not None:
            return rows
        on = self._option("sampling_kernels", self.mesh is None,
                          "tensor_parallel_size=1 on one process", default=False)
        # every step's rows: at most max_num_seqs, padded to a power of two
        return pow2_at_least(self.config.resolved_max_num_seqs()) if on else 0

    def _num_blocks(self, max_num_seqs: int) -> int:
        """KV cache blocks: the override; on CPU, max_num_seqs full-length requests within
        `cpu_kv_cache_bytes`; on a GPU, what `gpu_memory_utilization` leaves after the weights
        and the peak of a profile run (the largest step), as vLLM does."""
        cfg = self.config
        if cfg.num_gpu_blocks_override is not None:
            return cfg.num_gpu_blocks_override
        per_block = self._kv_bytes_per_block()
        blocks_per_seq = math.ceil(self.max_model_len / cfg.block_size)
        if not device_memory_stats():  # CPU: no allocator statistics
            wanted = max_num_seqs * blocks_per_seq
            return 1 + max(blocks_per_seq, min(wanted, cfg.cpu_kv_cache_bytes // per_block))
        return -1  # sized by _profile_num_blocks once the runner exists

    def _kv_cache_dtype(self):
        """The KV cache's dtype: the model's ("auto") or a narrower one (vLLM's kv_cache_dtype).
        On CPU a bfloat16 cache halves the bytes the XLA attention gathers per step."""
        if self.config.kv_cache_dtype == "auto":
            return self.loaded.dtype
        dtype = resolve_dtype(self.config.kv_cache_dtype)
        if (dtype != self.loaded.dtype
                and self.config.resolved_attention_backend() not in ("cpu", "xla", "reference")):
            raise ValueError(f"kv_cache_dtype={self.config.kv_cache_dtype!r} differs from the "
                             f"model dtype; only attention_backend 'cpu', 'xla' or 'reference' "
                             f"supports that yet")
        return dtype

    def _kv_bytes_per_block(self) -> int:
        """KV-cache bytes of one block on each device (the whole block on one device)."""
        if self.mesh is None:
            return kv_cache_bytes_per_block(self.model_config, self.config.block_size,
                                            self.kv_dtype)
        return parallel.kv_cache_bytes_per_block_per_device(
            self.model_config, self.config.block_size, self.kv_dtype,
            parallel.tp_size(self.mesh))

    def _profile_num_blocks(self) -> int:
        cfg = self.config
        self.runner.profile_run(self.vocab_size)
        stats = device_memory_stats()
        limit, peak = stats.get("bytes_limit", 0), stats.get("peak_bytes_in_use", 0)
        per_block = self._kv_bytes_per_block()
        free = limit * cfg.gpu_memory_utilization - peak
        blocks = 1 + stable_block_count(int(free // per_block))
        if blocks - 1 < math.ceil(self.max_model_len / cfg.block_size):
            raise ValueError(f"not enough device memory for one {self.max_model_len}-token "
                             f"sequence's KV cache ({free / 2**30:.2f} GiB free at "
                             f"gpu_memory_utilization={cfg.gpu_memory_utilization}); lower "
                             f"max_model_len or raise gpu_memory_utilization")
        return blocks

    # -- requests ----------------------------------------------------------------------------

    def _tokenize(self, prompt) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass prompt token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            return None, [int(t) for t in prompt]
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(self, request_id: str, prompt, params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None, priority: int = 0) -> None:
        params = params if params is not None else SamplingParams()
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(ids) > self.max_model_len:
            raise ValueError(f"the prompt ({len(ids)} tokens) is longer than max_model_len "
                             f"({self.max_model_len})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError("bad_words needs a tokenizer")
            params.update_from_tokenizer(self.tokenizer)
        params.verify_token_ids(self.vocab_size)
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(params, field)
            if value is not None and value > MAX_LOGPROBS:
                raise ValueError(f"{field}={value}: at most {MAX_LOGPROBS} are returned")
        arrival = time.time() if arrival_time is None else arrival_time
        parent = _Parent(request_id, text, ids, params, [],
                         [None] * len(ids) if params.prompt_logprobs is not None else None,
                         DeltaTracker() if params.output_kind == RequestOutputKind.DELTA
                         else None)
        for index in range(params.n):
            child = self._child_params(params, index)
            child_id = request_id if params.n == 1 else f"{index}_{request_id}"
            req = Request(request_id=child_id, prompt_token_ids=list(ids), sampling_params=child,
                          eos_token_id=self._eos_ids[0] if self._eos_ids else None,
                          arrival_time=arrival, priority=priority)
            detok = IncrementalDetokenizer(self.tokenizer, ids, child)
            seq = _Sequence(req, index, detok, [] if params.logprobs is not None else None)
            parent.sequences.append(seq)
            self._child_to_parent[child_id] = parent
        self._parents[request_id] = parent
        for seq in parent.sequences:
            self.scheduler.add_request(seq.request)

    def _child_params(self, params: SamplingParams, index: int) -> SamplingParams:
        child = params.clone()
        if child.max_tokens is None:
            child.max_tokens = self.max_model_len  # the scheduler caps at max_model_len
        if child.seed is not None:
            child.seed = params.seed + index
        elif not child.is_greedy:
            child.seed = int(self._seed_rng.integers(0, 2**31 - 1))
        extra_eos = self._eos_ids[1:]
        if extra_eos and not child.ignore_eos:
            child.stop_token_ids = list(dict.fromkeys(list(child.stop_token_ids or []) + extra_eos))
        return child

    def abort_request(self, request_id: str | Sequence[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            parent = self._parents.pop(rid, None)
            if parent is None:
                continue
            live = [s.request.request_id for s in parent.sequences if not s.request.status.is_finished]
            self.scheduler.finish_requests(live, RequestStatus.FINISHED_ABORTED)
            for s in parent.sequences:
                self._child_to_parent.pop(s.request.request_id, None)
        self._drain_if_idle()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Collect the step in flight, dispatch the next one, then return the outputs of the
        collected step (the first call after an idle period dispatches and returns []).

        The next step may be scheduled and dispatched before the one in flight is collected
        (`_schedule_ahead`: a multi-step decode after one, by default; every step with
        `async_scheduling=True`), so the device need not wait for the host's scheduling and
        input building: its rows compute the tokens the step in flight samples by reading
        them on the device."""
        previous, self._in_flight = self._in_flight, None
        out = self._schedule_ahead(previous)
        ahead = out is not None
        collected = None if ahead else self._collect(previous)
        if out is None:
            out = self.scheduler.schedule(num_steps=self._multi_steps())
        if out.scheduled:
            self._in_flight = self._dispatch(out)
            self._steps_scheduled_ahead += ahead
        if ahead:
            collected = self._collect(previous)
        outputs = [] if collected is None else self._process(collected)
        self._drain_if_idle()
        return outputs

    def _multi_steps(self) -> int:
        """The steps the next schedule may run in one call: the runner's multi-step count if
        a program for the running batch can run now, else 1."""
        bucket = getattr(self.runner, "multi_step_token_bucket", None)
        if bucket is None or bucket(self.scheduler.num_running) is None:
            return 1
        return self.runner.num_scheduler_steps

    def _schedule_ahead(self, previous: Optional[_InFlight]) -> Optional[SchedulerOutput]:
        """The next step, scheduled before `previous` is collected, or None where it must
        wait for it (then nothing has been scheduled).

        After a multi-step decode (unless `async_scheduling=False`): the next multi-step
        decode, where the batch would take one anyway (every row decoding with plain params,
        nothing waiting that could join, a program ready) and the blocks for its steps are
        free. Its rows start after the tokens in flight; a row that a token in flight stops
        (eos, a stop token or string) has its next call's tokens dropped. Pipelined so, the
        host's work for a call (folding in, scheduling, inputs, launch) overlaps the
        device's work on the one before.

        After a single step (with `async_scheduling=True`): a single step, where the batch
        could not take a multi-step decode once `previous` is collected (that does more for
        the host), every row that samples in `previous` has params that need no token
        history on the host (no penalties, bad words, min_tokens or logprobs), since the
        next step's sampling inputs are built without its token, and a block is free for
        each of its rows (the requests `previous` finishes still hold theirs: with fewer,
        scheduling ahead could preempt what scheduling in order would not)."""
        if previous is None or not previous.asynchronous:
            return None
        if previous.scheduler_output.num_steps > 1:
            if not self._pipelines_multi_step or self._multi_steps() == 1:
                return None
            return self.scheduler.schedule_multi_step(self.runner.num_scheduler_steps)
        if not self._async_scheduling:
            return None
        if self._multi_steps() > 1 and self.scheduler.multi_step_batch():
            return None
        if self.kv_manager.num_free_blocks < len(previous.scheduler_output.scheduled):
            return None
        if not all_plain(s.request for s in previous.scheduler_output.scheduled if s.do_sample):
            return None
        return self.scheduler.schedule()

    def _dispatch(self, out: SchedulerOutput) -> _InFlight:
        execute_async = getattr(self.runner, "execute_async", None)
        if out.num_steps > 1:
            return _InFlight(out, execute_async(out.scheduled, self.vocab_size, out.num_steps),
                             True)
        if execute_async is not None:
            return _InFlight(out, execute_async(out.scheduled, self.vocab_size), True)
        return _InFlight(out, _Completed(self.runner.execute(out.scheduled, self.vocab_size)),
                         False)

    def _collect(self, in_flight: Optional[_InFlight]) -> Optional[_Collected]:
        """Wait for a dispatched step and fold its tokens into the scheduler (appending,
        length / eos / stop-token checks, freeing the blocks of what finished)."""
        if in_flight is None:
            return None
        out, handle, _ = in_flight
        result = handle.result()
        # rows finished since dispatch (a stop string, an abort) are skipped by the scheduler
        # and here: their token was computed past the end of the request
        live = [s.request for s in out.scheduled if s.request.status == RequestStatus.RUNNING]
        outputs_before = [(r, r.num_output_tokens) for r in live
                          if r.request_id in result.sampled]
        self.scheduler.update_from_output(out, result.sampled)
        return _Collected(
            sampled=[(r, r.output_token_ids[before:]) for r, before in outputs_before],
            logprobs=result.logprobs,
            prompt_logprobs=[(r, *result.prompt_logprobs[r.request_id]) for r in live
                             if r.request_id in result.prompt_logprobs])

    def _drain_if_idle(self) -> None:
        """With no request left, collect a step still in flight (its rows all finished after
        it was dispatched) so that an idle engine has nothing running on the device."""
        if self._in_flight is not None and not self.scheduler.has_unfinished_requests():
            in_flight, self._in_flight = self._in_flight, None
            self._collect(in_flight)

    def _tracked(self, req: Request) -> tuple[Optional[_Parent], Optional[_Sequence]]:
        """The parent and sequence of a request the engine still tracks (None, None once it
        was aborted, even if its id has been reused since)."""
        parent = self._child_to_parent.get(req.request_id)
        seq = None if parent is None else next(
            (s for s in parent.sequences if s.request is req), None)
        return (parent, seq) if seq is not None else (None, None)

    def _process(self, collected: _Collected) -> list[RequestOutput]:
        """Detokenize a collected step's tokens, apply stop strings and build its outputs."""
        started = time.perf_counter()
        overlapped = self._in_flight is not None and self._in_flight.asynchronous
        for req, first, rows in collected.prompt_logprobs:
            parent, seq = self._tracked(req)
            if seq is not None and seq.index == 0:  # the children share one prompt
                self._store_prompt_logprobs(parent, first, rows)
        touched: dict[str, _Parent] = {}
        stopped = []
        for req, tokens in collected.sampled:
            parent, seq = self._tracked(req)
            if seq is None:
                continue
            rid = req.request_id
            touched[parent.request_id] = parent
            if seq.logprobs is not None and rid in collected.logprobs:
                self._append_logprobs(seq, *collected.logprobs[rid])  # single steps only
            # as vLLM: the text of the eos / stop token that ended the request is left out
            stopped_on_token = (req.status == RequestStatus.FINISHED_STOPPED
                                and not req.sampling_params.include_stop_str_in_output)
            stop, i = seq.detokenizer.append_tokens(tokens[:-1] if stopped_on_token else tokens)
            if stop is None:
                self.num_generation_tokens += len(tokens)
                continue
            self.num_generation_tokens += i
            if not req.status.is_finished:
                seq.stop_reason = stop
                stopped.append(rid)
            elif i < len(tokens) or req.status == RequestStatus.FINISHED_LENGTH_CAPPED:
                # the stop string came first (before the token that finished it in a
                # multi-step decode), or the last allowed token also completed it: vLLM
                # reports the stop
                req.status = RequestStatus.FINISHED_STOPPED
                seq.stop_reason = stop
            req.truncate_output(len(tokens) - i)
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        outputs = [out for p in touched.values()
                   if p.finished or p.params.output_kind != RequestOutputKind.FINAL_ONLY
                   if (out := self._output(p)) is not None]
        for p in touched.values():
            if p.finished:
                self._parents.pop(p.request_id, None)
                for s in p.sequences:
                    self._child_to_parent.pop(s.request.request_id, None)
        elapsed = time.perf_counter() - started
        self._output_steps += 1
        self._output_seconds += elapsed
        if overlapped:
            self._overlapped_seconds += elapsed
        return outputs

    def _logprob_entry(self, ids, values, rank, k: int) -> dict[int, Logprob]:
        """One position's logprobs: the chosen token (ids[0]) first, then the top k."""
        entry = {ids[0]: Logprob(values[0], rank, self._decode_one(ids[0]))}
        for r, (tid, lp) in enumerate(zip(ids[1:k + 1], values[1:k + 1]), start=1):
            entry.setdefault(tid, Logprob(lp, r, self._decode_one(tid)))
        return entry

    def _append_logprobs(self, seq: _Sequence, ids, values, rank) -> None:
        seq.logprobs.append(self._logprob_entry(ids, values, rank,
                                                seq.request.sampling_params.logprobs))
        seq.cumulative_logprob += values[0]

    def _store_prompt_logprobs(self, parent: _Parent, first: int, rows) -> None:
        for offset, (ids, values, rank) in enumerate(rows):
            position = first + offset + 1  # the prompt token these logits predict
            if parent.prompt_logprobs[position] is None:  # else recomputed after a preemption
                parent.prompt_logprobs[position] = self._logprob_entry(
                    ids, values, rank, parent.params.prompt_logprobs)

    def _decode_one(self, token: int) -> Optional[str]:
        return None if self.tokenizer is None else self.tokenizer.decode([token])

    def _output(self, parent: _Parent) -> Optional[RequestOutput]:
        """The parent's output of this step as its params' RequestOutputKind asks (None: a
        DELTA with nothing new)."""
        completions = []
        for seq in parent.sequences:
            req = seq.request
            finished = req.status.is_finished
            reason = _FINISH_REASONS.get(req.status) if finished else None
            stop_reason = seq.stop_reason if seq.stop_reason is not None else req.stop_reason
            completions.append(CompletionOutput(
                index=seq.index, text=seq.detokenizer.releasable_text(finished),
                token_ids=list(req.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=None if seq.logprobs is None else list(seq.logprobs),
                finish_reason=reason, stop_reason=stop_reason))
        first = parent.sequences[0].request
        prompt_logprobs = None if parent.prompt_logprobs is None else list(parent.prompt_logprobs)
        # the prompt's ids are never changed after the request is added: shared, not copied
        out = RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids,
                            prompt_logprobs, completions, parent.finished,
                            num_cached_tokens=max(first.num_cached_tokens, 0))
        return out if parent.delta is None else parent.delta(out)

    def wait_for_compiles(self) -> None:
        """Return once the programs compiling in the background (`precompile`'s, and those of
        steps that met a missing one) are ready, as vLLM's engine compiles before it serves:
        no compilation then competes with the steps for the host or the device (a GPU's
        compiler times kernels on it)."""
        wait = getattr(self.runner, "wait_for_compiles", None)
        if wait is not None:
            wait()

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"num_compiled_programs": self.runner.num_compiled,
                "compile_seconds": self.runner.compile_seconds,
                "background_compile_seconds": self.runner.background_compile_seconds,
                **self._program_cache_stats(),
                "kv_cache_usage": self.kv_manager.usage,
                "num_blocks": self.num_blocks,
                "num_preemptions": self.scheduler.num_preemptions,
                "steps_scheduled_ahead": self._steps_scheduled_ahead,
                "num_generation_tokens": self.num_generation_tokens,
                **self.runner.counters.summary(), **self._output_stats(),
                **self._memory_stats(),
                "small_batch_matmul_rows": self.loaded.model.small_batch_limit(),
                "sampling_kernel_rows": self.loaded.model.sampling_kernel_rows,
                "decode_layer_rows": self.loaded.model.decode_layer_rows,
                **{f"{name}_probe": choice.as_dict()
                   for name, choice in self.kernel_choices.items()}}

    def _program_cache_stats(self) -> dict[str, int]:
        """Step programs loaded from the program cache and looked up there in vain."""
        cache = self.runner.program_cache
        return {"program_cache_hits": cache.hits if cache else 0,
                "program_cache_misses": cache.misses if cache else 0}

    def _output_stats(self) -> dict[str, float]:
        """Host time per step on detokenizing, stop strings and outputs, and the part of it
        that overlapped the device (the next step dispatched asynchronously, running)."""
        steps = max(self._output_steps, 1)
        return {"output_host_ms_per_step": 1000 * self._output_seconds / steps,
                "overlapped_host_ms_per_step": 1000 * self._overlapped_seconds / steps}

    def _memory_stats(self) -> dict[str, Any]:
        """With tensor parallelism: the devices and the largest per-device share of the
        parameters and of the KV cache (bytes) on this process's devices."""
        if self.mesh is None:
            return {}
        params = parallel.bytes_per_device(self.runner.state)
        kv = parallel.bytes_per_device(self.runner.kv)
        return {"tensor_parallel_size": parallel.tp_size(self.mesh),
                "param_bytes_per_device": max(params.values()),
                "kv_cache_bytes_per_device": max(kv.values())}
