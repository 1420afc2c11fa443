"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters, gauges and histograms are plain objects guarded by one lock: the model loop thread writes
them, the HTTP thread renders them for ``GET /metrics``.
"""

from __future__ import annotations

import bisect
import threading

# seconds; first tokens wait for a prefill (and a queue), later tokens for one decode step
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus expects them."""

    def __init__(self, buckets: tuple[float, ...]):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class Metrics:
    """Everything ``/metrics`` reports; ``render()`` is the exposition text."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = 0
        self.queued = 0
        self.requests: dict[str, int] = {}  # finish reason -> count (stop, length, cancelled, timeout, error)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.shared_prefills = 0  # sequences that started from a copy of another's prefill (the same prompt)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.engine: str | None = None  # the decode step that runs ("eager", "native"), once the model is loaded

    def finished(self, reason: str) -> None:
        with self.lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1

    def render(self) -> str:
        with self.lock:
            lines = [
                "# HELP lmlab_requests_running Requests holding a KV-cache slot in the running batch.",
                "# TYPE lmlab_requests_running gauge",
                f"lmlab_requests_running {self.running}",
                "# HELP lmlab_requests_queued Requests waiting for a slot.",
                "# TYPE lmlab_requests_queued gauge",
                f"lmlab_requests_queued {self.queued}",
                "# HELP lmlab_requests_total Finished requests by how they ended.",
                "# TYPE lmlab_requests_total counter",
                *(f'lmlab_requests_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.requests.items())),
                "# HELP lmlab_prompt_tokens_total Prompt tokens of the sequences admitted (a shared prefill counts for each).",
                "# TYPE lmlab_prompt_tokens_total counter",
                f"lmlab_prompt_tokens_total {self.prompt_tokens}",
                "# HELP lmlab_generated_tokens_total Tokens generated.",
                "# TYPE lmlab_generated_tokens_total counter",
                f"lmlab_generated_tokens_total {self.generated_tokens}",
                "# HELP lmlab_shared_prefills_total Sequences that started from a copy of another's prefill "
                "(the same prompt: n choices, best-of-n samples).",
                "# TYPE lmlab_shared_prefills_total counter",
                f"lmlab_shared_prefills_total {self.shared_prefills}",
                "# HELP lmlab_time_to_first_token_seconds From arrival (queue included) to the first generated token.",
                "# TYPE lmlab_time_to_first_token_seconds histogram",
                *self.ttft.lines("lmlab_time_to_first_token_seconds"),
                "# HELP lmlab_inter_token_latency_seconds Time between consecutive tokens of one request.",
                "# TYPE lmlab_inter_token_latency_seconds histogram",
                *self.itl.lines("lmlab_inter_token_latency_seconds"),
            ]
            if self.engine is not None:
                lines += ["# HELP lmlab_engine_info The decode engine that runs each decode step (lmlab.engine).",
                          "# TYPE lmlab_engine_info gauge", f'lmlab_engine_info{{engine="{self.engine}"}} 1']
        return "\n".join(lines) + "\n"
