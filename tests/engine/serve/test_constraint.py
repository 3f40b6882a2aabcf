"""engine/serve/constraint.py through the serving engine, on the default model (a real tokenizer, fp32): constrained
outputs, greedy and sampled, parse and validate against their JSON schema (jsonschema), match their regex or choice,
end with "stop" when the grammar is complete and "length" when max_tokens cuts them first; an unconstrained row
beside constrained ones is what it is alone; a schema that cannot compile is an error naming the field, before any
compute; the same schema compiles once."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.formats.loader import load_model
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.engine.serve.constraint import Constraint
from phiforge.engine.serve.engine import Engine
from phiforge.engine.serve.generate import Generator
from phiforge.engine.serve.request import InvalidRequest, Request
from phiforge.engine.serve.sampling import SamplingParams

SCHEMAS = {
    "enum and bounds": {"type": "object", "properties": {
        "country": {"enum": ["France", "Germany", "Spain"]},
        "population": {"type": "integer", "minimum": 1, "maximum": 99999999},
        # a fraction of unbounded length lets a sampled 135M model write digits until max_tokens: two places
        "score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}},
        "required": ["country", "population", "score"], "additionalProperties": False},
    "nested object": {"type": "object", "properties": {
        "city": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                                   "capital": {"type": "boolean"}},
                 "required": ["name", "capital"], "additionalProperties": False}},
        "required": ["city"], "additionalProperties": False},
    "array with bounds": {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 3}},
        "required": ["colors"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
                "required": ["code"], "additionalProperties": False},
}
PROMPT = [{"role": "user", "content": "Answer in JSON about Paris."}]


@pytest.fixture(scope="module")
def served():
    path = default_model_path()
    tok = load_tokenizer(path)
    engine = Engine(load_model(path, dtype=torch.float32), tok, max_batch=8, kv_tokens=8 * 320)
    yield engine, tok
    engine.shutdown(drain=False, timeout=60)


def _ids(tok, messages=PROMPT) -> list[int]:
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def test_json_schema_outputs_parse_and_validate_greedy_and_sampled(served):
    engine, tok = served
    jobs = [(name, seed) for name in SCHEMAS for seed in (None, 1, 2)]   # None: greedy
    handles = [engine.submit(Request(_ids(tok), 96, seed=seed, constraint=Constraint("json_schema", SCHEMAS[name]),
                                     sampling=SamplingParams(temperature=0.0 if seed is None else 1.0)))
               for name, seed in jobs]
    for (name, seed), h in zip(jobs, handles):
        r = h.result(300)
        assert r.finish_reason == "stop", (name, seed, r.text)
        jsonschema.validate(json.loads(r.text), SCHEMAS[name])


def test_json_object_regex_and_choice(served):
    engine, tok = served
    obj = engine.submit(Request(_ids(tok), 64, constraint=Constraint("json_object")))
    rx = engine.submit(Request(_ids(tok), 16, constraint=Constraint("regex", r"[0-9]{4}-[0-9]{2}-[0-9]{2}")))
    choice = engine.submit(Request(_ids(tok), 16, seed=5, sampling=SamplingParams(temperature=1.0),
                                   constraint=Constraint("choice", ["yes", "no", "it depends"])))
    r = obj.result(300)
    assert r.finish_reason in ("stop", "length")
    if r.finish_reason == "stop":
        assert isinstance(json.loads(r.text), dict)
    else:
        assert r.text.startswith("{")
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", rx.result(300).text)
    assert choice.result(300).text in ("yes", "no", "it depends")


def test_max_tokens_cuts_with_length(served):
    engine, tok = served
    r = engine.submit(Request(_ids(tok), 3, constraint=Constraint("json_schema", SCHEMAS["nested object"]))).result(60)
    assert r.finish_reason == "length" and len(r.token_ids) == 3 and r.text.startswith('{"city":')


def test_a_free_row_beside_constrained_rows_is_what_it_is_alone(served):
    engine, tok = served
    story = _ids(tok, [{"role": "user", "content": "Tell me a story about a lighthouse."}])
    alone = engine.submit(Request(story, 24)).result(120).token_ids
    handles = [engine.submit(Request(_ids(tok), 48, constraint=Constraint("json_schema", SCHEMAS[name])))
               for name in list(SCHEMAS)[:3]]
    beside = engine.submit(Request(story, 24))
    assert beside.result(120).token_ids == alone
    for h in handles:
        h.result(300)


def test_a_bad_schema_is_refused_naming_its_field_before_any_compute(served):
    engine, tok = served
    before = engine.stats()["prompt_tokens_total"]
    with pytest.raises(InvalidRequest, match="response_format.json_schema.schema") as e:
        engine.submit(Request(_ids(tok), 8, constraint=Constraint("json_schema", {"type": "nonsense"},
                                                                  "response_format.json_schema.schema")))
    assert e.value.field == "response_format.json_schema.schema"
    for bad in (Constraint("xml", "<a/>"), Constraint("choice", []), Constraint("regex", 3), Constraint("lark", None)):
        with pytest.raises(InvalidRequest) as e:
            engine.submit(Request(_ids(tok), 8, constraint=bad))
        assert e.value.field == "constraint"
    assert engine.stats()["prompt_tokens_total"] == before


def test_the_same_schema_compiles_once(served):
    engine, tok = served
    schema = {"type": "object", "properties": {"b": {"type": "boolean"}, "a": {"type": "integer"}}}
    reordered = {"properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}, "type": "object"}
    engine.submit(Request(_ids(tok), 4, constraint=Constraint("json_schema", schema))).result(60)
    n = len(engine._grammars._compiled)
    engine.submit(Request(_ids(tok), 4, constraint=Constraint("json_schema", reordered))).result(60)
    engine.submit(Request(_ids(tok), 4, constraint=Constraint("json_schema", json.dumps(schema)))).result(60)
    assert len(engine._grammars._compiled) == n


def test_the_generator_takes_a_json_schema(served):
    engine, tok = served
    gen = Generator(engine.model, tok)
    schema = SCHEMAS["array with bounds"]
    r, s = gen.generate([PROMPT, PROMPT], max_new_tokens=48, temperature=1.0, seed=[4, 5], json_schema=schema)
    for x in (r, s):
        assert x.finish_reason == "stop"
        jsonschema.validate(json.loads(x.text), schema)
    pieces = list(gen.stream(PROMPT, max_new_tokens=48, temperature=0, constraint=Constraint("choice", ["a", "b"])))
    assert "".join(pieces) in ("a", "b")
    with pytest.raises(ValueError, match="give one"):
        gen.generate(PROMPT, json_schema=schema, constraint=Constraint("json_object"))
    with pytest.raises(InvalidRequest, match="json_schema: "):
        gen.generate(PROMPT, json_schema={"type": "nonsense"})
