"""`jaxvllm chat`: an interactive chat in the terminal, through the model's chat template,
the answer printed as it is generated. Also `stream_text`, the token-by-token printer that
`jaxvllm generate --stream` uses."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Iterator, Optional

EPILOG = """\
examples:
  jaxvllm chat                                    # the embedded SmolLM2-135M-Instruct
  jaxvllm chat --model ./Qwen2.5-0.5B-Instruct --temperature 0.7 --max-tokens 512
  jaxvllm chat --system 'You are a pirate.'
  echo 'What is the capital of France?' | jaxvllm chat    # one answer per input line

in the chat: /reset forgets the conversation, /exit (or Ctrl-D) leaves."""


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    """The sampling flags (SamplingParams' names), shared with `jaxvllm generate`."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=temperature, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 is off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop at this text (repeatable)")
    g.add_argument("--stop-token-ids", type=int, nargs="+", default=None, metavar="ID")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params(args, **overrides):
    """SamplingParams from the flags (ValueError names the bad one)."""
    from jaxvllm import SamplingParams

    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                  presence_penalty=args.presence_penalty,
                  frequency_penalty=args.frequency_penalty, min_tokens=args.min_tokens,
                  stop=args.stop, stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos,
                  seed=getattr(args, "seed", None))
    kwargs.update(overrides)
    return SamplingParams(**kwargs)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="An interactive chat: each line you type is a user "
                              "message; the answer streams back.", epilog=EPILOG)
    p.add_argument("--model", default=None, help="HF folder, Hub id, .gguf file or converted "
                   "checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--system", default=None, help="a system message to start with")
    p.add_argument("--seed", type=int, default=0)
    add_sampling_args(p, max_tokens=256, temperature=0.0)
    p.set_defaults(func=run)


def stream_text(engine, prompt, params, request_id: str = "stream") -> Iterator[str]:
    """Run one request alone on `engine` and yield its text as it grows (the deltas).
    The request is aborted if the caller stops early (Ctrl-C)."""
    engine.add_request(request_id, prompt, params)
    sent = 0
    finished = False
    try:
        while engine.has_unfinished_requests() and not finished:
            for out in engine.step():
                if out.request_id != request_id:
                    continue
                text = out.outputs[0].text
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
                finished = out.finished
    finally:
        if not finished:
            engine.abort_request(request_id)


def chat_loop(engine, params, *, system: Optional[str] = None,
              read: Callable[[str], str] = input, write: Callable[[str], object] = None) -> int:
    """The conversation: read a line, answer it, until /exit or end of input."""
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    tok = engine.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError("this model has no chat template; use `jaxvllm generate` instead")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    turn = 0
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = list(start)
            write("(conversation cleared)\n")
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        turn += 1
        answer = []
        try:
            for delta in stream_text(engine, {"prompt_token_ids": list(ids)}, params.clone(),
                                     request_id=f"chat-{turn}"):
                answer.append(delta)
                write(delta)
        except KeyboardInterrupt:
            write(" [interrupted]")
        write("\n")
        messages.append({"role": "assistant", "content": "".join(answer)})


def run(args) -> int:
    params = sampling_params(args)  # check the flags before loading the model
    from jaxvllm.config import EngineConfig
    from jaxvllm.engine.engine import LLMEngine

    start = time.perf_counter()
    engine = LLMEngine(EngineConfig.from_kwargs(model=args.model, tokenizer=args.tokenizer,
                                                dtype=args.dtype, seed=args.seed,
                                                max_model_len=args.max_model_len,
                                                max_num_seqs=1))
    print(f"loaded {engine.loaded.source.name} in {time.perf_counter() - start:.1f} s; "
          f"/reset clears the conversation, /exit leaves", file=sys.stderr)
    return chat_loop(engine, params, system=args.system)
