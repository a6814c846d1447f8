"""The `jaxvllm` command line: help with examples everywhere, `serve` as a real subprocess
(answers /health and the API, stops cleanly on SIGINT and SIGTERM with a request in flight),
`generate --stream` and the `chat` loop (in-process, on conftest's `tiny_chat_model`: a tiny
model with SmolLM2's tokenizer and chat template)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from jaxvllm.entrypoints.cli import main

QUESTION = "What is the capital of France?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# help
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [[], ["serve"], ["generate"], ["chat"], ["convert"]],
                         ids=["jaxvllm", "serve", "generate", "chat", "convert"])
def test_help_has_examples(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "jaxvllm " in out.split("examples:")[1]


def test_version_and_no_command(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == "jaxvllm 0.1.0"
    assert main([]) == 2


def test_parser_imports_nothing_heavy():
    code = ("import sys; from jaxvllm.entrypoints.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('jax', 'fastapi', 'uvicorn', 'transformers', 'torch') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_serve_flag_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--max-model-len", "lots"])
    assert e.value.code == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 1  # fails before loading anything
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_api_key_from_flag_or_environment(monkeypatch):
    from jaxvllm.entrypoints.serve_cmd import resolve_api_keys

    monkeypatch.delenv("JAXVLLM_API_KEY", raising=False)
    assert resolve_api_keys(None) is None
    monkeypatch.setenv("JAXVLLM_API_KEY", "from-env")
    assert resolve_api_keys(None) == ["from-env"]
    assert resolve_api_keys(["a", "b"]) == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# serve as a subprocess
# ---------------------------------------------------------------------------------------------


def start_server(model: Path, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxvllm.entrypoints.cli", "serve", str(model),
           "--port", str(port), "--max-model-len", "512", "--max-num-seqs", "16",
           "--served-model-name", "tiny", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited early:\n{proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no /health within {timeout} s:\n{proc.stdout.read()}")


def stop_with_request_in_flight(proc: subprocess.Popen, url: str, sig: int) -> str:
    """Use the server, start a streamed request, send `sig` once its first chunk arrived; the
    request must finish and the process exit 0. Returns the server's output."""
    auth = {"Authorization": "Bearer k3y"}
    assert httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
    assert httpx.get(url + "/v1/models").status_code == 401
    r = httpx.post(url + "/v1/chat/completions", headers=auth, timeout=120, json={
        "model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4

    events: list[str] = []
    first = threading.Event()

    def stream():
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 60,
                "temperature": 0, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth,
                              timeout=120) as resp:
                for line in resp.iter_lines():
                    if line:
                        events.append(line)
                        first.set()
        finally:
            first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60)
    proc.send_signal(sig)
    reader.join(60)
    assert not reader.is_alive()
    rc = proc.wait(60)
    output = proc.stdout.read()
    assert rc == 0, output
    assert events[-1] == "data: [DONE]", events
    finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e[6:])["choices"]]
    assert finishes[-1] == "length"  # it finished within the grace period
    assert f"{signal.Signals(sig).name} received" in output
    assert '"POST /v1/chat/completions" 200' in output  # the line per request
    assert "completion_tokens=60 finish=length" in output
    assert "Traceback" not in output
    return output


def test_serve_subprocesses_answer_and_stop_on_sigint_and_sigterm(tiny_chat_model):
    """Two `jaxvllm serve` processes (started together to share the start-up time): one is
    stopped with SIGINT, the other with SIGTERM, each with a request in flight."""
    ports = [free_port(), free_port()]
    procs = [start_server(tiny_chat_model, port, "--api-key", "k3y", "--shutdown-timeout", "20")
             for port in ports]
    try:
        for proc, port, sig in zip(procs, ports, (signal.SIGINT, signal.SIGTERM)):
            url = f"http://127.0.0.1:{port}"
            wait_healthy(proc, url)
            stop_with_request_in_flight(proc, url, sig)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------------------------------------
# generate --stream and chat
# ---------------------------------------------------------------------------------------------


def test_generate_stream_prints_the_same_text(tiny_chat_model, capsys):
    common = ["generate", "--model", str(tiny_chat_model), "--max-model-len", "512",
              "--max-tokens", "8"]
    assert main([*common, "The capital of France is"]) == 0
    plain = capsys.readouterr().out
    line = next(ln for ln in plain.splitlines() if ln.startswith("'The capital of France is' -> "))
    text = eval(line.split(" -> ", 1)[1])  # the repr of the generated text
    assert main([*common, "--stream", "The capital of France is"]) == 0
    streamed = capsys.readouterr().out
    assert f"== 'The capital of France is' ->\n{text}\n" in streamed

    assert main([*common, "--stream", "--temperature", "0.8", "--top-k", "20", "--min-p", "0.1",
                 "--repetition-penalty", "1.1", "--stop", "xyz", "--seed", "3", "Hello"]) == 0
    assert main([*common, "--top-p", "2", "Hello"]) == 1
    assert "--top-p" in capsys.readouterr().err


def test_chat_loop(tiny_chat_model, capsys, monkeypatch):
    common = ["--model", str(tiny_chat_model), "--max-model-len", "512", "--max-tokens", "6"]
    assert main(["generate", "--chat", *common, QUESTION]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(repr(QUESTION)))
    answer = eval(line.split(" -> ", 1)[1])

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n\n/reset\n{QUESTION}\n/exit\n"))
    assert main(["chat", *common]) == 0
    out = capsys.readouterr().out
    assert out.count(answer) == 2  # the same first turn before and after /reset
    assert "(conversation cleared)" in out

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n"))  # ends with end of input
    assert main(["chat", *common, "--system", "Be brief."]) == 0


def test_serve_engine_flags_reach_the_engine_config():
    from jaxvllm.entrypoints.cli import build_parser
    from jaxvllm.entrypoints.serve_cmd import engine_kwargs

    parser = build_parser()
    args = parser.parse_args(["serve", "m", "--no-async-scheduling", "--unroll-layers"])
    kwargs = engine_kwargs(args)
    assert kwargs["async_scheduling"] is False and kwargs["unroll_layers"] is True
    assert "precompile" not in kwargs  # left to the engine's default
