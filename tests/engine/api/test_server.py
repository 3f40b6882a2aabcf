"""The OpenAI-compatible server over the serving Engine, driven by the real `openai` client (and httpx) against a
server started here on 127.0.0.1.

Every greedy answer is compared with the same request run through Generator alone (fp32: rows never see each other,
so batching changes no token of the tiny model); adapter answers with a model loaded with that adapter alone.
"""
from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest
import torch

from server_harness import CHAT, N, idle, adapters, client, metrics, ref, server, serving, tiny, wait_for  # noqa: F401  (fixtures)
from phiforge.engine.formats.loader import load_model
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.engine.serve.generate import Generator


# ---- chat and completions ---------------------------------------------------------------------------------------
def test_chat_and_completions_equal_generator_alone(server, ref, tiny):
    c = client(server)
    want = ref(CHAT)
    r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=N, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, len(want.token_ids))
    assert r.usage.total_tokens == want.prompt_tokens + len(want.token_ids)

    want = ref("Once upon a time")
    r = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=N, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want.text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, len(want.token_ids))
    ids = load_tokenizer(tiny).encode("Once upon a time")
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=N, temperature=0)  # token ids as the prompt
    assert r.choices[0].text == want.text


def test_streams_equal_the_whole_and_carry_usage(server, ref):
    c = client(server)
    want = ref(CHAT)
    chunks = list(c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=N, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens
    assert chunks[-2].choices[0].finish_reason == want.finish_reason
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1]) == want.text

    want = ref("Once upon a time")
    chunks = list(c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=N, temperature=0,
                                       stream=True))
    assert all(ch.usage is None for ch in chunks)  # not asked for
    assert "".join(ch.choices[0].text for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_raw_sse_format(server):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    json.loads(events[-3][len("data: "):])  # every event but [DONE] is one JSON object


def test_stop_string_split_across_tokens(server, ref, tiny):
    tok = load_tokenizer(tiny)
    full = ref("Once upon a time", max_new_tokens=12)
    # a stop string straddling the boundary between two generated tokens, first seen there
    for i in range(1, len(full.token_ids)):
        cut = len(tok.decode(full.token_ids[:i], skip_special_tokens=True))
        stop = full.text[cut - 2:cut + 2]
        if cut >= 2 and len(stop) == 4 and stop.strip() and full.text.find(stop) == cut - 2:
            break
    else:
        pytest.fail(f"no 4-character string straddles a token boundary in {full.text!r}")
    want = ref("Once upon a time", max_new_tokens=12, stop=[stop])
    assert want.text == full.text[:cut - 2] and want.finish_reason == "stop"
    c = client(server)
    r = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                             stop=["never-there", stop])
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                       stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == want.text  # no piece of the stop string leaked


# ---- batches ------------------------------------------------------------------------------------------------------
def test_16_concurrent_greedy_requests_each_equal_alone(server, ref):
    prompts = [f"Story {i}: the {w}" for i, w in enumerate(["cat", "dog", "sea", "king"] * 4)]
    c = client(server, timeout=120)

    def one(p):
        return c.completions.create(model="tiny", prompt=p, max_tokens=N, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, prompts))
    assert got == [ref(p).text for p in prompts]


def test_adapters_in_one_batch_each_equal_that_adapter_alone(server, tiny, adapters):
    c = client(server, timeout=120)
    listed = {m.id: m for m in c.models.list().data}
    assert list(listed) == ["tiny", "alpha", "beta"]
    assert getattr(listed["alpha"], "parent", None) == "tiny"
    tok = load_tokenizer(tiny)
    alone = {None: Generator(load_model(tiny, dtype=torch.float32), tok)}
    for name, path in adapters:
        alone[name] = Generator(load_model(tiny, dtype=torch.float32, adapter=path), tok)
    jobs = [(m, f"Prompt {i}") for i, m in enumerate(["alpha", "beta", "tiny", "beta", "alpha", "tiny"])]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: c.completions.create(model=j[0], prompt=j[1], max_tokens=N,
                                                           temperature=0).choices[0].text, jobs))
    want = [alone[None if m == "tiny" else m].generate(p, max_new_tokens=N, temperature=0)[0].text for m, p in jobs]
    assert got == want
    assert len({w for w, (m, _) in zip(want, jobs) if m != "tiny"} | {want[2]}) > 1  # the adapters change the output


