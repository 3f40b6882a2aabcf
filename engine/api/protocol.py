"""The OpenAI API's requests: a request body in, an engine Request out (or one APIError naming the field);
engine/api/response.py shapes what comes back.

    parse_chat(body, tokenizer, max_context, models)        -> Parsed   (POST /v1/chat/completions)
    parse_completion(body, tokenizer, max_context, models)  -> Parsed   (POST /v1/completions)

Validation is by hand, not by a pydantic model: every rejection is a 400 whose `param` is the exact field at fault
(`messages[2].content`, `stop[1]`), in OpenAI's error shape {"error": {"message", "type", "param", "code"}}, and
the checks run before anything is tokenized or submitted. Booleans are never numbers here (`"max_tokens": true` is
a 400, though Python's bool is an int). Which fields exist, and which are honoured, accepted without effect or
refused, is engine/api/fields.py's table: an unknown field is a 400 naming it (OpenAI's own API answers so), unless
the server ignores unknown fields.

What the engine is asked for beyond sampling (temperature, top_p, top_k, min_p, penalties, logit_bias, seed,
stop): `response_format` (a Constraint), `tools` / `tool_choice` (an envelope constraint and the tools in the
prompt, engine/api/tools.py), chat `logprobs` + `top_logprobs` (0-20) or completions `logprobs` (0-5), `n` choices
up to the server's `max_n`, and for completions a list of prompts (one Request each).

Adapters are chosen with the `model` field (vLLM's convention): the base model's name or a loaded adapter's name;
an unknown name is a 404. A missing `model` means the base model.

Defaults follow OpenAI: temperature 1, top_p 1; completions stop after 16 tokens unless `max_tokens` says
otherwise, chat runs to the context's end (`max_completion_tokens` is the newer name for `max_tokens`). Prompt +
max_tokens over the context is a 400 here, before any compute.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from typing import Any, Callable

from phiforge.engine.serve.constraint import Constraint
from phiforge.engine.serve.request import Request
from phiforge.engine.serve.sampling import MAX_LOGPROBS, SamplingParams

from .fields import FieldError, check_fields
from .tools import ToolError, ToolSpec, parse_tools, past_turn

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for completions' logprobs (chat's top_logprobs: the engine's, 20)
DEFAULT_MAX_N = 8             # choices per request unless the server says otherwise (serve --max-n)
MAX_STOP = 16                 # OpenAI documents 4; more is harmless for the engine, unbounded is not
COMPLETION_DEFAULT_TOKENS = 16
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 499: "invalid_request_error",
               500: "server_error", 503: "unavailable_error"}
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_PROMPTS = 64              # prompts in one completions request (each with its n choices)


class APIError(Exception):
    """An HTTP error in OpenAI's shape. `param` names the request field at fault (None when no one field is)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str | None, message: str) -> APIError:
    return APIError(400, message, param=param)


@dataclass
class Parsed:
    """A validated request: what the engine runs and how the response is to be shaped."""
    kind: str                   # "chat" | "completion"
    model: str                  # the name the client asked for (echoed in responses)
    requests: list[Request]     # one per prompt (chat: one); each runs n choices
    stream: bool
    include_usage: bool
    n: int = 1                  # choices per prompt: choice j of prompt i has index i * n + j
    tools: ToolSpec | None = None   # chat with tools in play: the reply is a tool-call envelope (engine/api/tools.py)

    @property
    def request(self) -> Request:
        return self.requests[0]


# ---- field checks -------------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and v == v  # NaN is no number here


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v):
        raise bad(name, f"'{name}' must be a number, got {json.dumps(v)}")
    if v > hi or v < lo or (lo_open and v == lo):
        left = "(" if lo_open else "["
        raise bad(name, f"'{name}' must be in {left}{lo}, {hi}], got {v}")
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise bad(name, f"'{name}' must be an integer, got {json.dumps(v)}")
    if v < lo or (hi is not None and v > hi):
        raise bad(name, f"'{name}' must be >= {lo}" + (f" and <= {hi}" if hi is not None else "") + f", got {v}")
    return int(v)


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(name, f"'{name}' must be a boolean, got {json.dumps(v)}")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list):
        raise bad("stop", f"'stop' must be a string or a list of strings, got {json.dumps(v)}")
    if len(items) > MAX_STOP:
        raise bad("stop", f"'stop' has {len(items)} strings; at most {MAX_STOP} are allowed")
    for i, s in enumerate(items):
        if not isinstance(s, str) or not s:
            raise bad(f"stop[{i}]" if isinstance(v, list) else "stop",
                      f"each stop sequence must be a non-empty string, got {json.dumps(s)}")
    return tuple(items)


def _model(body: dict, models: Callable[[], list[str]]) -> tuple[str, str | None]:
    """(the name asked for, the adapter to run: None for the base). models()[0] is the base model's name."""
    names = models()
    v = body.get("model")
    if v is None:
        return names[0], None
    if not isinstance(v, str):
        raise bad("model", f"'model' must be a string, got {json.dumps(v)}")
    if v not in names:
        raise APIError(404, f"The model '{v}' does not exist; GET /v1/models lists the base model and its "
                            f"adapters ({', '.join(names)})", param="model", code="model_not_found")
    return v, (None if v == names[0] else v)


