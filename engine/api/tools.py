"""Tool calling in the OpenAI API: `tools` and `tool_choice` in, a constrained JSON envelope through the engine,
`message.tool_calls` (or tool-call deltas, streamed) out.

    spec = parse_tools(body)                        # None when no tools are in play (none given, or "none")
    messages = spec.prompt(messages, template)      # the tools and the reply format in the prompt
    constraint = spec.constraint(response_schema)   # what the reply must be
    message, finish = spec.message(text, finish)    # the reply as OpenAI's assistant message

**The envelope.** None of the default model, Phi-3-mini or Phi-3.5-mini has a tool format of its own, so every
reply with tools in play is one compact JSON object, held to it by the engine's grammar mask (llama.cpp's
"generic" tool format): `{"tool_calls":[{"name":N,"arguments":{...}}, ...]}` to call tools, or, when tool_choice
is "auto", `{"response":"..."}` to answer in text (the request's json_schema response_format, if any, takes the
string's place). Each call's `name` is one of the tools and its `arguments` are valid against that tool's
`parameters`; "required" allows only calls, a named tool_choice exactly one call of that tool,
`parallel_tool_calls: false` at most one call. Tool schemas' `$defs` are gathered at the envelope's root, so their
local `$ref`s resolve (two tools defining one name differently is a 400).

**The prompt.** The tools (name, description, parameters) and the envelope are described in a system message
(appended to the caller's first system message, or a new one): the default model's and Phi-3/3.5-mini's templates
have no tools section. A template that reads a top-level `tools` variable also gets the list; Phi-4-mini's, which
reads `tools` from the system message, gets it there. Past turns go back as the model wrote them: an assistant
message's `tool_calls` become its envelope text, and a `role: tool` result becomes a user turn carrying
`{"tool_result": {"tool_call_id", "content"}}` (those templates have no tool role), so a client can run the loop.

**Streaming.** `ToolStream` reads the envelope as it grows and turns it into OpenAI's deltas: for each call, first
its index, id, type and name (with `arguments: ""`), then fragments of the arguments' JSON text; for a text answer,
the string's characters as content.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from phiforge.engine.serve.constraint import Constraint

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
CALLS_PREFIX, RESPONSE_PREFIX = '{"tool_calls":[', '{"response":'


class ToolError(ValueError):
    """A bad `tools`, `tool_choice` or tool message; `param` names the field (the server's 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict


@dataclass
class ToolSpec:
    tools: list[Tool]
    choice: str                 # "auto" | "required" | a tool's name
    parallel: bool

    # ---- the prompt -----------------------------------------------------------------------------------------------
    def instruction(self) -> str:
        listing = json.dumps([{"name": t.name, "description": t.description, "parameters": t.parameters}
                              for t in self.tools], ensure_ascii=False)
        call = '{"tool_calls":[{"name":<tool name>,"arguments":<its arguments>}]}'
        text = f"You can call these tools (each with a JSON schema of its arguments):\n{listing}\n"
        if self.choice == "auto":
            return text + f'Reply with one JSON object: {call} to call tools, or {{"response":<your answer>}} ' \
                          "to answer directly."
        target = "tools" if self.choice == "required" else f"the tool {self.choice}"
        return text + f"Reply with one JSON object that calls {target}: {call}"

    def prompt(self, messages: list[dict[str, Any]], template: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(messages with the tools described, extra template variables)."""
        out = [past_turn(m) for m in messages]
        listing = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                     "parameters": t.parameters}} for t in self.tools]
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + self.instruction()}
        else:
            out.insert(0, {"role": "system", "content": self.instruction()})
        if "message['tools']" in template or "message.tools" in template:   # Phi-4-mini
            out[0]["tools"] = json.dumps([x["function"] for x in listing], ensure_ascii=False)
        extra = {"tools": listing} if re.search(r"(?<![\w'\".\[])tools\b", template) else {}
        return out, extra

    # ---- the constraint -------------------------------------------------------------------------------------------
    def schema(self, response: dict | None = None) -> dict:
        defs: dict[str, Any] = {}
        calls = []
        for i, t in enumerate(self.tools):
            if self.choice not in ("auto", "required") and t.name != self.choice:
                continue
            params = copy.deepcopy(t.parameters) if t.parameters else dict(NO_ARGUMENTS)
            for key in ("$defs", "definitions"):
                for name, d in params.pop(key, {}).items():
                    if defs.setdefault(key, {}).setdefault(name, d) != d:
                        raise ToolError(f"tools[{i}].function.parameters.{key}.{name}",
                                        f"tools define {key}/{name} differently; a shared name must mean one schema")
            calls.append({"type": "object", "properties": {"name": {"const": t.name}, "arguments": params},
                          "required": ["name", "arguments"], "additionalProperties": False})
        array: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                                 "minItems": 1}
        if not self.parallel or self.choice not in ("auto", "required"):
            array["maxItems"] = 1
        envelope: dict[str, Any] = {"type": "object", "properties": {"tool_calls": array},
                                    "required": ["tool_calls"], "additionalProperties": False}
        if self.choice == "auto":
            answer = {"type": "object", "properties": {"response": response or {"type": "string"}},
                      "required": ["response"], "additionalProperties": False}
            envelope = {"anyOf": [envelope, answer]}
        return {**envelope, **defs}

    def constraint(self, response: dict | None = None) -> Constraint:
        return Constraint("json_schema", self.schema(response), "tools")

    # ---- the reply ------------------------------------------------------------------------------------------------
    def message(self, text: str, finish: str) -> tuple[dict[str, Any], str]:
        """OpenAI's assistant message and finish_reason for the reply text. A reply cut by max_tokens is not an
        envelope yet: it comes back as content, finish "length"."""
        try:
            reply = json.loads(text)
        except ValueError:
            return {"role": "assistant", "content": text}, finish
        if isinstance(reply, dict) and "tool_calls" in reply:
            raw = _calls_so_far(text[len(CALLS_PREFIX):]) if text.startswith(CALLS_PREFIX) else []
            if len(raw) != len(reply["tool_calls"]):  # not compact: the arguments re-encoded
                raw = [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in reply["tool_calls"]]
            # the arguments as the model wrote them: the very text a stream of the same reply sends
            calls = [{"id": call_id(), "type": "function", "function": {"name": name, "arguments": args}}
                     for name, args in raw]
            return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
        if isinstance(reply, dict) and "response" in reply:
            answer = reply["response"]
            return {"role": "assistant",
                    "content": answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)}, finish
        return {"role": "assistant", "content": text}, finish


def call_id() -> str:
    return "call_" + uuid4().hex[:24]


# ---- parsing the request --------------------------------------------------------------------------------------------
def parse_tools(body: dict) -> ToolSpec | None:
    """The request's tools and tool_choice, checked (ToolError naming the field); None when no tool is in play."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise ToolError("tool_choice", "'tool_choice' needs 'tools'")
        return None
    if not isinstance(tools, list):
        raise ToolError("tools", f"'tools' must be a list of function tools, got {json.dumps(tools)}")
    parsed, names = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            raise ToolError(f"{where}.type", f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}} "
                                             f"(only function tools are supported)")
        f = t.get("function")
        if not isinstance(f, dict):
            raise ToolError(f"{where}.function", f"{where}.function must be an object with a 'name'")
        name = f.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ToolError(f"{where}.function.name", f"{where}.function.name must be 1-64 of a-z, A-Z, 0-9, _ "
                                                      f"and -, got {json.dumps(name)}")
        if name in names:
            raise ToolError(f"{where}.function.name", f"the tool name {name!r} is given twice")
        params = f.get("parameters", {})
        if not isinstance(params, dict):
            raise ToolError(f"{where}.function.parameters", f"{where}.function.parameters must be a JSON-schema "
                                                            f"object, got {json.dumps(params)}")
        desc = f.get("description", "")
        if not isinstance(desc, str):
            raise ToolError(f"{where}.function.description", f"{where}.function.description must be a string")
        names.add(name)
        parsed.append(Tool(name, desc, params))
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ToolError("parallel_tool_calls", f"'parallel_tool_calls' must be a boolean, got {json.dumps(parallel)}")
    if choice is None:
        choice = "auto"
    if choice == "none":
        return None
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolError("tool_choice", 'a named tool_choice is {"type": "function", "function": {"name": ...}}')
        if fn["name"] not in names:
            raise ToolError("tool_choice.function.name", f"tool {fn['name']!r} is not among the request's tools "
                                                         f"({', '.join(sorted(names))})")
        choice = fn["name"]
    elif choice not in ("auto", "required"):
        raise ToolError("tool_choice", f"'tool_choice' must be none, auto, required or a named function, got "
                                       f"{json.dumps(choice)}")
    return ToolSpec(parsed, choice, parallel)


