"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per server.

Counters and histograms are updated as requests finish; the engine's state (running and waiting requests,
KV blocks, prefix-cache hit rate) is read when the metrics are scraped, so nothing is polled.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

disable_created_metrics()  # the *_created series only add noise to every scrape

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineState:
    """A collector reading the engine's queues and KV-cache pool at scrape time."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self):
        scheduler, pool = self.engine.scheduler, self.engine.pool
        for name, help_text, value in (
            ("ftkit_requests_running", "Sequences in the running batch.", len(scheduler.running)),
            ("ftkit_requests_waiting", "Sequences waiting to be scheduled.", len(scheduler.waiting)),
            ("ftkit_kv_blocks_used", "KV-cache blocks in use.", pool.num_used_blocks),
            ("ftkit_kv_blocks_free", "KV-cache blocks free (cached prefixes included).", pool.num_free_blocks),
            ("ftkit_prefix_cache_hit_rate", "Share of looked-up prompt tokens found in the prefix cache.",
             self.engine.kv_cache.prefix_hit_rate),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)


class ServerMetrics:
    """What ``/metrics`` reports."""

    def __init__(self, engine: Any | None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ftkit_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("ftkit_prompt_tokens", "Prompt tokens processed.", registry=self.registry)
        self.generation_tokens = Counter("ftkit_generation_tokens", "Tokens generated.", registry=self.registry)
        self.ttft = Histogram("ftkit_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("ftkit_time_per_output_token_seconds", "Mean time per token after the first.",
                              buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram("ftkit_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        if engine is not None:
            self.registry.register(_EngineState(engine))

    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_generation(self, *, prompt_tokens: int, generated_tokens: int, arrival: float,
                           first_token: float | None, finished: float) -> None:
        """Record one finished engine request (``arrival``, ``first_token``, ``finished``: monotonic seconds)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        self.e2e.observe(finished - arrival)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            if generated_tokens > 1:
                self.tpot.observe((finished - first_token) / (generated_tokens - 1))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