def _logit_bias(body: dict, vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}, every id inside the vocabulary."""
    v = body.get("logit_bias")
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise bad("logit_bias", f"'logit_bias' must be an object of token id -> bias, got {json.dumps(v)}")
    out = []
    for key, bias in v.items():
        try:
            tid = int(key)
        except ValueError:
            raise bad("logit_bias", f"logit_bias: {json.dumps(key)} is not a token id") from None
        if not 0 <= tid < vocab:
            raise bad("logit_bias", f"logit_bias: token id {tid} is outside the vocabulary [0, {vocab})")
        if not _is_num(bias) or not -100 <= bias <= 100:
            raise bad("logit_bias", f"logit_bias[{key}] must be a number in [-100, 100], got {json.dumps(bias)}")
        out.append((tid, float(bias)))
    return tuple(out)


def _sampling(body: dict, vocab: int) -> SamplingParams:
    kw: dict[str, Any] = dict(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                              top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                              repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
                              min_p=_number(body, "min_p", 0.0, 0.0, 1.0), logit_bias=_logit_bias(body, vocab))
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k) or top_k < -1:
            raise bad("top_k", f"'top_k' must be an integer >= -1 (-1 or 0: off), got {json.dumps(top_k)}")
        kw["top_k"] = None if top_k <= 0 else int(top_k)
    for name in ("presence_penalty", "frequency_penalty"):
        kw[name] = _number(body, name, 0.0, -2.0, 2.0)
    return SamplingParams(**kw)


def _common(body: Any, models: Callable[[], list[str]], max_n: int, kind: str, vocab: int,
            ignore_unknown: bool) -> dict[str, Any]:
    """The fields chat and completions share, checked (engine/api/fields.py first: a refused or unknown field is
    a 400); the prompt, max_tokens and logprobs are each kind's own."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    try:
        check_fields(body, kind, ignore_unknown)
    except FieldError as e:
        raise bad(e.param, str(e)) from None
    n = _integer(body, "n", 1, max_n)
    model, adapter = _model(body, models)
    stream = _flag(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
        if not isinstance(opts, dict):
            raise bad("stream_options", f"'stream_options' must be an object, got {json.dumps(opts)}")
        include_usage = _flag(opts, "include_usage")
        extra = [k for k in opts if k != "include_usage"]
        if extra:
            raise bad(f"stream_options.{extra[0]}", f"stream_options.{extra[0]} is not supported (include_usage is)")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad("seed", f"'seed' must be an integer, got {json.dumps(seed)}")
    return dict(model=model, adapter=adapter, stream=stream, include_usage=include_usage, seed=seed,
                stop=_stop(body), sampling=_sampling(body, vocab), constraint=_response_format(body), n=n or 1)


def _chat_logprobs(body: dict) -> int | None:
    """`logprobs: true` + `top_logprobs` k -> k (0 without it); None when logprobs are not asked for."""
    want = _flag(body, "logprobs")
    k = _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
    if k is not None and not want:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return (k or 0) if want else None


def _response_format(body: dict) -> Constraint | None:
    """OpenAI's response_format as the engine's constraint: text (none), json_object (any JSON object) or
    json_schema ({"json_schema": {"name", "schema", "strict"?}}); any other type is refused, never ignored."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad("response_format", f"'response_format' must be an object with a 'type', got {json.dumps(rf)}")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object", None, "response_format")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise bad("response_format.json_schema", "'response_format.json_schema' must be an object with a "
                                                     "'name' and a 'schema'")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema", "'response_format.json_schema.schema' must be a "
                                                            f"JSON-schema object, got {json.dumps(schema)}")
        return Constraint("json_schema", schema, "response_format.json_schema.schema")
    raise bad("response_format.type", f"response_format type {json.dumps(kind)} is not supported (text, "
                                      "json_object or json_schema)")


def _budget(prompt_ids: list[int], max_tokens: int | None, max_context: int, prompt_field: str,
            tokens_field: str) -> int:
    """max_tokens checked against the context (None: whatever the context leaves)."""
    room = max_context - len(prompt_ids)
    if room < 1:
        raise bad(prompt_field, f"the prompt is {len(prompt_ids)} tokens; the model's context is {max_context} "
                                "tokens and at least one must be left to generate")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise bad(tokens_field, f"{len(prompt_ids)} prompt tokens + {tokens_field} {max_tokens} = "
                                f"{len(prompt_ids) + max_tokens} is over the model's context of {max_context} tokens")
    return max_tokens


def _content(content: Any, where: str) -> str:
    if isinstance(content, list):  # content parts: only text ones
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}]", f"{where}.content[{j}] must be a text part "
                                                   '{"type": "text", "text": "..."}')
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise bad(f"{where}.content", f"{where}.content must be a string or a list of text parts, "
                                      f"got {json.dumps(content)}")
    return content


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's past tool calls, checked: [{id, type: function, function: {name, arguments}}]."""
    if not isinstance(calls, list):
        raise bad(f"{where}.tool_calls", f"{where}.tool_calls must be a list")
    for j, c in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise bad(at, f"{at} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}")
        try:
            if not isinstance(json.loads(f.get("arguments") or "{}"), dict):
                raise ValueError("not an object")
        except (TypeError, ValueError) as e:
            raise bad(f"{at}.function.arguments", f"{at}.function.arguments must be a JSON object as a string "
                                                  f"({e})") from None
    return calls


def _message_text(m: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(where, f"{where} must be an object with 'role' and 'content'")
    role = m.get("role")
    if role not in ROLES:
        raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}")
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""
    out: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": _content(content, where)}
    if role == "assistant" and m.get("tool_calls"):
        out["tool_calls"] = _tool_calls(m["tool_calls"], where)
    if role == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise bad(f"{where}.tool_call_id", f"{where} (a tool result) needs its 'tool_call_id'")
        out["tool_call_id"] = m["tool_call_id"]
    return out


def parse_chat(body: Any, tokenizer: Any, max_context: int, models: Callable[[], list[str]],
               max_n: int = DEFAULT_MAX_N, vocab_size: int | None = None, ignore_unknown: bool = False) -> Parsed:
    c = _common(body, models, max_n, "chat", vocab_size or tokenizer.vocab_size, ignore_unknown)
    logprobs = _chat_logprobs(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    chat = [_message_text(m, i) for i, m in enumerate(messages)]
    extra: dict[str, Any] = {}
    try:
        tools = parse_tools(body)
        if tools is not None:  # a response_format shapes the text answer inside the envelope
            chat, extra = tools.prompt(chat, tokenizer.chat_template)
            rf = c["constraint"]
            c["constraint"] = tools.constraint(None if rf is None else {"type": "object"} if rf.kind == "json_object"
                                               else rf.value)
    except ToolError as e:
        raise bad(e.param, str(e)) from None
    if tools is None:  # earlier calls and results still read as the model wrote and got them
        chat = [past_turn(m) for m in chat]
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, 1)
    try:
        ids = list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, **extra))
    except Exception as e:  # a template's raise_exception (e.g. roles that must alternate) is the client's error
        raise bad("messages", f"the chat template rejected the messages: {e}") from None
    budget = _budget(ids, max_tokens, max_context, "messages", name)
    req = Request(prompt_ids=ids, max_tokens=budget, sampling=c["sampling"], seed=c["seed"], stop=c["stop"],
                  adapter=c["adapter"], constraint=c["constraint"], logprobs=logprobs)
    return Parsed("chat", c["model"], [req], c["stream"], c["include_usage"], c["n"], tools)


