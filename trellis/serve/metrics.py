"""Prometheus metrics of the server: traffic and latency, the prefix cache and the queue.

Each app has its own registry, so several servers (tests) can live in one process. Counters and
histograms are updated by the engine thread as tokens come out, the finished choices by the
request handlers; the cache and queue gauges are read when ``/metrics`` is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trellis.engine import Engine, Session

# Latency buckets from a fast GPU step to a slow CPU prefill.
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 40,
                    80, float("inf"))


class ServerMetrics:
    """The server's metrics, in ``registry``; ``render()`` is the ``/metrics`` body."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("trellis_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.cached_prompt_tokens = Counter("trellis_cached_prompt_tokens",
                                            "Prompt tokens served by the radix prefix cache", registry=r)
        self.generation_tokens = Counter("trellis_generation_tokens", "Tokens generated", registry=r)
        self.finished_choices = Counter("trellis_choices_finished", "Choices that ended, by finish reason",
                                        ["finish_reason"], registry=r)
        self.ttft = Histogram("trellis_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("trellis_inter_token_latency_seconds", "Between consecutive generated tokens",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("trellis_e2e_request_latency_seconds", "From arrival to the last generated token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self._prompt, self._cached = 0, 0
        Gauge("trellis_prefix_cache_hit_rate", "Share of admitted prompt tokens served by the prefix cache",
              registry=r).set_function(lambda: self._cached / self._prompt if self._prompt else 0.0)
        Gauge("trellis_requests_running", "Sessions running (prefill or decode)",
              registry=r).set_function(lambda: len(engine.running))
        Gauge("trellis_requests_waiting", "Requests queued, not yet admitted",
              registry=r).set_function(lambda: engine.num_waiting)
        r.register(_CacheCollector(engine))

    def admitted(self, prompt_tokens: int, cached_tokens: int) -> None:
        self._prompt += prompt_tokens
        self._cached += cached_tokens
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_prompt_tokens.inc(cached_tokens)

    def tokens(self, session: Session, start: int, end: int) -> None:
        """Record ``session``'s tokens ``start:end``, new since the last call."""
        times = session.token_times
        for i in range(start, end):
            if i == 0:
                self.ttft.observe(times[0] - session.created_time)
            else:
                self.inter_token.observe(times[i] - times[i - 1])
        self.generation_tokens.inc(end - start)

    def finished(self, session: Session) -> None:
        if session.token_times:
            self.e2e.observe(session.token_times[-1] - session.created_time)

    def choice_finished(self, finish_reason: str) -> None:
        """A choice ended, with the ``finish_reason`` its client sees (a stop string is found in
        the text, after the engine's session: only the HTTP layer knows it), or ``"cancelled"``
        when the client went away first."""
        self.finished_choices.labels(finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector(Collector):
    """The KV pool and radix cache, read at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        if self.engine.runner.failure is not None:  # a grid that lost a stage has no pool to read (/health says why)
            return
        stats = self.engine.runner.prefix_cache.stats()
        free, cached, total = stats["free_blocks"], stats["cached_blocks"], stats["total_blocks"]
        tail = stats["tail_blocks"]
        blocks = GaugeMetricFamily("trellis_kv_cache_blocks", "KV blocks by state: free; cached (in the radix tree, "
                                   "maybe also used by sessions); tail (finished sessions' partly filled last "
                                   "blocks, kept to copy from); live (held by sessions only)", labels=["state"])
        for state, value in (("free", free), ("cached", cached), ("tail", tail), ("live", total - free - cached - tail)):
            blocks.add_metric([state], value)
        yield blocks
        yield GaugeMetricFamily("trellis_kv_cache_usage_ratio", "Share of KV blocks not free", value=1 - free / total)
        yield CounterMetricFamily("trellis_kv_cache_evicted_blocks", "Cached blocks evicted to make room",
                                  value=stats["evicted_blocks"])
