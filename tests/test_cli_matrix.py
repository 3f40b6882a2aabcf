"""The bad-input and interruption matrix, run as a user runs it: `.venv/bin/phiforge` as a subprocess.

Each error case asserts the exit code (1 for an error, 2 for usage, 130 for Ctrl-C), exactly one `error: ...` line
on stderr naming the flag, file or line, no traceback anywhere, and that the workspace's file listing is the same
before and after (nothing created, nothing lost). Then: SIGINT during a real `finetune` run, then `--resume`,
reaches the same final adapter, tensor for tensor, as an uninterrupted run; results get umask permissions.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import jsonschema
import pytest
from safetensors.torch import load_file
from server_harness import free_port

from phiforge import cli

from tiny_phi3 import save_tiny

PHIFORGE = str(Path(sys.executable).with_name("phiforge"))
ROWS = [
    {"messages": [{"role": "user", "content": "What is the emergency number?"},
                  {"role": "assistant", "content": "Call 0800 555 0192, open 24 hours."}]},
    {"prompt": "Largest works:", "completion": " Hollins, 96 Ml/d."},
    {"messages": [{"role": "user", "content": "Where is the control centre?"},
                  {"role": "assistant", "content": "In Calder Bridge."}]},
    {"prompt": "Oldest mains:", "completion": " 1891, Old Market Street."},
]
# a truncated line: its last string is cut off, so the error points at that string's opening quote (1-based)
BROKEN = json.dumps(ROWS[0])[:-7]
# a tiny run; --threads 1 because 2 cores are shared, dropout on so that resume must restore the RNG
FT = ["--rank", "4", "--alpha", "8", "--seq-len", "64", "--batch-size", "2", "--dtype", "float32", "--threads", "1",
      "--no-progress", "--warmup-steps", "1", "--lr", "5e-3"]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "PHIFORGE_DEBUG"}
    return dict(e, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def phiforge(*argv: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PHIFORGE, *argv], capture_output=True, text=True, timeout=timeout, env=env(), **kw)


def listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else -1 for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The workspace every case runs in: a tiny model, data files good and bad, an earlier run, an index."""
    w = tmp_path_factory.mktemp("matrix")
    save_tiny(w / "model", with_tokenizer=True)
    (w / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (w / "empty.jsonl").write_text("")
    (w / "broken.jsonl").write_text(json.dumps(ROWS[1]) + "\n" + BROKEN + "\n")
    (w / "schema.json").write_text(json.dumps(SCHEMA))
    (w / "bad_schema.json").write_text(json.dumps({"type": "nonsense"}))
    (w / "notmodel").mkdir()
    (w / "notmodel" / "readme.txt").write_text("not a model\n")
    (w / "oldrun").mkdir()
    (w / "oldrun" / "adapter_model.safetensors").write_bytes(b"an earlier run's adapter")
    (w / "docs").mkdir()
    (w / "docs" / "a.md").write_text("# Pumps\nThe Hollins pump station runs at night.\n")
    (w / "docs" / "b.md").write_text("# Notices\nBoil water notices are issued by the duty manager.\n")
    r = phiforge("index", "add", str(w / "docs"), "--index", str(w / "idx"))
    assert r.returncode == 0, r.stderr
    return w


M = "{ws}/model"
SCHEMA = {"type": "object", "properties": {"capital": {"enum": ["Paris", "Lyon"]},
                                           "population": {"type": "integer", "minimum": 0, "maximum": 99999}},
          "required": ["capital", "population"], "additionalProperties": False}
FTA = ["--model", M, "--data", "{ws}/train.jsonl", "--out", "{ws}/ft", *FT]
# (argv, exit code, regex the single `error:` line must match)
CASES = [
    (["generate", "--model", "/nope", "--prompt", "hi"], 1, r"--model /nope: no such directory"),
    (["generate", "--model", "{ws}/notmodel", "--prompt", "hi"], 1, r"notmodel/config\.json: no such file"),
    (["generate", "--model", M, "--prompt", "hi", "--max-new-tokens", "0"], 1, r"--max-new-tokens: must be >= 1"),
    (["generate", "--model", M, "--prompt", "hi", "--top-p", "0"], 1, r"--top-p: must be in"),
    (["generate", "--model", M, "--prompt-file", "{ws}/nope.txt"], 1, r"--prompt-file \S+nope\.txt: no such file"),
    (["generate", "--model", M, "--prompt", "hi", "--adapter", "/nope"], 1, r"--adapter /nope: no such directory"),
    (["generate", "--model", M, "--prompt", "hi", "--adapter", "{ws}/docs"], 1, r"no adapter_config\.json"),
    (["generate", "--model", M, "--prompt", "hi", "--json-schema", "{ws}/nope.json"], 1,
     r"--json-schema \S+nope\.json: no such file"),
    (["generate", "--model", M, "--prompt", "hi", "--json-schema", "{ws}/train.jsonl"], 1,
     r"--json-schema \S+train\.jsonl: not a JSON file"),
    (["generate", "--model", M, "--prompt", "hi", "--json-schema", "{ws}/bad_schema.json"], 1,
     r"--json-schema \S+bad_schema\.json: .*nonsense"),
    (["generate", "--model", M, "--prompt", "hi", "--choice", ","], 1, r"--choice: give one or more"),
    (["chat", "--model", M, "--temperature", "-1"], 1, r"--temperature: must be >= 0"),
    (["merge", "--model", M, "--adapter", "/nope", "--out", "{ws}/merged"], 1, r"--adapter /nope: no such dir"),
    (["merge", "--model", "/nope", "--adapter", "/nope", "--out", "{ws}/merged"], 1, r"--model /nope: no such dir"),
    (["quantize", "--model", "/nope", "--out", "{ws}/q"], 1, r"--model /nope: no such directory"),
    (["quantize", "--model", M, "--out", "{ws}/q", "--threads", "0"], 1, r"--threads: must be >= 1"),
    ([*("finetune", *FTA), "--data", "{ws}/empty.jsonl"], 1, r"empty\.jsonl: no usable rows \(the file is empty\)"),
    ([*("finetune", *FTA), "--data", "{ws}/broken.jsonl"], 1,
     rf"broken\.jsonl:2: not valid JSON at column {BROKEN.rindex(chr(34)) + 1} "
     r"\(Unterminated string.*\) \(--skip-bad skips"),
    ([*("finetune", *FTA), "--data", "{ws}/nope.jsonl"], 1, r"--data: no such file"),
    ([*("finetune", *FTA), "--rank", "0"], 1, r"--rank: must be >= 1, got 0"),
    ([*("finetune", *FTA), "--lr", "-1"], 1, r"--lr: must be > 0, got -1"),
    ([*("finetune", *FTA), "--targets", "qkv_proj,nope"], 1, r"--targets: must be a non-empty subset"),
    ([*("finetune", *FTA), "--resume"], 1, r"--resume: \S+ft has no checkpoint-\* to resume from"),
    ([*("finetune", *FTA), "--out", "{ws}/oldrun"], 1, r"--out \S+oldrun: holds an earlier run .*--overwrite"),
    ([*("finetune", *FTA), "--resume", "--overwrite"], 1, r"--overwrite: --resume continues"),
    (["search", "--index", "{ws}/noidx", "pumps"], 1, r"noidx: no index there .*index add"),
    (["index", "stats", "--index", "{ws}/noidx"], 1, r"noidx: no index there"),
    (["ask", "--index", "{ws}/noidx", "q"], 1, r"noidx: no index there"),
    (["index", "add", "/typo", "--index", "{ws}/noidx"], 1, r"/typo: no such file or folder"),
    (["ask", "--index", "{ws}/idx", "--model", M, "--max-new-tokens", "100000", "pumps?"], 1,
     r"--max-new-tokens 100000: exceeds the model's context of \d+ tokens"),
    (["generate", "--model", M, "--promt", "hi"], 2, None),  # argparse: usage on stderr, exit 2
    (["nosuchcommand"], 2, None),
]


@pytest.mark.parametrize("argv,code,pattern", CASES, ids=[" ".join(c[0][:3]) + f" #{i}" for i, c in enumerate(CASES)])
def test_error_case(ws, argv, code, pattern):
    before = listing(ws)
    r = phiforge(*(a.format(ws=ws) for a in argv))
    out = r.stdout + r.stderr
    assert r.returncode == code, out
    assert "Traceback" not in out, out
    assert listing(ws) == before, "the failed command created or removed files"
    if pattern is not None:
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1, r.stderr
        assert re.search(pattern, errors[0]), errors[0]


def test_version_and_the_debug_traceback(ws):
    r = phiforge("--version")
    assert r.returncode == 0 and re.fullmatch(r"phiforge \d+\.\d+\.\d+\n", r.stdout)
    r = subprocess.run([PHIFORGE, "generate", "--model", "/nope", "--prompt", "hi"], capture_output=True, text=True,
                       env=dict(env(), PHIFORGE_DEBUG="1"), timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "/nope" in r.stderr


def test_prompt_from_stdin(ws):
    r = phiforge("generate", "--model", str(ws / "model"), "--prompt-file", "-", "--max-new-tokens", "3", "--greedy",
                 "--threads", "1", input="Once upon a time")
    ref = phiforge("generate", "--model", str(ws / "model"), "--prompt", "Once upon a time", "--max-new-tokens", "3",
                   "--greedy", "--threads", "1")
    assert r.returncode == 0 and ref.returncode == 0, r.stderr + ref.stderr
    assert r.stdout == ref.stdout and r.stdout.strip()


def sigint_as_at_a_terminal() -> None:
    """Run in the child before exec: a shell starts a background job (`make test &`) with SIGINT ignored and every
    child inherits that, so Python would install no KeyboardInterrupt handler; Ctrl-C at a terminal never meets one."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_at_the_chat_prompt_exits_130(ws):
    p = subprocess.Popen([PHIFORGE, "chat", "--model", str(ws / "model")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                         preexec_fn=sigint_as_at_a_terminal)
    time.sleep(6)  # importing or waiting at the prompt: either way Ctrl-C is one line and 130
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in out + err and "interrupted" in err


def test_index_add_syncs_a_readded_folder(ws, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a.md", "b.md"):
        (docs / name).write_text((ws / "docs" / name).read_text())
    idx = tmp_path / "idx"
    assert phiforge("index", "add", str(docs), "--index", str(idx)).returncode == 0
    (docs / "b.md").unlink()
    r = phiforge("index", "add", str(docs), "--index", str(idx))
    assert r.returncode == 0, r.stderr
    assert f"removed {docs / 'b.md'}" in r.stdout and "1 removed (gone from their folder)" in r.stdout
    r = phiforge("index", "stats", "--index", str(idx), "--json")
    assert json.loads(r.stdout)["files"] == 1, r.stdout


def _adapter(d: Path) -> dict:
    return load_file(str(d / "adapter_model.safetensors"))


def test_sigint_during_finetune_then_resume_equals_an_uninterrupted_run(ws, tmp_path):
    steps = "500"
    common = ["finetune", "--model", str(ws / "model"), "--data", str(ws / "train.jsonl"), *FT, "--dropout", "0.1",
              "--max-steps", steps]
    ref = phiforge(*common, "--out", str(tmp_path / "ref"), timeout=300)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "run"
    p = subprocess.Popen([PHIFORGE, *common, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env(), preexec_fn=sigint_as_at_a_terminal)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr
    [ckpt] = list(out.glob("checkpoint-*"))
    k = int(ckpt.name.split("-")[1])
    assert 3 <= k < int(steps) and "--resume" in stderr.splitlines()[-1], stderr
    assert (out / "adapter_model.safetensors").exists()  # the adapter so far
    # running into the same --out again without --resume is refused; with --resume it continues
    r = phiforge(*common, "--out", str(out))
    assert r.returncode == 1 and "holds an earlier run" in r.stderr
    r = phiforge(*common, "--out", str(out), "--resume", timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = _adapter(tmp_path / "ref"), _adapter(out)
    assert a.keys() == b.keys() and all((a[n] == b[n]).all() for n in a)


def test_results_get_umask_permissions(ws, tmp_path):
    r = phiforge("quantize", "--model", str(ws / "model"), "--out", str(tmp_path / "q"), "--threads", "1")
    assert r.returncode == 0, r.stderr
    r = phiforge("finetune", "--model", str(ws / "model"), "--data", str(ws / "train.jsonl"), *FT, "--max-steps", "2",
                 "--out", str(tmp_path / "ft"))
    assert r.returncode == 0, r.stderr
    r = phiforge("merge", "--model", str(ws / "model"), "--adapter", str(tmp_path / "ft"), "--out",
                 str(tmp_path / "merged"), "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    mask = os.umask(0)
    os.umask(mask)
    for top in ("q", "ft", "merged"):
        for p in [tmp_path / top, *(tmp_path / top).rglob("*")]:
            want = (0o777 if p.is_dir() else 0o666) & ~mask
            assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))


@pytest.mark.parametrize("flags, check", [
    (["--json-schema", "{ws}/schema.json", "--seed", "3"], lambda out: jsonschema.validate(json.loads(out), SCHEMA)),
    (["--regex", "[0-9]{3}-[a-z]{2}", "--greedy"], lambda out: re.fullmatch(r"[0-9]{3}-[a-z]{2}", out)),
    (["--choice", "yes,no,maybe", "--seed", "1"], lambda out: out in ("yes", "no", "maybe")),
])
def test_generate_holds_its_output_to_a_constraint(ws, flags, check):
    """The tiny model writes random tokens; held by the flag, what it writes still parses (sampled or greedy)."""
    argv = [a.replace("{ws}", str(ws)) for a in flags]
    r = phiforge("generate", "--model", str(ws / "model"), "--chat", "--prompt", "Answer.", "--max-new-tokens", "48",
                 "--threads", "1", *argv)
    assert r.returncode == 0, r.stderr
    assert check(r.stdout.strip()) is not False


def test_hugging_face_ids_resolve_through_the_offline_cache(ws, tmp_path):
    """A real hub cache layout (refs/main -> snapshots/<commit>/, files linked from the default model), offline."""
    default = Path(subprocess.run([sys.executable, "-c", "from phiforge.engine import default_model_path; "
                                   "print(default_model_path())"], capture_output=True, text=True, check=True,
                                  env=env()).stdout.strip())
    repo = tmp_path / "hf" / "hub" / "models--microsoft--Phi-3-mini-4k-instruct"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in default.iterdir():
        if not f.name.startswith("."):
            (snap / f.name).symlink_to(f)
    hub_env = dict(env(), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    r = subprocess.run([PHIFORGE, "generate", "--model", "microsoft/Phi-3-mini-4k-instruct", "--prompt", "Hi",
                        "--max-new-tokens", "3", "--greedy", "--threads", "1"], capture_output=True, text=True,
                       env=hub_env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    # serve takes the same id the same way (it once refused anything but a directory)
    port = free_port()
    proc = subprocess.Popen([PHIFORGE, "serve", "--model", "microsoft/Phi-3-mini-4k-instruct", "--port", str(port),
                             "--threads", "1", "--max-batch", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=hub_env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
            assert time.monotonic() < deadline, "serve did not start"
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert [m["id"] for m in models["data"]] == [commit]    # served under its snapshot directory's name
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    r = subprocess.run([PHIFORGE, "generate", "--model", "nobody/nothing", "--prompt", "Hi"], capture_output=True,
                       text=True, env=hub_env, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    [line] = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert "nobody/nothing: no such directory, and not in the Hugging Face cache; HF_HUB_OFFLINE is set" in line


def test_no_compiler_is_one_notice(ws, tmp_path):
    r = subprocess.run([PHIFORGE, "generate", "--model", str(ws / "model"), "--prompt", "Hi", "--max-new-tokens", "2",
                        "--threads", "1"], capture_output=True, text=True, timeout=300,
                       env=dict(env(), CC=str(tmp_path / "no-such-cc"), PHIFORGE_HOME=str(tmp_path / "home"),
                                    PHIFORGE_CPU_NATIVE="1"))  # a user's machine: `make test` sets require
    assert r.returncode == 0, r.stderr
    notices = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert notices == [f"warning: native CPU kernels off (slower torch path): {tmp_path / 'no-such-cc'} not found "
                       "(set $CC)"], r.stderr


def test_an_unexpected_failure_is_one_internal_error_line(monkeypatch, capsys):
    """In-process (no subprocess needed): a bug in a command is one line and exit 1; PHIFORGE_DEBUG=1 shows it."""
    def boom(args):
        raise RuntimeError("ptxas: sm_90a\nline two\nline three")

    monkeypatch.setattr(cli, "_hooks", lambda module, name: (lambda p: None, boom))
    monkeypatch.delenv("PHIFORGE_DEBUG", raising=False)
    assert cli.main(["doctor"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["internal error: RuntimeError: ptxas: sm_90a [2 more line(s): PHIFORGE_DEBUG=1 "
                                "shows them] (PHIFORGE_DEBUG=1 shows the traceback; please report it)"]
    monkeypatch.setenv("PHIFORGE_DEBUG", "1")
    assert cli.main(["doctor"]) == 1
    assert "Traceback" in capsys.readouterr().err
