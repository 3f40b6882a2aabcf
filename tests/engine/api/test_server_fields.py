"""No request field silently ignored, with the real openai client, one test per kind of row of the field table
(engine/api/fields.py, and the README's copy of it): honoured fields change the answer as they say (logit_bias,
min_p, a list of prompts), fields accepted without effect leave it as it was, refused fields are a 400 naming
them unless they ask for nothing, unknown fields are a 400, or logged and ignored under --ignore-unknown-fields."""
from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest

from server_harness import CHAT, adapters, client, server, serving, tiny  # noqa: F401  (fixtures)
from phiforge.engine.api.fields import CHAT_FIELDS, COMPLETION_FIELDS, HONOURED, NO_EFFECT, OFF, REFUSED
from phiforge.engine.model.tokenizer import load_tokenizer

README = Path(__file__).resolve().parents[3] / "README.md"
GREEDY = dict(model="tiny", max_tokens=6, temperature=0)
# a value each accepted-without-effect field may carry (what a client would send)
NO_EFFECT_VALUES = {"user": "u-1", "metadata": {"team": "a"}, "store": True, "service_tier": "default",
                    "prediction": {"type": "content", "content": "Red, green, blue."}, "safety_identifier": "s-1",
                    "prompt_cache_key": "k", "prompt_cache_retention": "24h", "prompt_cache_options": {}}
# a value each refused field may carry that asks for something phiforge does not do
REFUSED_VALUES = {"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"],
                  "web_search_options": {}, "reasoning_effort": "low", "verbosity": "low", "moderation": True,
                  "functions": [{"name": "f", "parameters": {}}], "function_call": "auto", "echo": True,
                  "suffix": "end", "best_of": 3}


def _readme_table() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in README.read_text().splitlines():
        m = re.fullmatch(r"\| `(\w+)` \| ([^|]+) \| ([^|]+) \| .* \|", line)
        if m:
            rows[m.group(1)] = (m.group(2).strip(), m.group(3).strip())
    return rows


def test_the_readme_table_is_the_servers_row_for_row():
    table = _readme_table()
    names = set(CHAT_FIELDS) | set(COMPLETION_FIELDS)
    assert set(table) == names
    for name, (chat, completions) in table.items():
        assert chat == CHAT_FIELDS.get(name, ("—",))[0] and completions == COMPLETION_FIELDS.get(name, ("—",))[0]
    refused = {n for t in (CHAT_FIELDS, COMPLETION_FIELDS) for n, (how, _) in t.items() if how == REFUSED}
    assert refused == set(OFF) == set(REFUSED_VALUES)
    assert {n for n, (how, _) in CHAT_FIELDS.items() if how == NO_EFFECT} - {"user"} <= set(NO_EFFECT_VALUES)


def test_accepted_fields_leave_the_answer_as_it_was(server):
    c = client(server)
    plain = c.chat.completions.create(messages=CHAT, **GREEDY).choices[0].message.content
    for name, value in NO_EFFECT_VALUES.items():
        r = c.chat.completions.create(messages=CHAT, **GREEDY, extra_body={name: value})
        assert r.choices[0].message.content == plain, name
    assert c.completions.create(prompt="Hi", **GREEDY, user="u-1").choices[0].text == \
        c.completions.create(prompt="Hi", **GREEDY).choices[0].text


def test_refused_fields_are_400s_naming_them_unless_off(server):
    c = client(server)
    for name, value in REFUSED_VALUES.items():
        chat = name in CHAT_FIELDS
        with pytest.raises(openai.BadRequestError) as e:
            if chat:
                c.chat.completions.create(messages=CHAT, **GREEDY, extra_body={name: value})
            else:
                c.completions.create(prompt="Hi", **GREEDY, extra_body={name: value})
        assert e.value.body["param"] == name, name
        for off in OFF[name]:
            if chat:
                c.chat.completions.create(messages=CHAT, **GREEDY, extra_body={name: off})
            else:
                c.completions.create(prompt="Hi", **GREEDY, extra_body={name: off})


