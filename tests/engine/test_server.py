"""The OpenAI-compatible server, driven by the real `openai` client against a server started here on 127.0.0.1.

Every greedy answer is compared with the same request run through Generator alone (fp32, so batching cannot
change a token). Until the serving Engine merges, the server runs over tests/server_fakes.py's STAND-IN (one
request at a time through Generator): the HTTP layer is real, the batching is not. With engine/engine.py present
the same tests run against the real Engine.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import torch
import uvicorn
from server_fakes import GeneratorEngine
from tiny_phi3 import randomize_lora_B, save_tiny

from phiforge.engine.adapter import save_adapter
from phiforge.engine.fetch import default_model_path
from phiforge.engine.generate import Generator
from phiforge.engine.loader import load_model
from phiforge.engine.lora import apply_lora
from phiforge.engine.prometheus import parse
from phiforge.engine.server import create_app
from phiforge.engine.tokenizer import load_tokenizer

REAL_ENGINE = importlib.util.find_spec("phiforge.engine.engine") is not None
TESTS = Path(__file__).resolve().parents[1]
N = 8  # new tokens per greedy comparison: one decode step of the tiny model is tens of ms on a busy 2-core box
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]


def new_engine(model, tok, model_dir, **kw):
    if REAL_ENGINE:
        from phiforge.engine.engine import Engine  # noqa: PLC0415  the real one, once merged
        return Engine(model, tok, **kw)
    return GeneratorEngine(model, tok, max_queue=kw.get("max_queue", 256), model_dir=model_dir,
                           dtype=torch.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model_dir, adapters=(), api_key=None, **engine_kw):
    """A server over a fresh engine in a thread; yields (base url, engine); stops by itself."""
    model, tok = load_model(model_dir, dtype=torch.float32), load_tokenizer(model_dir)
    engine = new_engine(model, tok, model_dir, **engine_kw)
    for name, path in adapters:
        engine.load_adapter(name, str(path))
    app = create_app(engine, tok, model_name="tiny", api_key=api_key)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(30)


def client(url, key="unused", timeout=60.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=timeout, max_retries=0)


def metrics(url) -> dict[str, float]:
    return parse(httpx.get(url + "/metrics", timeout=10).text)


def wait_for(cond, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("srv") / "model", with_tokenizer=True)[0]


@pytest.fixture(scope="module")
def ref(tiny):
    """The same request through Generator alone: the expected answer."""
    gen = Generator(load_model(tiny, dtype=torch.float32), load_tokenizer(tiny))
    return lambda prompt, **kw: gen.generate(prompt, temperature=0, **{"max_new_tokens": N, **kw})[0]


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    out = []
    for i, name in enumerate(["alpha", "beta"]):
        model = load_model(tiny, dtype=torch.float32)
        apply_lora(model, r=4, alpha=8, dropout=0.0)
        randomize_lora_B(model, seed=10 + i, std=0.5)
        out.append((name, save_adapter(model, tmp_path_factory.mktemp(name) / name)))
    return out


@pytest.fixture(scope="module")
def server(tiny, adapters):
    with serving(tiny, adapters=adapters) as (url, engine):
        yield url


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