def _prompt_ids(prompt: Any, tokenizer: Any, vocab: int, where: str = "prompt") -> list[int]:
    """One prompt: a string or a non-empty list of token ids."""
    if isinstance(prompt, str):
        ids = list(tokenizer.encode(prompt))
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        for i, t in enumerate(prompt):
            if not 0 <= t < vocab:
                raise bad(f"{where}[{i}]", f"token id {t} is outside the vocabulary [0, {vocab})")
        ids = [int(t) for t in prompt]
    else:
        raise bad(where, f"'{where}' must be a string or a non-empty list of token ids")
    if not ids:
        raise bad(where, f"{where} is empty: at least one token is needed to start generating")
    return ids


def _prompts(prompt: Any, tokenizer: Any, vocab: int) -> list[tuple[str, list[int]]]:
    """(field, ids) of each prompt in OpenAI's four forms: a string, token ids, a list of strings, a list of
    token-id lists."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise bad("prompt", f"'prompt' holds {len(prompt)} prompts; at most {MAX_PROMPTS} per request")
        return [(f"prompt[{i}]", _prompt_ids(p, tokenizer, vocab, f"prompt[{i}]")) for i, p in enumerate(prompt)]
    return [("prompt", _prompt_ids(prompt, tokenizer, vocab))]


def parse_completion(body: Any, tokenizer: Any, max_context: int, models: Callable[[], list[str]],
                     vocab_size: int | None = None, max_n: int = DEFAULT_MAX_N,
                     ignore_unknown: bool = False) -> Parsed:
    vocab = vocab_size or tokenizer.vocab_size
    c = _common(body, models, max_n, "completion", vocab, ignore_unknown)
    logprobs = _integer(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    if "prompt" not in body:
        raise bad("prompt", "'prompt' is required")
    max_tokens = _integer(body, "max_tokens", 1)
    reqs = []
    for where, ids in _prompts(body["prompt"], tokenizer, vocab):
        budget = _budget(ids, COMPLETION_DEFAULT_TOKENS if max_tokens is None else max_tokens, max_context, where,
                         "max_tokens")
        reqs.append(Request(prompt_ids=ids, max_tokens=budget, sampling=c["sampling"], seed=c["seed"],
                            stop=c["stop"], adapter=c["adapter"], constraint=c["constraint"], logprobs=logprobs))
    return Parsed("completion", c["model"], reqs, c["stream"], c["include_usage"], c["n"])
