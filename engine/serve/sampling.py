"""Next-token choice: logit bias, repetition penalty, temperature, top-k, top-p, min-p, then a seeded draw (or argmax).

The order is transformers' (`SequenceBiasLogitsProcessor` → `RepetitionPenaltyLogitsProcessor` →
`TemperatureLogitsWarper` → `TopKLogitsWarper` → `TopPLogitsWarper` → `MinPLogitsWarper` → softmax → multinomial),
so the same settings mean the same distribution:

    l'_v = l_v / p   if v was seen and l_v > 0        (repetition penalty p, CTRL-style; seen = prompt + output)
         = l_v * p   if v was seen and l_v <= 0
    q    = softmax(l' / T) restricted to the k largest, then to the smallest prefix of the sorted tokens whose
           mass reaches top_p (always at least one token), then to the tokens whose probability is at least
           min_p times the most likely one's

OpenAI's logit bias is added first: l_v += bias_v (bias in [-100, 100]: -100 bans v in practice, +100 all but
forces it).

Presence / frequency penalties (OpenAI's, applied after the repetition penalty, on output tokens only):
    l'_v -= presence · [c_v > 0] + frequency · c_v      c_v = how often v was generated so far

`temperature == 0` is greedy: argmax of l' (the penalty still applies, as in transformers).

Logprobs (`token_logprob`) are log_softmax of the logits as `sample` receives them: after a constraint's mask,
before penalties and temperature (vLLM's default), so they describe the model, not the sampling settings.

Reproducibility: every row draws from its own `torch.Generator`, so a row's tokens depend only on its seed and its
logits, not on which other prompts share the batch. Legend: B batch rows, V vocabulary.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_k: int | None = None          # None or 0: no top-k cut
    top_p: float = 1.0                # 1.0: no nucleus cut
    repetition_penalty: float = 1.0   # 1.0: off
    presence_penalty: float = 0.0     # 0.0: off (OpenAI's range is [-2, 2])
    frequency_penalty: float = 0.0    # 0.0: off
    min_p: float = 0.0                # 0.0: off
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit); (): off

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, numbers.Integral) or isinstance(self.top_k, bool)
                                       or self.top_k < 0):
            raise ValueError(f"top_k must be an int >= 0 (0 or None = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for tid, bias in self.logit_bias:
            if not (isinstance(tid, int) and tid >= 0 and -100.0 <= bias <= 100.0):
                raise ValueError(f"logit_bias entries are (token id >= 0, bias in [-100, 100]), got {(tid, bias)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


MAX_LOGPROBS = 20       # OpenAI's chat limit for top_logprobs
LOGPROB_FLOOR = -9999.0  # what a forbidden token's -inf is reported as (JSON has no infinity; vLLM's value)


@dataclass(frozen=True)
class TokenLogprob:
    """One output token's log-probability, and the `logprobs` most likely tokens at its position (best first):
    log_softmax of the logits the sampler was given, after the constraint's mask, before penalties and
    temperature (vLLM's default, "raw_logprobs"), floored at LOGPROB_FLOOR."""
    id: int
    logprob: float
    top: list[tuple[int, float]]


def make_generators(seeds: list[int | None]) -> list[torch.Generator | None]:
    """One CPU generator per row; None (no seed) draws from torch's global RNG."""
    return [None if s is None else torch.Generator().manual_seed(int(s)) for s in seeds]


def choice_seed(seed: int | None, i: int) -> int | None:
    """The seed of choice i of an n > 1 request: choice 0 keeps the request's (so n = 1 and choice 0 agree), the
    others get distinct streams mixed from (seed, i); no seed stays none (torch's global RNG)."""
    if seed is None or i == 0:
        return seed
    return (int(seed) * 0x9E3779B97F4A7C15 + i * 0xBF58476D1CE4E5B9) % (1 << 63)


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """logits (V,) as the sampler receives them → the token's log-probability and the k most likely (ties: the
    lower id first, as topk on a sorted copy gives), -inf floored at LOGPROB_FLOOR."""
    lp = torch.log_softmax(logits.float(), dim=-1).clamp_min(LOGPROB_FLOOR)     # (V,)
    top = []
    if k:
        values, ids = lp.topk(k)                                                # (k,), (k,)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(int(token), float(lp[token]), top)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V) fp32, seen (B, V) bool → penalized logits (B, V)."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Set everything outside the top-k / top-p / min-p set to -inf. logits (B, V) already divided by temperature."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)      # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass of the tokens strictly before it already reaches top_p: the first token
        # always survives, and the kept set is the smallest prefix with mass >= top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)                                   # (B, V)
        floor = min_p * probs.amax(dim=-1, keepdim=True)                 # (B, 1); the top token always stays
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator | None],
           seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) → next token ids (B,) int64.

    `seen` (B, V) bool marks tokens of each row's prompt and output (for the repetition penalty); `generators`
    has one entry per row; `counts` (B, V) how often each token was generated (presence/frequency penalties).
    """
    logits = logits.float()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias])
        logits = logits.index_add(-1, ids, torch.tensor([b for _, b in params.logit_bias]).expand(logits.shape[0], -1))
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None and (params.presence_penalty or params.frequency_penalty):
        logits = logits - params.presence_penalty * (counts > 0) - params.frequency_penalty * counts
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p)
    probs = logits.softmax(dim=-1)                                       # (B, V)
    out = torch.empty(probs.shape[0], dtype=torch.long)
    for b, g in enumerate(generators):  # per-row generators: a row's draw never depends on its batch mates
        out[b] = torch.multinomial(probs[b], 1, generator=g)[0]
    return out
