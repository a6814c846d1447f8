"""Several hosts (or processes) serving one model: JAX's own distributed runtime, one
scheduler on process 0, every process running the same jitted step.

JAX is multi-controller: each process runs the same program on its own devices, and a
sharded step only runs when every process calls it with the same inputs. So the engine is
built on every process (each loads its own shards and allocates its KV shards), process 0
alone schedules, and before each step it broadcasts the step's host inputs (token ids,
positions, block tables, sampling rows: a few KB); the other processes sit in `run_worker`,
receive them and run the same compiled program.

    from jaxvllm import LLM, distributed

    distributed.initialize()        # --coordinator-address, --num-processes, --process-id
                                    # (or $JAXVLLM_COORDINATOR_ADDRESS, ...)
    llm = LLM(model, tensor_parallel_size=jax.device_count())
    if distributed.is_driver():
        outputs = llm.generate(prompts, params)
        distributed.stop_workers()
    else:
        distributed.run_worker(llm)  # returns when process 0 calls stop_workers()

The broadcast goes through the key-value store of `jax.distributed`'s coordination service
(the runtime `jax.distributed.initialize` starts), not through a device collective such as
`multihost_utils.broadcast_one_to_all`: a worker waits for the next step with a timed,
retried `blocking_key_value_get`, so an idle server (no step for minutes) never leaves a
collective pending past the CPU collectives' timeout, and a step costs no extra device
round trip. Each step is the pickled `(program key, numpy inputs)` under a per-worker key
that the worker deletes once read. The processes trust each other (one deployment).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from typing import Any, Optional

import numpy as np

ENV_COORDINATOR = "JAXVLLM_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAXVLLM_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXVLLM_PROCESS_ID"

_STEP, _STOP = 1, 2  # the first byte of each message to the workers
_STEP_KEY = "jaxvllm/step/{worker}/{n}"
_POLL_MS = 10_000  # a worker re-arms its wait this often while process 0 is idle
_SETUP_TIMEOUT_MS = 30 * 60 * 1000  # engine set-up on other hosts (loading weights) may lag
_sequence = {"step": 0, "setup": 0}  # the same count of messages on every process


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r}: expected an integer") from None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
    """Join the JAX distributed runtime; arguments default to $JAXVLLM_COORDINATOR_ADDRESS,
    $JAXVLLM_NUM_PROCESSES, $JAXVLLM_PROCESS_ID. Returns False (and does nothing) when no
    coordinator is given: a single process. Call it before anything else uses JAX."""
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator_address is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError(f"--num-processes/--process-id given without "
                             f"--coordinator-address (or ${ENV_COORDINATOR}): every process "
                             f"needs the coordinator's host:port")
        return False
    if num_processes is None or process_id is None:
        raise ValueError("--coordinator-address needs --num-processes and --process-id (or "
                         f"${ENV_NUM_PROCESSES} and ${ENV_PROCESS_ID})")
    if num_processes < 1:
        raise ValueError(f"--num-processes={num_processes}: must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id={process_id}: must be in [0, {num_processes}) for "
                         f"--num-processes={num_processes}")
    if ":" not in coordinator_address:
        raise ValueError(f"--coordinator-address={coordinator_address!r}: expected host:port, "
                         f"e.g. 10.0.0.1:1234 (process 0's host)")
    import jax

    try:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    except RuntimeError as e:
        if "before" in str(e) or "already" in str(e):
            raise RuntimeError(f"jax.distributed could not start ({e}); call "
                               f"jaxvllm.distributed.initialize() before any other JAX use") from e
        raise
    return True


def is_multi_process() -> bool:
    import jax

    return jax.process_count() > 1


def is_driver() -> bool:
    """True on process 0 (and in a single process): the one that schedules and serves."""
    import jax

    return jax.process_index() == 0


def _client():
    from jax._src import distributed as jax_distributed

    client = getattr(jax_distributed.global_state, "client", None)
    if client is None:
        raise RuntimeError("jax.distributed is not initialized; call "
                           "jaxvllm.distributed.initialize() first")
    return client


def _get(client, key: str, timeout_ms: int) -> bytes:
    return bytes(client.blocking_key_value_get_bytes(key, timeout_ms))


def send_step(key, host_inputs) -> None:
    """Process 0: hand one step (program key and numpy inputs) to the other processes."""
    import jax

    host = jax.tree.map(np.asarray, host_inputs)
    _publish(_STEP, pickle.dumps((key, host), protocol=pickle.HIGHEST_PROTOCOL))


def _publish(command: int, payload: bytes = b"") -> None:
    import jax

    client, n = _client(), _sequence["step"]
    _sequence["step"] += 1
    message = bytes([command]) + payload
    for worker in range(1, jax.process_count()):
        client.key_value_set_bytes(_STEP_KEY.format(worker=worker, n=n), message)


def _receive() -> tuple[int, bytes]:
    import jax

    client, n = _client(), _sequence["step"]
    key = _STEP_KEY.format(worker=jax.process_index(), n=n)
    while True:
        try:
            message = _get(client, key, _POLL_MS)
            break
        except Exception as e:  # the wait timed out: process 0 is idle, wait again
            if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                raise
    client.key_value_delete(key)
    _sequence["step"] += 1
    return message[0], message[1:]


def stop_workers() -> None:
    """Process 0: release the other processes from `run_worker`. A no-op in one process."""
    if is_multi_process() and is_driver():
        _publish(_STOP)


def _runner_of(engine):
    for attr in ("llm_engine", "engine"):  # an LLM, an AsyncLLMEngine
        if not hasattr(engine, "runner") and hasattr(engine, attr):
            engine = getattr(engine, attr)
    return engine.runner


def run_worker(engine) -> int:
    """Processes other than 0: run every step process 0 broadcasts until it calls
    `stop_workers()`. `engine` is an LLM, an LLMEngine or an AsyncLLMEngine built with the
    same arguments as process 0's. Returns the number of steps run."""
    if is_driver():
        raise RuntimeError("run_worker() is for processes other than 0; process 0 schedules")
    runner = _runner_of(engine)
    steps = 0
    while True:
        command, payload = _receive()
        if command == _STOP:
            return steps
        if command != _STEP:
            raise RuntimeError(f"unknown command {command} from process 0")
        key, host = pickle.loads(payload)
        runner.run_step(key, host)
        steps += 1