def check_tool_parameters(spec: ToolSpec, compile_one) -> None:
    """After the envelope failed to compile: find the tool whose parameters are at fault (compile_one raises)."""
    for i, t in enumerate(spec.tools):
        try:
            compile_one(Constraint("json_schema", t.parameters or NO_ARGUMENTS, f"tools[{i}].function.parameters"))
        except ValueError as e:
            raise ToolError(f"tools[{i}].function.parameters", str(e)) from None


def past_turn(m: dict[str, Any]) -> dict[str, Any]:
    """An earlier turn in the form the model reads: calls as the envelope it wrote, results as a user turn."""
    if m["role"] == "assistant" and m.get("tool_calls"):
        calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")}
                 for c in m["tool_calls"]]
        return {"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False,
                                                           separators=(",", ":"))}
    if m["role"] == "tool":
        result = {"tool_result": {"tool_call_id": m["tool_call_id"], "content": m["content"]}}
        return {"role": "user", "content": json.dumps(result, ensure_ascii=False)}
    return {"role": m["role"], "content": m["content"]}


# ---- streaming -------------------------------------------------------------------------------------------------------
class ToolStream:
    """The envelope text as it grows → OpenAI delta dicts (`{"content": ...}` or `{"tool_calls": [...]}`)."""

    def __init__(self) -> None:
        self.text = ""
        self.sent_calls: list[tuple[str, int]] = []   # per call: its id, the argument characters sent
        self.sent_content = 0

    def push(self, piece: str) -> list[dict[str, Any]]:
        self.text += piece
        out: list[dict[str, Any]] = []
        if self.text.startswith(CALLS_PREFIX):
            for i, (name, args) in enumerate(_calls_so_far(self.text[len(CALLS_PREFIX):])):
                if i == len(self.sent_calls):
                    self.sent_calls.append((call_id(), 0))
                    out.append({"tool_calls": [{"index": i, "id": self.sent_calls[i][0], "type": "function",
                                                "function": {"name": name, "arguments": ""}}]})
                cid, sent = self.sent_calls[i]
                if len(args) > sent:
                    out.append({"tool_calls": [{"index": i, "function": {"arguments": args[sent:]}}]})
                    self.sent_calls[i] = (cid, len(args))
        elif self.text.startswith(RESPONSE_PREFIX + '"'):
            answer = _string_so_far(self.text[len(RESPONSE_PREFIX) + 1:])
            if len(answer) > self.sent_content:
                out.append({"content": answer[self.sent_content:]})
                self.sent_content = len(answer)
        return out

    @property
    def called(self) -> bool:
        return bool(self.sent_calls)


