"""The server under misuse and at its limits: a client that leaves, a full queue (429), bad input (400 naming the
field), the API key, /metrics, the serve command's flags, SIGTERM draining, and one chat on the default model."""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import torch

from server_harness import CHAT, idle, adapters, client, free_port, metrics, ref, server, serving, tiny, wait_for  # noqa: F401  (fixtures)
from phiforge.commands import serve
from phiforge.engine.api.server import create_app
from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.formats.loader import load_model
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.engine.serve.generate import Generator


def test_a_non_streamed_request_whose_client_leaves_is_aborted(tiny, monkeypatch):
    with serving(tiny) as (server, engine):
        step = engine.step  # the tiny model writes 400 tokens in well under a second: slow each step down so that
        monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.02), step())[1])  # the client leaves mid-request
        body = {"model": "tiny", "prompt": "Tell me everything", "max_tokens": 400, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
        wait_for(lambda: metrics(server)["phiforge:requests_aborted_total"] == 1, what="the abort")
        wait_for(lambda: idle(server), what="the memory to be freed")
        assert metrics(server)["phiforge:generation_tokens_total"] < 400


def test_a_full_queue_gets_429_with_retry_after(tiny, monkeypatch):
    with serving(tiny, max_batch=1, max_queue=1) as (url, engine):
        step = engine.step  # slowed, or the running request may finish and admit the waiting one before the third
        monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.02), step())[1])  # arrives, and nothing is full
        c = client(url)
        streams = [c.completions.create(model="tiny", prompt="Long 0", max_tokens=400, stream=True)]
        wait_for(lambda: metrics(url)["phiforge:num_requests_running"] == 1, what="a running request")
        streams.append(c.completions.create(model="tiny", prompt="Long 1", max_tokens=400, stream=True))
        wait_for(lambda: metrics(url)["phiforge:num_requests_waiting"] == 1, what="a waiting request")  # queue full
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="tiny", prompt="One more", max_tokens=2)
        assert e.value.response.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["type"] == "rate_limit_error"
        assert metrics(url)["phiforge:requests_rejected_total"] == 1
        for s in streams:
            s.close()
        wait_for(lambda: idle(url) and metrics(url)["phiforge:num_requests_waiting"] == 0, what="idle")
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
    ("chat", {"model": "tiny", "messages": MSG, "n": 9}, 400, "n"),
    ("chat", {"model": "tiny", "messages": MSG, "n": 0}, 400, "n"),
    ("chat", {"model": "tiny", "messages": MSG, "stop": 5}, 400, "stop"),
    ("chat", {"model": "tiny", "messages": MSG, "stop": ["ok", 1]}, 400, "stop[1]"),
    ("chat", {"model": "tiny", "messages": MSG, "seed": "x"}, 400, "seed"),
    ("chat", {"model": "tiny", "messages": MSG, "stream": "yes"}, 400, "stream"),
    ("chat", {"model": "tiny", "messages": MSG, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("chat", {"model": "tiny", "messages": MSG, "logprobs": 3}, 400, "logprobs"),
    ("chat", {"model": "tiny", "messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat", {"model": "tiny", "messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("completions", {"model": "tiny", "prompt": "Hi", "logprobs": 6}, 400, "logprobs"),
    ("completions", {"model": "tiny", "prompt": "Hi", "logprobs": True}, 400, "logprobs"),
    ("chat", {"model": "tiny", "messages": MSG, "presence_penalty": 3}, 400, "presence_penalty"),
    ("chat", {"model": "nope", "messages": MSG}, 404, "model"),
    ("completions", {"model": "tiny"}, 400, "prompt"),
    ("completions", {"model": "tiny", "prompt": {"a": 1}}, 400, "prompt"),
    ("completions", {"model": "tiny", "prompt": ["a", 5]}, 400, "prompt"),
    ("completions", {"model": "tiny", "prompt": ["a", ["b"]]}, 400, "prompt[1]"),
    ("completions", {"model": "tiny", "prompt": ["a", [1, 10 ** 9]]}, 400, "prompt[1][1]"),
    ("completions", {"model": "tiny", "prompt": ["a"] * 65}, 400, "prompt"),
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
    with serving(tiny, prefill_chunk=16) as (url, _):  # batch-invariant reuse is by whole chunks: small ones
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


def test_a_failed_engine_step_is_a_500_with_its_cause_not_an_abort(tiny, monkeypatch):
    with serving(tiny) as (url, engine):
        def failing_prefill(chunks):
            raise RuntimeError("the native step returned -1")
        monkeypatch.setattr(engine, "_prefill", failing_prefill)
        c = client(url)
        with pytest.raises(openai.InternalServerError, match="engine step failed: RuntimeError: the native step"):
            c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)
        with pytest.raises(openai.APIError, match="engine step failed: RuntimeError: the native step"):
            list(c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, stream=True))
        m = metrics(url)
        assert m["phiforge:requests_failed_total"] == 2 and m["phiforge:requests_aborted_total"] == 0
        assert m['phiforge:requests_finished_total{finish_reason="error"}'] == 2
        assert not any("preempt" in k for k in m)          # no metric for what the engine never does
        monkeypatch.undo()                                  # and it serves on
        assert c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2).choices[0].finish_reason


# ---- the command's flags ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, says", [
    (["--max-adapters", "-1"], "--max-adapters must be >= 0"),
    (["--max-adapters", "1", "--adapter", "a={d}", "--adapter", "b={d}"], "--max-adapters 1: 2 --adapter given"),
    (["--adapter", "a"], "expected NAME=DIR"),
    (["--step-tokens", "0"], "--step-tokens must be >= 1, got 0"),
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
from phiforge.engine.api.server import create_app, run_server
from phiforge.engine.formats.loader import load_model
from phiforge.engine.model.tokenizer import load_tokenizer
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
