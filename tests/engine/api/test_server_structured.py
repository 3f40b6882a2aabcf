"""response_format through the server with the real openai client: json_schema answers parse and validate
(jsonschema), json_object answers are objects, text is free; an unknown type and a schema that cannot compile are
400s naming the field (OpenAI's error shape), and constrained and free requests are served side by side."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from server_harness import CHAT, adapters, client, ref, server, tiny  # noqa: F401  (fixtures)

SCHEMA = {"type": "object", "properties": {
    "colour": {"enum": ["red", "green", "blue"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 9},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2}},
    "required": ["colour", "count", "tags"], "additionalProperties": False}


def _format(schema=SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_json_schema_answers_validate_greedy_and_seeded(server):
    c = client(server)
    for seed, temperature in ((None, 0), (7, 1.0), (8, 1.0)):
        r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=64, temperature=temperature, seed=seed,
                                      response_format=_format())
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    chunks = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=64, temperature=0, stream=True,
                                       response_format=_format())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_text(server, ref):
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=48, temperature=0,
                                  response_format={"type": "json_object"})
    out = r.choices[0].message.content
    assert out.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(out), dict))
    free = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0,
                                     response_format={"type": "text"})
    assert free.choices[0].message.content == ref(CHAT, max_new_tokens=8).text


@pytest.mark.parametrize("fmt, param", [
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema"),
    ("json", "response_format"),
])
def test_bad_response_formats_are_400s_naming_the_field(server, fmt, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, response_format=fmt)
    assert e.value.body["param"] == param, e.value.body


def test_completions_take_response_format_too(server):
    """/v1/completions shares the field (as vLLM's does): held to the schema, or refused naming it."""
    c = client(server)
    r = c.completions.create(model="tiny", prompt="Colour:", max_tokens=64, temperature=0,
                             extra_body={"response_format": _format()})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body={"response_format": {"type": "xml"}})
    assert e.value.body["param"] == "response_format.type"
