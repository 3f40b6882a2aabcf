"""The one CLI: every command is routed to a module that exists and builds its parser."""
from __future__ import annotations

import argparse
import importlib
import io
import subprocess
import sys

import pytest

from phiforge.cli import COMMANDS, _hooks, main
from phiforge.engine.formats.default_model import default_model_path


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_builds_its_parser(name):
    add, run = _hooks(importlib.import_module(COMMANDS[name][0]), name)
    parser = argparse.ArgumentParser(prog=f"phiforge {name}")
    add(parser)
    assert callable(run) and parser.format_help()


def test_console_script_fetch_prints_the_model_dir():
    exe = [sys.executable, "-c", "import sys; from phiforge.cli import main; sys.exit(main())", "fetch"]
    out = subprocess.run(exe, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(default_model_path())


def test_chat_streams_turns_and_reuses_the_conversation(monkeypatch, capsys):
    """`phiforge chat`: two turns on stdin, each reply streamed; the second turn's prompt (the whole conversation)
    comes mostly from the prefix cache (with --batch-invariant off: on, only whole 512-token prefill chunks are
    reused); /reset empties the history."""
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\nAnd of Italy?\n/reset\nHi\n/exit\n"))
    assert main(["chat", "--model", str(default_model_path()), "--greedy", "--max-new-tokens", "12",
                     "--stats", "--batch-invariant", "off"]) == 0
    out, err = capsys.readouterr()
    replies = [line for line in out.splitlines() if line.strip()]
    assert len(replies) == 3 and "Paris" in replies[0]
    stats = [line for line in err.splitlines() if line.startswith("[")]
    assert len(stats) == 3
    assert "from the cache" not in stats[0] and "from the cache" in stats[1]
    first, second = (int(s.split()[0][1:]) for s in stats[:2])
    cached = int(stats[1].split("(")[1].split()[0])
    assert second > first and cached >= first            # at least the first turn's prompt was reused
    assert "from the cache" not in stats[2] or int(stats[2].split("(")[1].split()[0]) < first  # after /reset
