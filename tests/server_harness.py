"""Serving tests' harness: a server over a real Engine on 127.0.0.1 (a free port, stops by itself), the openai
client, /metrics, and the module fixtures (a tiny Phi-3, the Generator reference, two adapters, a shared server)."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx2 as httpx
import openai
import pytest
import torch
import uvicorn
from tiny_phi3 import randomize_lora_B, save_tiny

from phiforge.engine.api.prometheus import parse
from phiforge.engine.api.server import create_app
from phiforge.engine.formats.loader import load_model
from phiforge.engine.formats.peft import save_adapter
from phiforge.engine.model.lora import apply_lora
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.engine.serve.engine import Engine
from phiforge.engine.serve.generate import Generator

N = 8  # new tokens per greedy comparison: one decode step of the tiny model is tens of ms on a busy 2-core box
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model_dir, adapters=(), api_key=None, loaded=None, ignore_unknown_fields=False, **engine_kw):
    """A server over a fresh Engine (adapters loaded at its start) in a thread; yields (base url, engine); stops by
    itself, draining the engine."""
    model, tok = loaded or (load_model(model_dir, dtype=torch.float32), load_tokenizer(model_dir))
    engine = Engine(model, tok, adapters={name: str(path) for name, path in adapters} or None, **engine_kw)
    app = create_app(engine, tok, model_name="tiny", api_key=api_key, ignore_unknown_fields=ignore_unknown_fields)
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


def idle(url):
    m = metrics(url)
    return m["phiforge:num_requests_running"] == 0 and m["phiforge:kv_cache_used_tokens"] == 0
