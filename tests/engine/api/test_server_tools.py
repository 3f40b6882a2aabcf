"""Tool calling through the server on the default model (fp32), with the real openai client: `tool_choice`
required, named and auto give `tool_calls` whose arguments parse and validate (jsonschema) against the tool's
parameters, greedy and sampled; streamed tool-call deltas (id and name first, then argument fragments, one finish
reason) reassemble, by hand and by the client's stream helper, to the whole response; a two-turn loop with a
`role: tool` result; the envelope's schema and stream parser against json.loads; bad tool definitions a 400
naming the field."""
from __future__ import annotations

import json

import httpx2 as httpx
import jsonschema
import pytest
import torch

from server_harness import client, serving
from phiforge.engine.api.protocol import parse_chat
from phiforge.engine.api.tools import ToolSpec, ToolStream, Tool
from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.formats.loader import load_model
from phiforge.engine.model.tokenizer import load_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"$ref": "#/$defs/zone"}}, "required": ["zone"],
                   "additionalProperties": False, "$defs": {"zone": {"enum": ["UTC", "CET", "PST"]}}}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def url():
    path = default_model_path()
    with serving(path, loaded=(load_model(path, dtype=torch.float32), load_tokenizer(path)), max_batch=4) as (u, _):
        yield u


def _valid(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    schema = dict(PARAMS[call.function.name])
    jsonschema.validate(json.loads(call.function.arguments), schema)


@pytest.mark.parametrize("choice", ["required", "auto", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_calls_validate_greedy_and_sampled(url, choice):
    c = client(url)
    # sampled, a 135M model calls tool after tool until max_tokens: one call each (parallel_tool_calls false)
    one = dict(temperature=1.0, parallel_tool_calls=False)
    for kw in (dict(temperature=0), dict(one, seed=1), dict(one, seed=2)):
        r = c.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=80, **kw)
        ch = r.choices[0]
        if ch.message.tool_calls is None:  # auto: the model may answer in text instead
            assert choice == "auto" and ch.finish_reason == "stop" and isinstance(ch.message.content, str)
            continue
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        for call in ch.message.tool_calls:
            _valid(call)
        if isinstance(choice, dict):
            assert [x.function.name for x in ch.message.tool_calls] == ["get_time"]


def test_streamed_tool_calls_reassemble_to_the_whole_response(url):
    c = client(url)
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0)
    whole = c.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in c.chat.completions.create(**kw, stream=True):
        x = chunk.choices[0]
        assert not x.delta.content
        finishes.append(x.finish_reason)
        for d in x.delta.tool_calls or []:
            if d.index not in calls:  # the first delta of a call carries its id, type and name
                assert d.id and d.type == "function" and d.function.name and d.function.arguments == ""
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
    assert [f for f in finishes if f] == ["tool_calls"] and finishes[-1] == "tool_calls"
    assert [(v["name"], v["arguments"]) for _, v in sorted(calls.items())] == \
        [(t.function.name, t.function.arguments) for t in whole]
    with c.chat.completions.stream(**kw) as s:   # the client's own helper
        final = s.get_final_completion().choices[0].message.tool_calls
    assert [(t.function.name, t.function.arguments) for t in final] == \
        [(t.function.name, t.function.arguments) for t in whole]


def test_a_two_turn_tool_loop(url):
    c = client(url)
    first = c.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                      max_tokens=80, temperature=0).choices[0].message
    call = first.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    r = c.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice="none",
                                  max_tokens=20, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    tok = load_tokenizer(default_model_path())
    p = parse_chat({"messages": history, "tools": TOOLS}, tok, 2048, lambda: ["tiny"])
    prompt = tok.decode(p.request.prompt_ids)
    assert "18 degrees and sunny" in prompt and call.id in prompt and '"tool_calls":[{"name":"' in prompt
    assert "get_time" in prompt and "The local time in a time zone" in prompt   # the tools are described


def test_envelope_schema_and_stream_parser():
    tools = [Tool("a", "", {"type": "object", "properties": {"x": {"type": "string"}}}), Tool("b", "", {})]
    one = ToolSpec(tools, "required", parallel=False).schema()
    text = '{"tool_calls":[{"name":"a","arguments":{"x":"q\\"}{,"}}]}'
    jsonschema.validate(json.loads(text), one)
    with pytest.raises(jsonschema.ValidationError):   # parallel_tool_calls false: one call at most
        jsonschema.validate({"tool_calls": [{"name": "b", "arguments": {}}] * 2}, one)
    with pytest.raises(jsonschema.ValidationError):   # a name that is not a tool
        jsonschema.validate({"tool_calls": [{"name": "c", "arguments": {}}]}, one)
    auto = ToolSpec(tools, "auto", parallel=True).schema()
    jsonschema.validate({"response": "hello"}, auto)
    two = '{"tool_calls":[{"name":"a","arguments":{"x":"[1]"}},{"name":"b","arguments":{}}]}'
    for envelope in (text, two, '{"response":"he said \\"hi\\" \\u00e9\\n"}'):
        s, content, calls = ToolStream(), "", {}
        for ch in envelope:   # one character at a time: every split point
            for d in s.push(ch):
                content += d.get("content", "")
                for t in d.get("tool_calls", []):
                    calls.setdefault(t["index"], ["", ""])
                    calls[t["index"]][0] += t["function"].get("name") or ""
                    calls[t["index"]][1] += t["function"]["arguments"]
        message, finish = ToolSpec(tools, "auto", True).message(envelope, "stop")
        if message.get("tool_calls"):
            assert finish == "tool_calls" and [tuple(v) for _, v in sorted(calls.items())] == \
                [(t["function"]["name"], t["function"]["arguments"]) for t in message["tool_calls"]]
            assert [json.loads(v[1]) for v in calls.values()] == [c["arguments"] for c in json.loads(envelope)["tool_calls"]]
        else:
            assert content == message["content"] == json.loads(envelope)["response"] and finish == "stop"
    cut = ToolSpec(tools, "auto", True).message('{"tool_calls":[{"name":"a","argu', "length")
    assert cut == ({"role": "assistant", "content": '{"tool_calls":[{"name":"a","argu'}, "length")


BAD_TOOLS = [  # (body additions, param)
    ({"tools": {"a": 1}}, "tools"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools[0].function.parameters"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"d": {"type": "string", "format": "no-such-format"}}}}}]},
     "tools[1].function.parameters"),
    ({"tools": [TIME, {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"z": {"$ref": "#/$defs/zone"}}, "$defs": {"zone": {"type": "integer"}}}}}]},
     "tools[1].function.parameters.$defs.zone"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": ASK + [{"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
]


def test_bad_tool_definitions_are_400s_naming_the_field(url):
    for extra, param in BAD_TOOLS:
        body = {"model": "tiny", "messages": ASK, "max_tokens": 4, **extra}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert (r.status_code, r.json()["error"]["param"]) == (400, param), (extra, r.text)
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "tools": TOOLS}, timeout=30)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "tools")
    ok = client(url).chat.completions.create(model="tiny", messages=ASK, max_tokens=3)   # the server goes on
    assert ok.choices[0].message.content is not None
