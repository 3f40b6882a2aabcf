"""The OpenAI-compatible server over the serving Engine, driven by the real `openai` client (and httpx) against a
server started here on 127.0.0.1.

Every greedy answer is compared with the same request run through Generator alone (fp32: rows never see each other,
so batching changes no token of the tiny model); adapter answers with a model loaded with that adapter alone.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
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
from tiny_phi3 import randomize_lora_B, save_tiny

from phiforge.commands import serve
from phiforge.engine.adapter import save_adapter
from phiforge.engine.engine import Engine
from phiforge.engine.fetch import default_model_path
from phiforge.engine.generate import Generator
from phiforge.engine.loader import load_model
from phiforge.engine.lora import apply_lora
from phiforge.engine.prometheus import parse
from phiforge.engine.server import create_app
from phiforge.engine.tokenizer import load_tokenizer

N = 8  # new tokens per greedy comparison: one decode step of the tiny model is tens of ms on a busy 2-core box
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model_dir, adapters=(), api_key=None, loaded=None, **engine_kw):
    """A server over a fresh Engine (adapters loaded at its start) in a thread; yields (base url, engine); stops by
    itself, draining the engine."""
    model, tok = loaded or (load_model(model_dir, dtype=torch.float32), load_tokenizer(model_dir))
    engine = Engine(model, tok, adapters={name: str(path) for name, path in adapters} or None, **engine_kw)
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
        wait_for(lambda: _idle(url), what="the aborted request to leave")
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
def _idle(url):
    m = metrics(url)
    return m["phiforge:num_requests_running"] == 0 and m["phiforge:kv_cache_used_tokens"] == 0


def test_a_stream_closed_midway_is_aborted_and_frees_its_memory(server):
    c = client(server)
    wait_for(lambda: _idle(server), what="an idle server")
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
    wait_for(lambda: _idle(server), what="the memory to be freed")
    assert c.completions.create(model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


def test_a_non_streamed_request_whose_client_leaves_is_aborted(tiny, monkeypatch):
    with serving(tiny) as (server, engine):
        step = engine.step  # the tiny model writes 400 tokens in well under a second: slow each step down so that
        monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.02), step())[1])  # the client leaves mid-request
        body = {"model": "tiny", "prompt": "Tell me everything", "max_tokens": 400, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
        wait_for(lambda: metrics(server)["phiforge:requests_aborted_total"] == 1, what="the abort")
        wait_for(lambda: _idle(server), what="the memory to be freed")
        assert metrics(server)["phiforge:generation_tokens_total"] < 400


def test_a_full_queue_gets_429_with_retry_after(tiny):
    with serving(tiny, max_batch=1, max_queue=1) as (url, _):
        c = client(url)
        streams = [c.completions.create(model="tiny", prompt=f"Long {i}", max_tokens=400, stream=True)
                   for i in range(2)]  # one running, one waiting: the queue is full
        wait_for(lambda: metrics(url)["phiforge:num_requests_waiting"] == 1, what="a waiting request")
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="tiny", prompt="One more", max_tokens=2)
        assert e.value.response.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["type"] == "rate_limit_error"
        assert metrics(url)["phiforge:requests_rejected_total"] == 1
        for s in streams:
            s.close()
        wait_for(lambda: _idle(url) and metrics(url)["phiforge:num_requests_waiting"] == 0, what="idle")
        assert c.completions.create(model="tiny", prompt="Now", max_tokens=2).usage.completion_tokens >= 1


# ---- bad input -----------------------------------------------------------------------------------------------------
MSG = [{"role": "user", "content": "Hi"}]
BAD = [  # (route, body (a str is sent raw), status, param)
    ("chat", "{not json", 400, None),
    ("chat", "[1, 2]", 400, None),
    ("chat", {"model": "tiny"}, 400, "messages"),
    ("chat", {"model": "tiny", "messages": "Hi"}, 400, "messages"),
    ("chat", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat", {"model": "tiny", "messages": MSG, "max_tokens": "10"}, 400, "max_tokens"),
    ("chat", {"model": "tiny", "messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"model": "tiny", "messages": MSG, "max_tokens": True}, 400, "max_tokens"),
    ("chat", {"model": "tiny", "messages": MSG, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("chat", {"model": "tiny", "messages": MSG, "max_tokens": 100000}, 400, "max_tokens"),
    ("chat", {"model": "tiny", "messages": MSG, "temperature": -1}, 400, "temperature"),
    ("chat", {"model": "tiny", "messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("chat", {"model": "tiny", "messages": MSG, "top_p": 0}, 400, "top_p"),
    ("chat", {"model": "tiny", "messages": MSG, "top_k": 2.5}, 400, "top_k"),
    ("chat", {"model": "tiny", "messages": MSG, "n": 2}, 400, "n"),
    ("chat", {"model": "tiny", "messages": MSG, "stop": 5}, 400, "stop"),
    ("chat", {"model": "tiny", "messages": MSG, "stop": ["ok", 1]}, 400, "stop[1]"),
    ("chat", {"model": "tiny", "messages": MSG, "seed": "x"}, 400, "seed"),
    ("chat", {"model": "tiny", "messages": MSG, "stream": "yes"}, 400, "stream"),
    ("chat", {"model": "tiny", "messages": MSG, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("chat", {"model": "tiny", "messages": MSG, "logprobs": True}, 400, "logprobs"),
    ("chat", {"model": "tiny", "messages": MSG, "presence_penalty": 3}, 400, "presence_penalty"),
    ("chat", {"model": "nope", "messages": MSG}, 404, "model"),
    ("completions", {"model": "tiny"}, 400, "prompt"),
    ("completions", {"model": "tiny", "prompt": {"a": 1}}, 400, "prompt"),
    ("completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"model": "tiny", "prompt": [1, 10 ** 9]}, 400, "prompt[1]"),
    ("completions", {"model": "tiny", "prompt": "x " * 600}, 400, "prompt"),
]


def test_each_bad_input_gets_its_error_and_the_server_goes_on(server):
    for route, body, status, param in BAD:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) \
            else {"json": body}
        r = httpx.post(f"{server}/v1/{'chat/completions' if route == 'chat' else route}", timeout=30, **kw)
        err = r.json()["error"]
        assert (r.status_code, err["param"]) == (status, param), (body, r.text)
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    for path, method, status in (("/v1/nothing", "GET", 404), ("/v1/completions", "GET", 405)):
        r = httpx.request(method, server + path, timeout=10)
        assert r.status_code == status and "error" in r.json()
    c = client(server)
    with pytest.raises(openai.BadRequestError):  # the openai client sees the error type too
        c.chat.completions.create(model="tiny", messages=MSG, max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=MSG)
    assert c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).usage.completion_tokens >= 1
    assert httpx.get(server + "/health", timeout=10).json() == {"status": "ok"}


def test_api_key(tiny):
    with serving(tiny, api_key="sekrit") as (url, _):
        for key in ("wrong", None):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        assert client(url, key="sekrit").completions.create(prompt="Hi", max_tokens=1, model="tiny").choices
        assert httpx.get(url + "/health").status_code == 200  # probes need no key


def test_metrics_count_what_was_served(tiny):
    with serving(tiny) as (url, _):
        c = client(url)
        rs = [c.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0) for p in ("a b", "c d e")]
        list(c.completions.create(model="tiny", prompt="f", max_tokens=4, temperature=0, stream=True))
        m = metrics(url)
        assert m["phiforge:prompt_tokens_total"] == sum(r.usage.prompt_tokens for r in rs) + 1
        assert m["phiforge:generation_tokens_total"] >= sum(r.usage.completion_tokens for r in rs)
        assert m["phiforge:e2e_request_latency_seconds_count"] == 3
        assert m["phiforge:time_to_first_token_seconds_count"] == 3
        assert m['phiforge:e2e_request_latency_seconds_bucket{le="+Inf"}'] == 3
        assert m["phiforge:inter_token_latency_seconds_count"] >= 1
        assert m["phiforge:kv_cache_usage_ratio"] == 0
        assert m["phiforge:cached_prompt_tokens_total"] == 0

        long = " ".join(f"w{i}" for i in range(60))  # the same prompt twice: the second reuses the first's K/V
        first, again = (c.completions.create(model="tiny", prompt=long, max_tokens=2, temperature=0) for _ in range(2))
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        cached = again.usage.prompt_tokens_details.cached_tokens
        assert 0 < cached < again.usage.prompt_tokens == first.usage.prompt_tokens
        assert again.choices[0].text == first.choices[0].text
        chunks = list(c.completions.create(model="tiny", prompt=long, max_tokens=2, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
        m = metrics(url)
        assert m["phiforge:cached_prompt_tokens_total"] == 2 * cached
        assert m["phiforge:prompt_tokens_total"] == sum(r.usage.prompt_tokens for r in rs) + 1 + 3 * first.usage.prompt_tokens


# ---- the command's flags ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, says", [
    (["--max-adapters", "-1"], "--max-adapters must be >= 0"),
    (["--max-adapters", "1", "--adapter", "a={d}", "--adapter", "b={d}"], "--max-adapters 1: 2 --adapter given"),
    (["--adapter", "a"], "expected NAME=DIR"),
])
def test_serve_flags_fail_in_one_line(argv, says, adapters, capsys):
    d = adapters[0][1]
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    assert serve.run(parser.parse_args([a.format(d=d) for a in argv])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and err.startswith("phiforge serve: ")


# ---- SIGTERM ------------------------------------------------------------------------------------------------------
SERVE_STAND_IN = """
import sys, torch
from phiforge.engine.loader import load_model
from phiforge.engine.tokenizer import load_tokenizer
from phiforge.engine.server import create_app, run_server
d, port = sys.argv[1], int(sys.argv[2])
tok = load_tokenizer(d)
engine = GeneratorEngine(load_model(d, dtype=torch.float32), tok)
run_server(create_app(engine, tok, model_name="tiny"), "127.0.0.1", port, log_level="warning")
"""


def test_sigterm_stops_admitting_finishes_running_requests_then_exits(tiny, ref):
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "phiforge"), "serve", "--model", str(tiny), "--dtype", "float32",
           "--port", str(port), "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url), timeout=60, what="the server to start")
        want = ref("Drain me", max_new_tokens=16)
        c = client(url)
        stream = c.completions.create(model="tiny", prompt="Drain me", max_tokens=16, temperature=0, stream=True)
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not _up(url), timeout=20, what="the listener to close")  # admits nothing new
        text += "".join(ch.choices[0].text for ch in chunks)
        assert text == want.text  # the running request finished in full
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out = proc.stdout.read().decode(errors="replace")
    assert "Traceback" not in out, out


def _up(url) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# ---- the default model ----------------------------------------------------------------------------------------------
def test_default_model_chat(tmp_path):
    path = default_model_path()
    model, tok = load_model(path, dtype=torch.float32), load_tokenizer(path)
    want = Generator(model, tok).generate(CHAT, max_new_tokens=8, temperature=0)[0]
    with serving(path, loaded=(model, tok)) as (url, _):  # the reference has finished: the engine takes the model
        r = client(url).chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want.text and want.text.strip()
    assert r.usage.prompt_tokens == want.prompt_tokens