def _calls_so_far(s: str) -> list[tuple[str, str]]:
    """[(name, the arguments' JSON text so far)] from `{"name":"N","arguments":{...}},{...` (compact, in order)."""
    calls, pos = [], 0
    head = '{"name":"'
    while s.startswith(head, pos):
        end = s.find('"', pos + len(head))
        if end < 0 or not s.startswith(',"arguments":', end + 1):
            break
        name = s[pos + len(head):end]
        start = end + 1 + len(',"arguments":')
        stop = _json_end(s, start)
        calls.append((name, s[start:stop]))
        if stop == len(s) or not s.startswith("}", stop):
            break
        pos = stop + 1
        if not s.startswith(",", pos):
            break
        pos += 1
    return calls


def _json_end(s: str, start: int) -> int:
    """Where the JSON value that starts at `start` ends (len(s) if it has not ended yet)."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(s)):
        c = s[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(s)


def _string_so_far(s: str) -> str:
    """The characters of a JSON string body so far (up to its closing quote), escapes decoded; an escape still
    arriving waits."""
    body, i = [], 0
    while i < len(s):
        c = s[i]
        if c == '"':
            break
        if c == "\\":
            n = 6 if s.startswith("u", i + 1) else 2
            if i + n > len(s):
                break
            body.append(json.loads('"' + s[i:i + n] + '"'))
            i += n
            continue
        body.append(c)
        i += 1
    return "".join(body)
