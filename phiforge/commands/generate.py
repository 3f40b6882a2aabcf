"""`phiforge generate` and `phiforge chat`: thin terminal front-ends over engine/serve/generate.py's Generator.

    phiforge generate --prompt "Once upon a time" --max-new-tokens 64 --stats
    phiforge generate --chat --prompt "What is the capital of France?" --greedy
    phiforge chat --system "You are terse." --stats          (/reset starts over, /exit or Ctrl-D quits)
    phiforge generate --prompt-file question.txt              (`--prompt -` or `--prompt-file -` reads stdin)
    phiforge generate --chat --prompt "..." --json-schema invoice.json   (or --regex RE, --choice yes,no)

Text streams to stdout as it is decoded; `--stats` prints prompt size, TTFT and decode tokens/s to stderr, so
stdout stays the model's text only. `--model` defaults to the default model (built on first use).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from phiforge.engine.model.weights import resolve_model
from phiforge.engine.pretrained import load_generator
from phiforge.engine.serve.constraint import Constraint, read_schema
from phiforge.engine.serve.generate import GenerationResult, Generator, Prompt


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a Hugging Face model directory or id, e.g. microsoft/Phi-3-mini-4k-instruct (default: the default model)")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory, applied unmerged")
    p.add_argument("--quant", choices=["nf4", "none"], default=None,
                   help="nf4: quantize the decoder projections while loading; none: keep them dense (default: the "
                        "base the adapter was trained on, NF4 for a QLoRA adapter; dense without an adapter)")
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
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_batch_invariant(p)


def add_batch_invariant(p: argparse.ArgumentParser) -> None:
    """--batch-invariant on|off, shared by generate, chat, serve and evaluate (engine/serve/engine.py)."""
    p.add_argument("--batch-invariant", choices=["on", "off"], default="on",
                   help="on (default): a prompt's answer never depends on what else runs beside it; off: the last "
                        "few percent of speed, and the prefix cache reuses any prefix")


def add_arguments_generate(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text; - reads it from stdin")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE (- for stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--json-schema", metavar="FILE", help="hold the output to the JSON schema in FILE")
    held.add_argument("--regex", metavar="RE", help="hold the output to a regular expression")
    held.add_argument("--choice", metavar="A,B,...", help="the output is one of these comma-separated strings")
    _add_common(p)


def read_constraint(args: argparse.Namespace) -> Constraint | None:
    """--json-schema FILE | --regex RE | --choice A,B,...: checked before the model loads (the engine compiles it)."""
    if args.regex is not None:
        return Constraint("regex", args.regex, "--regex")
    if args.choice is not None:
        options = [c for c in args.choice.split(",") if c]
        if not options:
            raise ValueError("--choice: give one or more comma-separated strings")
        return Constraint("choice", options, "--choice")
    if args.json_schema is None:
        return None
    return Constraint("json_schema", read_schema(args.json_schema), f"--json-schema {args.json_schema}")


def add_arguments_chat(p: argparse.ArgumentParser) -> None:
    _add_common(p)


def check_sampling(args: argparse.Namespace) -> None:
    """Bad values fail here, naming the flag, before the model loads."""
    def bad(flag: str, why: str) -> None:
        raise ValueError(f"{flag}: {why}")

    if args.max_new_tokens < 1:
        bad("--max-new-tokens", f"must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        bad("--temperature", f"must be >= 0 (0 is greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        bad("--top-k", f"must be >= 1 when given, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        bad("--top-p", f"must be in (0, 1], got {args.top_p}")
    if not args.repetition_penalty > 0:
        bad("--repetition-penalty", f"must be > 0, got {args.repetition_penalty}")
    if args.threads is not None and args.threads < 1:
        bad("--threads", f"must be >= 1 when given, got {args.threads}")
    if args.model is not None:
        args.model = str(resolve_model(args.model))
        if not Path(args.model).is_dir():
            bad(f"--model {args.model}", "no such directory (a Hugging Face model directory or id)")


def read_prompt(args: argparse.Namespace) -> str:
    """--prompt TEXT, --prompt - (stdin) or --prompt-file FILE|-."""
    src = args.prompt_file if args.prompt_file is not None else ("-" if args.prompt == "-" else None)
    if src is None:
        return args.prompt
    if src == "-":
        return sys.stdin.read()
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file {src}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {src}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _load(args: argparse.Namespace, prefix_cache: bool = False) -> Generator:
    check_sampling(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_generator(args.model, args.adapter, dtype=args.dtype, quant=args.quant, prefix_cache=prefix_cache,
                          batch_invariant=args.batch_invariant == "on")


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
    text = read_prompt(args)
    constraint = read_constraint(args)
    gen = _load(args)
    if args.chat:
        prompt: Any = ([{"role": "system", "content": args.system}] if args.system else []) + \
                      [{"role": "user", "content": text}]
    else:
        prompt = text
    # a prompt over the context, or a constraint the engine cannot compile: cli.py prints its one line
    r = _stream_to_stdout(gen, prompt, {**_sampling(args), "constraint": constraint})
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