def _setup_key(name: str) -> str:
    n = _sequence["setup"]
    _sequence["setup"] += 1
    return f"jaxvllm/setup/{n}/{name}"


def from_process_zero(value: int) -> int:
    """Process 0's `value` on every process (e.g. the KV-cache size, which each process
    would otherwise derive from its own free memory)."""
    if not is_multi_process():
        return value
    client, key = _client(), _setup_key("value")
    if is_driver():
        client.key_value_set_bytes(key, str(int(value)).encode())
        return int(value)
    return int(_get(client, key, _SETUP_TIMEOUT_MS).decode())


def check_same_everywhere(description: Any, what: str = "engine configuration") -> None:
    """ValueError on every process unless all processes pass an equal `description` (its
    repr is compared): processes started with different models or flags would otherwise
    hang in mismatched collectives."""
    if not is_multi_process():
        return
    import jax

    client, key = _client(), _setup_key("digest")
    digest = hashlib.sha256(repr(description).encode()).hexdigest().encode()
    client.key_value_set_bytes(f"{key}/{jax.process_index()}", digest)
    digests = [_get(client, f"{key}/{p}", _SETUP_TIMEOUT_MS)
               for p in range(jax.process_count())]
    differ = [p for p, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ValueError(f"process(es) {differ} were started with a different {what} than "
                         f"process 0; start every process with the same model and flags")