# ---- adapters at run time -------------------------------------------------------------------------------------------
def test_adapters_load_and_unload_at_run_time(tiny, adapters, tmp_path):
    (alpha, alpha_dir), (beta, beta_dir) = adapters
    qlora = tmp_path / "qlora"  # an adapter trained on the NF4 base: this dense base is the wrong one
    shutil.copytree(alpha_dir, qlora)
    (qlora / "training_args.json").write_text(json.dumps({"method": "qlora"}))
    tok = load_tokenizer(tiny)
    alone = {n: Generator(load_model(tiny, dtype=torch.float32, adapter=d), tok) for n, d in adapters}
    with serving(tiny, api_key="k", max_adapters=1) as (url, engine):
        c = client(url, key="k")

        def post(route, body, key="k"):
            return httpx.post(f"{url}/v1/{route}", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)

        def names():
            return [m.id for m in c.models.list().data]

        def answer(model):
            return c.completions.create(model=model, prompt="Prompt 1", max_tokens=N, temperature=0).choices[0].text

        assert names() == ["tiny"]
        assert post("load_lora_adapter", {"lora_name": alpha, "lora_path": str(alpha_dir)}, key="no").status_code == 401
        for body, param in [({"lora_path": str(alpha_dir)}, "lora_name"), ({"lora_name": alpha}, "lora_path"),
                            ({"lora_name": " ", "lora_path": str(alpha_dir)}, "lora_name"),
                            ({"lora_name": alpha, "lora_path": 5}, "lora_path"),
                            ({"lora_name": alpha, "lora_path": str(tmp_path / "missing")}, "lora_path"),
                            ({"lora_name": alpha, "lora_path": str(qlora)}, "lora_path"),
                            ({"lora_name": "tiny", "lora_path": str(alpha_dir)}, "lora_name")]:
            r = post("load_lora_adapter", body)
            assert (r.status_code, r.json()["error"]["param"]) == (400, param), (body, r.text)
        assert post("unload_lora_adapter", [alpha]).status_code == 400
        assert names() == ["tiny"]  # nothing half-loaded

        r = post("load_lora_adapter", {"lora_name": alpha, "lora_path": str(alpha_dir)})
        assert r.status_code == 200 and r.json()["id"] == alpha
        assert names() == ["tiny", alpha] and answer(alpha) == alone[alpha].generate(
            "Prompt 1", max_new_tokens=N, temperature=0)[0].text
        r = post("load_lora_adapter", {"lora_name": beta, "lora_path": str(beta_dir)})  # the one slot is taken
        assert (r.status_code, r.json()["error"]["param"]) == (400, "lora_name") and "--max-adapters" in r.text

        stream = c.completions.create(model=alpha, prompt="Tell me everything", max_tokens=400, stream=True)
        next(iter(stream))
        r = post("unload_lora_adapter", {"lora_name": alpha})  # a running request uses it: refused, not deferred
        assert (r.status_code, r.json()["error"]["param"]) == (409, "lora_name") and alpha in names()
        stream.close()
        wait_for(lambda: idle(url), what="the aborted request to leave")
        assert post("unload_lora_adapter", {"lora_name": alpha}).status_code == 200 and names() == ["tiny"]
        with pytest.raises(openai.NotFoundError):
            answer(alpha)
        r = post("unload_lora_adapter", {"lora_name": alpha})
        assert (r.status_code, r.json()["error"]["param"]) == (404, "lora_name")

        assert post("load_lora_adapter", {"lora_name": beta, "lora_path": str(beta_dir)}).status_code == 200
        assert names() == ["tiny", beta]  # the freed slot, reused
        assert answer(beta) == alone[beta].generate("Prompt 1", max_new_tokens=N, temperature=0)[0].text
        assert answer("tiny") != answer(beta)

    with serving(tiny) as (url, _):  # no adapter slots: loading says how to get them
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": alpha, "lora_path": str(alpha_dir)})
        assert r.status_code == 400 and "--max-adapters" in r.json()["error"]["message"]
        assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": alpha}).status_code == 404


# ---- disconnects, a full queue --------------------------------------------------------------------------------------
def test_a_stream_closed_midway_is_aborted_and_frees_its_memory(server):
    c = client(server)
    wait_for(lambda: idle(server), what="an idle server")
    before = metrics(server)["phiforge:requests_aborted_total"]
    stream = c.completions.create(model="tiny", prompt="Tell me everything", max_tokens=400, temperature=0,
                                  stream=True)
    got = 0
    for ch in stream:
        got += bool(ch.choices[0].text)
        if got == 3:
            break
    assert metrics(server)["phiforge:num_requests_running"] == 1
    stream.close()
    wait_for(lambda: metrics(server)["phiforge:requests_aborted_total"] == before + 1, what="the abort")
    wait_for(lambda: idle(server), what="the memory to be freed")
    assert c.completions.create(model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


