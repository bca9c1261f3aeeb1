"""The server's Prometheus metrics (prometheus_client), one registry per server.

Requests: every generation request counts once in `w2s_requests_total` when it arrives and,
when it ends, once in exactly one outcome: finished (answered 200, a stream sent to its end),
failed (5xx, or a stream whose search failed), cancelled (the client went away), rejected
(4xx: invalid, unauthorized, unknown model, too large, a body too slow, not JSON, wrong host,
queue full; the reason in `w2s_requests_rejected_by_reason_total`). At rest, requests = the
sum of the outcomes. Tokens: the usage finished requests were answered with
(`w2s_prompt_tokens_total`, `w2s_generation_tokens_total`), and the work the searches took in
each model (`w2s_tokens_forwarded_total`).

Timings (histograms): time to first token (from arrival to the first text that became
final), time per chunk (between a request's selections, the first from its admission), and
request time (arrival to the last byte, finished requests only).

The engine's state (queue length, running searches, KV blocks in use per pool, tokens
forwarded per model) is read from Engine.stats() at scrape time.
"""

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

OUTCOMES = ("finished", "failed", "cancelled", "rejected")
OUTCOME_HELP = {"finished": "answered 200 (a stream: sent to its end)",
                "failed": "answered 5xx, or a stream whose search failed",
                "cancelled": "the client went away",
                "rejected": "answered 4xx: invalid, unauthorized, unknown model, too large, "
                            "a body too slow, not JSON, wrong host, queue full"}
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250)


class ServerMetrics:

    def __init__(self, engine_stats=None):
        """engine_stats: a callable returning Engine.stats()' dict (read at scrape time)."""
        self.registry = r = CollectorRegistry()
        self._lock = threading.Lock()
        self._arrived = 0
        self._ended = 0
        self.requests = Counter("w2s_requests", "generation requests received; each ends in "
                                "exactly one outcome below", registry=r)
        self.outcomes = {o: Counter(f"w2s_requests_{o}", OUTCOME_HELP[o], registry=r)
                         for o in OUTCOMES}
        self.rejected_by = Counter("w2s_requests_rejected_by_reason",
                                   "rejected requests by reason", ["reason"], registry=r)
        self.steps = Counter("w2s_engine_steps", "engine steps", registry=r)
        self.batched_steps = Counter("w2s_batched_steps", "steps that ran several requests",
                                     registry=r)
        self.max_running = Gauge("w2s_max_running_requests", "most requests in one step",
                                 registry=r)
        self.first_token = Histogram(
            "w2s_time_to_first_token_seconds", "from a request's arrival to the first text "
            "that became final", buckets=SECONDS, registry=r)
        self.chunk = Histogram(
            "w2s_time_per_chunk_seconds", "between a request's selections (the first from "
            "its admission)", buckets=SECONDS, registry=r)
        self.request_time = Histogram(
            "w2s_request_seconds", "from arrival to the last byte, finished requests",
            buckets=SECONDS, registry=r)
        # What the clients were answered (their usage), as vLLM's prompt_tokens_total and
        # generation_tokens_total: what an operator reconciles with billing. (The work the
        # search took, every candidate in every model, is w2s_tokens_forwarded_total.)
        self.prompt_tokens = Counter("w2s_prompt_tokens", "prompt tokens in the usage of "
                                     "finished requests", registry=r)
        self.generation_tokens = Counter("w2s_generation_tokens", "completion tokens in the "
                                         "usage of finished requests", registry=r)
        self._most_running = 0
        if engine_stats is not None:
            r.register(_EngineCollector(engine_stats, self))

    # ---- requests -----------------------------------------------------------------------

    def arrived(self):
        with self._lock:
            self._arrived += 1
        self.requests.inc()

    def ended(self, outcome: str, reason: str | None = None, seconds: float | None = None,
              tokens: tuple[int, int] | None = None):
        """tokens: (prompt, completion) of the usage a finished request was answered with."""
        assert outcome in OUTCOMES, outcome
        with self._lock:
            self._ended += 1
        self.outcomes[outcome].inc()
        if outcome == "rejected":
            self.rejected_by.labels(reason or "invalid").inc()
        if outcome == "finished" and seconds is not None:
            self.request_time.observe(seconds)
        if outcome == "finished" and tokens is not None:
            self.prompt_tokens.inc(tokens[0])
            self.generation_tokens.inc(tokens[1])

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._arrived - self._ended

    # ---- the engine loop ----------------------------------------------------------------

    def stepped(self, running: int):
        self.steps.inc()
        if running > 1:
            self.batched_steps.inc()
        if running > self._most_running:
            self._most_running = running
            self.max_running.set(running)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges and counters read from Engine.stats() when /metrics is scraped."""

    def __init__(self, engine_stats, metrics: ServerMetrics):
        self.engine_stats, self.metrics = engine_stats, metrics

    def describe(self):
        return []   # the families depend on the engine's pools: no registry-time check

    def collect(self):
        stats = self.engine_stats()
        yield GaugeMetricFamily("w2s_requests_in_flight", "received, not yet ended",
                                value=self.metrics.in_flight)
        yield GaugeMetricFamily("w2s_requests_running", "searches in the engine",
                                value=stats["running"])
        yield GaugeMetricFamily("w2s_queue_length", "searches waiting for KV memory",
                                value=stats["waiting"])
        yield GaugeMetricFamily("w2s_kv_blocks_capacity", "KV blocks per pool",
                                value=stats["kv_blocks_total"])
        used = GaugeMetricFamily("w2s_kv_blocks_used", "KV blocks in use, per model's pool",
                                 labels=["model"])
        for model, n in stats["kv_blocks_used"].items():
            used.add_metric([model], n)
        yield used
        tokens = CounterMetricFamily("w2s_tokens_forwarded", "tokens through each model, "
                                     "of requests that ended and score calls", labels=["model"])
        for model, n in stats["tokens"].items():
            tokens.add_metric([model], n)
        yield tokens
        cached = CounterMetricFamily("w2s_prefix_cache_hit_tokens", "prompt tokens each model "
                                     "read from the prefix cache instead of forwarding them, of "
                                     "requests that ended and score calls", labels=["model"])
        for model, n in stats["cached_tokens"].items():
            cached.add_metric([model], n)
        yield cached
        yield CounterMetricFamily("w2s_decode_steps", "decode steps of the large model here",
                                  value=stats["decode_steps"])


def parse_metrics(text: str) -> dict[str, float]:
    """/metrics' text -> {'name{label="value",...}': value} (for tests, benchmarks, scripts),
    read with prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
