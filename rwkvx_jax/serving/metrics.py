"""The server's counters and latency histograms, written as Prometheus text (format 0.0.4).

Counters only grow; gauges (queue depth, busy slots, cache bytes) are read when scraped. Time to
first token is measured from a request's arrival to its first token leaving the engine; the
inter-token latency is the time between two tokens of one request.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

# Seconds; the last bucket (+Inf) is implicit.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Cumulative buckets, sum and count of observed values."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return [*out, f"{name}_sum {self.total!r}", f"{name}_count {running}"]


class Metrics:
    """Everything /metrics reports; thread-safe.

    Attributes:
      gauges: name -> (help, type, a function read at scrape time).
    """

    COUNTERS = {
        "rwkvx_requests_total": "Generation requests accepted",
        "rwkvx_request_errors_total": "Requests refused with a 4xx or failed with a 5xx",
        "rwkvx_prompt_tokens_total": "Prompt tokens of finished requests",
        "rwkvx_prompt_tokens_cached_total": "Prompt tokens taken from the state cache",
        "rwkvx_completion_tokens_total": "Tokens generated and sent",
    }
    HISTOGRAMS = {
        "rwkvx_time_to_first_token_seconds": "Arrival to first token",
        "rwkvx_inter_token_latency_seconds": "Time between two tokens of one request",
        "rwkvx_decode_step_seconds": "One batched decode step",
    }

    def __init__(self):
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.histograms = {name: Histogram() for name in self.HISTOGRAMS}
        self.gauges: dict[str, tuple[str, str, Callable[[], float]]] = {}

    def add(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self.counters[name] += amount

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self.histograms[name].observe(seconds)

    def gauge(
        self, name: str, help_text: str, read: Callable[[], float], kind: str = "gauge"
    ) -> None:
        """A value read at scrape time; kind "counter" for counts kept elsewhere."""
        self.gauges[name] = (help_text, kind, read)

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        lines = []
        with self._lock:
            for name, value in self.counters.items():
                lines += [f"# HELP {name} {self.COUNTERS[name]}", f"# TYPE {name} counter"]
                lines.append(f"{name} {value}")
            for name, histogram in self.histograms.items():
                lines += [f"# HELP {name} {self.HISTOGRAMS[name]}", f"# TYPE {name} histogram"]
                lines += histogram.lines(name)
        for name, (help_text, kind, read) in self.gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {read()}"]
        return "\n".join(lines) + "\n"
