"""Prometheus text exposition (format 0.0.4) for the server's /metrics: gauges, counters and fixed-bucket histograms.

Hand-rolled rather than prometheus_client: the server needs three histograms and a dozen samples, and the text format
is a few lines (https://prometheus.io/docs/instrumenting/exposition_formats/):

    # HELP name text
    # TYPE name histogram
    name_bucket{le="0.1"} 3          cumulative: observations <= le
    name_bucket{le="+Inf"} 5
    name_sum 1.27
    name_count 5

Buckets are fixed at construction, so two scrapes are always comparable and `histogram_quantile` works across
restarts. Observations come from the event loop only (one thread), so no lock is needed.
"""
from __future__ import annotations

import bisect
import math
from typing import Iterable

# Latency buckets in seconds, from a fast CPU decode step to a long request on a busy server.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class Histogram:
    """Cumulative fixed-bucket histogram: `observe(seconds)`, `render()` gives its exposition lines."""

    def __init__(self, name: str, help_text: str, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.name, self.help = name, help_text
        self.bounds = tuple(sorted(float(b) for b in buckets))
        if not self.bounds:
            raise ValueError(f"histogram {name}: no buckets")
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot is (max bound, +Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip(self.bounds + (math.inf,), self.counts):
            running += n
            lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {running}')
        lines += [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


def sample(name: str, kind: str, help_text: str, value: float, labels: dict[str, str] | None = None) -> list[str]:
    """One gauge or counter with its HELP/TYPE header."""
    if kind not in ("gauge", "counter"):
        raise ValueError(f"metric {name}: kind must be gauge or counter, got {kind!r}")
    label = "" if not labels else "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{label} {_num(value)}"]


def labelled(name: str, kind: str, help_text: str, label: str, values: dict[str, float]) -> list[str]:
    """One gauge or counter with a sample per value of `label` (sorted), under one HELP/TYPE header."""
    rows = [sample(name, kind, help_text, v, {label: k}) for k, v in sorted(values.items())]
    return (rows[0][:2] if rows else sample(name, kind, help_text, 0)[:2]) + [r[2] for r in rows]


def parse(text: str) -> dict[str, float]:
    """The samples of an exposition text as {'name{labels}': value}: what tests and the bench read back."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
