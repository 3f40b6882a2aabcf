"""Every request field of the two OpenAI endpoints, and what the server does with it: honoured, accepted with no
effect here, or refused (a 400 naming it) unless it is at its "off" value. A field that is in neither table is
unknown, and a 400 too, as OpenAI's own API answers; `serve --ignore-unknown-fields` logs and ignores them
instead, for clients that send extras meant for other servers.

    check_fields(body, "chat", ignore_unknown=False)    # FieldError naming the first field at fault (a 400)

The tables list openai-python's `CompletionCreateParams` fields (2026) plus `stream` and the sampling extras that
vLLM and llama-server take (`top_k`, `min_p`, `repetition_penalty`). The README's field table is this module's,
row for row (tests/engine/api/test_server_fields.py checks both ways).
"""
from __future__ import annotations

import json
import logging
from typing import Any

HONOURED, NO_EFFECT, REFUSED = "honoured", "accepted, no effect", "refused"
log = logging.getLogger("phiforge.server")

_COMMON = {
    "model": (HONOURED, "the base model or a loaded adapter's name"),
    "max_tokens": (HONOURED, ""),
    "temperature": (HONOURED, "0 to 2; 0 is greedy"),
    "top_p": (HONOURED, "(0, 1]"),
    "stop": (HONOURED, "a string or up to 16"),
    "seed": (HONOURED, "a generator of the request's own"),
    "stream": (HONOURED, "SSE"),
    "stream_options": (HONOURED, "include_usage"),
    "presence_penalty": (HONOURED, "-2 to 2"),
    "frequency_penalty": (HONOURED, "-2 to 2"),
    "logit_bias": (HONOURED, "token id -> -100 to 100, added to the logits; ids checked against the vocabulary"),
    "n": (HONOURED, "1 to serve --max-n; one prefill for all choices"),
    "top_k": (HONOURED, "an extension (vLLM, llama-server); -1 or 0: off"),
    "min_p": (HONOURED, "an extension; [0, 1]: drop tokens below min_p x the top token's probability"),
    "repetition_penalty": (HONOURED, "an extension (transformers' rule)"),
    "user": (NO_EFFECT, ""),
}
CHAT_FIELDS: dict[str, tuple[str, str]] = {
    "messages": (HONOURED, "system, developer, user, assistant (with tool_calls), tool"),
    **_COMMON,
    "max_completion_tokens": (HONOURED, "max_tokens' newer name"),
    "logprobs": (HONOURED, "after the grammar mask, before penalties and temperature; chat: true/false"),
    "top_logprobs": (HONOURED, "0 to 20"),
    "response_format": (HONOURED, "text, json_object, json_schema"),
    "tools": (HONOURED, "function tools"),
    "tool_choice": (HONOURED, "none, auto, required, a named function"),
    "parallel_tool_calls": (HONOURED, "false: at most one call"),
    "metadata": (NO_EFFECT, ""),
    "store": (NO_EFFECT, "nothing is stored"),
    "service_tier": (NO_EFFECT, "one tier"),
    "prediction": (NO_EFFECT, "a hint; the answer is the same without it"),
    "safety_identifier": (NO_EFFECT, ""),
    "prompt_cache_key": (NO_EFFECT, "the prefix cache works without it"),
    "prompt_cache_retention": (NO_EFFECT, ""),
    "prompt_cache_options": (NO_EFFECT, ""),
    "audio": (REFUSED, "no audio output"),
    "modalities": (REFUSED, 'only ["text"]'),
    "web_search_options": (REFUSED, "no web search"),
    "reasoning_effort": (REFUSED, "the model does not reason"),
    "verbosity": (REFUSED, "the model does not take it"),
    "moderation": (REFUSED, "no moderation model"),
    "functions": (REFUSED, "tools' old name: use tools"),
    "function_call": (REFUSED, "tool_choice's old name: use tool_choice"),
}
COMPLETION_FIELDS: dict[str, tuple[str, str]] = {
    "prompt": (HONOURED, "a string, token ids, or a list of either: one choice per prompt"),
    **_COMMON,
    "logprobs": (HONOURED, "after the grammar mask, before penalties and temperature; 0 to 5"),
    "response_format": (HONOURED, "text, json_object, json_schema"),
    "echo": (REFUSED, "the prompt is not returned"),
    "suffix": (REFUSED, "no insertion"),
    "best_of": (REFUSED, "use n"),
}
# a refused field is let through at these values: the request asks for nothing phiforge would have to do
OFF: dict[str, tuple[Any, ...]] = {
    "audio": (None,), "modalities": (None, ["text"]), "web_search_options": (None,), "reasoning_effort": (None,),
    "verbosity": (None,), "moderation": (None, False), "functions": (None, []), "function_call": (None, "none"),
    "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
}


class FieldError(ValueError):
    """A refused or unknown field; `param` names it (the server's 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def fields(kind: str) -> dict[str, tuple[str, str]]:
    return CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS


def check_fields(body: dict, kind: str, ignore_unknown: bool = False) -> None:
    """A 400 for a refused field set to anything but its off value, and for an unknown field (logged and let
    through with ignore_unknown)."""
    table = fields(kind)
    unknown = [name for name in body if name not in table]
    if unknown and not ignore_unknown:
        route = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        raise FieldError(unknown[0], f"unknown field '{unknown[0]}' for {route} (the README's field table lists what "
                              "phiforge takes; serve --ignore-unknown-fields lets such fields through)")
    if unknown:
        log.info("ignoring unknown request fields: %s", ", ".join(unknown))
    for name, value in body.items():
        if table.get(name, (None,))[0] == REFUSED and value not in OFF[name]:
            raise FieldError(name, f"'{name}' is not supported by this server ({table[name][1]}); got {json.dumps(value)}")
