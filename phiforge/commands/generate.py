"""`phiforge generate` and `phiforge chat`: thin terminal front-ends over engine/generate.py's Generator.

    phiforge generate --prompt "Once upon a time" --max-new-tokens 64 --stats
    phiforge generate --chat --prompt "What is the capital of France?" --greedy
    phiforge chat --system "You are terse." --stats          (/reset starts over, /exit or Ctrl-D quits)

Text streams to stdout as it is decoded; `--stats` prints prompt size, TTFT and decode tokens/s to stderr, so
stdout stays the model's text only. `--model` defaults to the default model (built on first use).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from phiforge.engine.generate import GenerationResult, Generator, Prompt
from phiforge.engine.pretrained import load_generator


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: the default model)")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory, applied unmerged")
    p.add_argument("--quant", choices=["nf4"], default=None, help="quantize the decoder projections while loading")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--system", default=None, help="system message (chat)")
    p.add_argument("--stats", action="store_true", help="print TTFT and decode tokens/s to stderr")


def add_arguments_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    _add_common(p)


def add_arguments_chat(p: argparse.ArgumentParser) -> None:
    _add_common(p)


def _load(args: argparse.Namespace, prefix_cache: bool = False) -> Generator:
    return load_generator(args.model, args.adapter, dtype=args.dtype, quant=args.quant, prefix_cache=prefix_cache)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                top_k=args.top_k, top_p=1.0 if args.greedy else args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


def _stream_to_stdout(gen: Generator, prompt: Prompt, kw: dict[str, Any]) -> GenerationResult:
    """Print pieces as they arrive; return the GenerationResult."""
    run = gen.stream(prompt, **kw)
    while True:
        try:
            piece = next(run)
        except StopIteration as done:
            sys.stdout.write("\n")
            sys.stdout.flush()
            return done.value[0]
        sys.stdout.write(piece)
        sys.stdout.flush()


def _print_stats(r: GenerationResult) -> None:
    cached = f" ({r.cached_tokens} from the cache)" if r.cached_tokens else ""
    print(f"[{r.prompt_tokens} prompt tokens{cached}, {len(r.token_ids)} new, finish: {r.finish_reason}, "
          f"TTFT {r.ttft_s * 1000:.0f} ms, decode {r.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)


def run_generate(args: argparse.Namespace) -> int:
    gen = _load(args)
    if args.chat:
        prompt: Any = ([{"role": "system", "content": args.system}] if args.system else []) + \
                      [{"role": "user", "content": args.prompt}]
    else:
        prompt = args.prompt
    try:
        r = _stream_to_stdout(gen, prompt, _sampling(args))
    except ValueError as e:
        print(f"phiforge generate: {e}", file=sys.stderr)
        return 2
    if args.stats:
        _print_stats(r)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    gen = _load(args, prefix_cache=True)  # each turn repeats the conversation: reuse its K/V
    kw = _sampling(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    tty = sys.stdin.isatty()
    if tty:
        print("phiforge chat: /reset starts over, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("you> " if tty else "")
        except EOFError:
            break
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": line})
        if tty:
            sys.stdout.write("assistant> ")
        try:
            r = _stream_to_stdout(gen, messages, kw)
        except ValueError as e:  # the conversation outgrew the context: say so, keep the history as it was
            messages.pop()
            print(f"phiforge chat: {e} (/reset to start over)", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            messages.pop()
            print("\n[interrupted]", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": r.text})
        if args.stats:
            _print_stats(r)
    return 0