def test_unknown_fields_are_400s_or_logged_with_the_flag(tiny, caplog):
    body = dict(messages=CHAT, **GREEDY)
    with serving(tiny) as (url, _):
        c = client(url)
        plain = c.chat.completions.create(**body).choices[0].message.content
        for extra in ({"ignore_eos": True}, {"guided_json": {}}, {"tools_please": 1}):
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(**body, extra_body=extra)
            assert e.value.body["param"] == next(iter(extra))
        with pytest.raises(openai.BadRequestError) as e:   # chat's fields are not completions'
            c.completions.create(prompt="Hi", **GREEDY, extra_body={"top_logprobs": 2})
        assert e.value.body["param"] == "top_logprobs"
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**body, stream=True, stream_options={"include_usage": True, "x": 1})
        assert e.value.body["param"] == "stream_options.x"
    with serving(tiny, ignore_unknown_fields=True) as (url, _):
        with caplog.at_level("INFO", logger="phiforge.server"):
            r = client(url).chat.completions.create(**body, extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == plain
        assert "ignoring unknown request fields: ignore_eos" in caplog.text


def test_logit_bias_bans_and_forces_tokens_and_checks_ids(server, tiny):
    c = client(server)
    tok = load_tokenizer(tiny)
    r = c.completions.create(prompt="The colors are", **GREEDY, logprobs=0)
    first = tok.encode(r.choices[0].text, add_special_tokens=False)[0]
    banned = c.completions.create(prompt="The colors are", **GREEDY, logit_bias={str(first): -100})
    assert tok.encode(banned.choices[0].text, add_special_tokens=False)[0] != first
    forced = tok.encode(" blue", add_special_tokens=False)[0]
    f = c.completions.create(prompt="The colors are", **GREEDY, logit_bias={str(forced): 100})
    assert tok.encode(f.choices[0].text, add_special_tokens=False) == [forced] * 6
    chat = c.chat.completions.create(messages=CHAT, **GREEDY, logit_bias={str(forced): 100})
    assert chat.choices[0].message.content == tok.decode([forced] * 6)
    for bias, why in (({"999999": 1}, "outside the vocabulary"), ({"x": 1}, "not a token id"),
                      ({"5": 101}, "[-100, 100]"), ([1], "an object")):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(prompt="Hi", **GREEDY, extra_body={"logit_bias": bias})
        assert e.value.body["param"] == "logit_bias" and why in e.value.message


def test_min_p_one_keeps_only_the_top_token(server):
    c = client(server)
    greedy = c.chat.completions.create(messages=CHAT, **GREEDY).choices[0].message.content
    for seed in (1, 2, 3):   # sampled at temperature 1, min_p = 1 leaves the argmax alone
        r = c.chat.completions.create(messages=CHAT, model="tiny", max_tokens=6, temperature=1.0, seed=seed,
                                      extra_body={"min_p": 1.0})
        assert r.choices[0].message.content == greedy
    for bad in (1.5, -0.1, "x"):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(messages=CHAT, **GREEDY, extra_body={"min_p": bad})
        assert e.value.body["param"] == "min_p"


def test_a_list_of_prompts_gives_one_choice_per_prompt(server, tiny):
    c = client(server)
    tok = load_tokenizer(tiny)
    prompts = ["The colors are", "Numbers:", tok.encode("Hello there"), tok.encode("Once upon")]
    alone = [c.completions.create(prompt=p, **GREEDY) for p in prompts]
    r = c.completions.create(prompt=prompts, **GREEDY)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in r.choices] == [a.choices[0].text for a in alone]
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    two = c.completions.create(prompt=prompts[:2], **GREEDY, n=2)    # index = prompt * n + choice
    assert [ch.index for ch in two.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in two.choices] == [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2
    assert two.usage.prompt_tokens == alone[0].usage.prompt_tokens + alone[1].usage.prompt_tokens
    streamed = {}
    for ch in c.completions.create(prompt=prompts[:2], **GREEDY, stream=True):
        for x in ch.choices:
            streamed[x.index] = streamed.get(x.index, "") + x.text
    assert streamed == {0: alone[0].choices[0].text, 1: alone[1].choices[0].text}
