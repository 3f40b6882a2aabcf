"""The OpenAI API's responses: engine Results in, the whole response out; Deltas in, SSE chunks out.

    response(parsed, results, tokenizer)     -> the chat.completion / text_completion dict
    chunks = Chunks(parsed, tokenizer)        -> first(), delta(d, i), finish(r, i), usage(results), done()

**logprobs** come from the engine (engine/serve/sampling.py: after a constraint's mask, before penalties and
temperature) in OpenAI's two shapes, with each token's raw `bytes` (engine/model/tokenizer.py's token_bytes), so a
client rebuilds characters split across tokens. **n** choices: one per Result, `index` in order; usage counts the
prompt once and sums the choices' tokens; streamed chunks of different choices interleave. With **tools** in play
(engine/api/tools.py), a chat reply's envelope becomes `message.tool_calls` or `content`, streamed as OpenAI's
tool-call deltas.
"""
from __future__ import annotations

import json
import time
from typing import Any

from phiforge.engine.serve.request import Delta, Result
from phiforge.engine.serve.sampling import TokenLogprob

from .protocol import APIError, Parsed
from .tools import ToolStream


def response_id(p: Parsed) -> str:
    return ("chatcmpl-" if p.kind == "chat" else "cmpl-") + p.request.id


def usage(rs: list[Result], n: int = 1) -> dict[str, Any]:
    """Each prompt counted once (its first choice's), the completions of every choice summed (OpenAI's rule for
    n > 1 and for a list of prompts)."""
    firsts = rs[::n]
    prompt, done = sum(r.usage.prompt_tokens for r in firsts), sum(r.usage.completion_tokens for r in rs)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
            "prompt_tokens_details": {"cached_tokens": sum(r.usage.cached_tokens for r in firsts)}}


class Logprobs:
    """Engine TokenLogprobs in OpenAI's two shapes: chat's list of {token, logprob, bytes, top_logprobs}, and
    completions' parallel arrays {tokens, token_logprobs, top_logprobs (a dict per token, the chosen one always
    in it), text_offset (the character where each token starts, counted from the tokens' bytes)}."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.chars: dict[int, str] = {}   # per choice: the text so far, decoded from its tokens' bytes
        self.pending: dict[int, bytes] = {}

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        b = self.tok.token_bytes(token_id)
        return {"token": b.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(b)}

    def chat(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        return {"content": [{**self._entry(e.id, e.logprob), "top_logprobs": [self._entry(i, v) for i, v in e.top]}
                            for e in entries], "refusal": None}

    def completion(self, entries: list[TokenLogprob] | None, index: int = 0) -> dict[str, Any] | None:
        if entries is None:
            return None
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text = self.chars.get(index, "")
            out["text_offset"].append(len(text))
            raw = self.pending.get(index, b"") + self.tok.token_bytes(e.id)
            k = _cut(raw)
            self.chars[index], self.pending[index] = text + raw[:k].decode("utf-8", "replace"), raw[k:]
            tok = self._entry(e.id, e.logprob)["token"]
            out["tokens"].append(tok)
            out["token_logprobs"].append(e.logprob)
            top = {self._entry(i, v)["token"]: v for i, v in e.top}
            top.setdefault(tok, e.logprob)
            out["top_logprobs"].append(top)
        return out


def _cut(raw: bytes) -> int:
    """Where the last complete UTF-8 character of `raw` ends (a character split across tokens waits)."""
    for back in range(1, min(4, len(raw)) + 1):
        b = raw[-back]
        if b & 0xC0 != 0x80:  # a lead byte (or ASCII): the character it starts needs this many bytes
            need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4
            return len(raw) if need <= back else len(raw) - back
    return len(raw)


def _message(p: Parsed, r: Result) -> tuple[dict[str, Any], str]:
    if p.tools is None:
        return {"role": "assistant", "content": r.text}, r.finish_reason
    return p.tools.message(r.text, r.finish_reason)


def response(p: Parsed, rs: list[Result], tokenizer: Any, created: int | None = None) -> dict[str, Any]:
    """The whole (non-streamed) response: one choice per Result, in index order."""
    lp, choices = Logprobs(tokenizer), []
    for i, r in enumerate(rs):
        if p.kind == "chat":
            message, finish = _message(p, r)
            choices.append({"index": i, "message": message, "logprobs": lp.chat(r.logprobs),
                            "finish_reason": finish})
        else:
            choices.append({"index": i, "text": r.text, "logprobs": lp.completion(r.logprobs, i),
                            "finish_reason": r.finish_reason})
    return {"id": response_id(p), "object": "chat.completion" if p.kind == "chat" else "text_completion",
            "created": created or int(time.time()), "model": p.model, "choices": choices, "usage": usage(rs, p.n)}


class Chunks:
    """The SSE chunks of one streamed response: [a role chunk per choice (chat)], text chunks, a finish chunk per
    choice, [the usage chunk], then `done()`. Every chunk carries `"usage": null` when usage was asked for, as
    OpenAI's do."""

    def __init__(self, p: Parsed, tokenizer: Any) -> None:
        self.p, self.created, self.id = p, int(time.time()), response_id(p)
        self.lp = Logprobs(tokenizer)
        self.tools = [ToolStream() for _ in range(p.n)] if p.tools is not None else None   # per choice (chat)

    def _chunk(self, choices: list[dict], usage_: dict | None = None, last: bool = False) -> str:
        chunk: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk" if self.p.kind == "chat"
                                 else "text_completion", "created": self.created, "model": self.p.model,
                                 "choices": choices}
        if self.p.include_usage:
            chunk["usage"] = usage_ if last else None
        return "data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n"

    def _choice(self, i: int, text: str | None, finish: str | None, logprobs: list | None = None,
                role: bool = False, delta: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.p.kind == "chat":
            if delta is None:
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            return {"index": i, "delta": delta, "logprobs": self.lp.chat(logprobs), "finish_reason": finish}
        return {"index": i, "text": text or "", "logprobs": self.lp.completion(logprobs, i), "finish_reason": finish}

    def first(self) -> str | None:
        """The chat role chunks, sent before any token so the client sees the stream open at once."""
        if self.p.kind != "chat":
            return None
        return "".join(self._chunk([self._choice(i, None, None, role=True)]) for i in range(self.p.n))  # chat: 1 prompt

    def delta(self, d: Delta, i: int = 0) -> str | None:
        """A chunk for the Delta when it has text or logprobs (a held-back character waits for its text)."""
        if self.tools is not None:  # the envelope as tool-call or content deltas; the logprobs ride on the first
            deltas = self.tools[i].push(d.text) or ([{}] if d.logprobs else [])
            return "".join(self._chunk([self._choice(i, None, None, d.logprobs or None if k == 0 else None,
                                                     delta=x)]) for k, x in enumerate(deltas)) or None
        if not d.text and not d.logprobs:
            return None
        return self._chunk([self._choice(i, d.text, None, d.logprobs or None)])

    def finish(self, r: Result, i: int = 0) -> str:
        reason = r.finish_reason
        if self.tools is not None and self.tools[i].called and reason == "stop":
            reason = "tool_calls"
        return self._chunk([self._choice(i, None if self.p.kind == "chat" else "", reason)])

    def usage(self, rs: list[Result]) -> str:
        return self._chunk([], usage(rs, self.p.n), last=True) if self.p.include_usage else ""

    @staticmethod
    def error(e: APIError) -> str:
        return "data: " + json.dumps(e.body()) + "\n\n"

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"
