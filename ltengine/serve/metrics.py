"""Prometheus metrics of the server (``GET /metrics``), on a registry of its own.

Gauges and totals come from ``engine.metrics()`` as the engine loop last saw it (read at scrape time,
so they never drift from the engine's own counts); latencies and per-request figures are observed by
the engine loop as tokens come out."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    """Reads the engine loop's latest snapshot of ``engine.metrics()`` at scrape time."""

    GAUGES = {"running": "requests decoding now", "waiting": "requests waiting for KV (queued ones included)",
              "swapped": "requests preempted to host memory", "kv_bytes_used": "KV bytes held now",
              "kv_budget_bytes": "the KV budget in bytes (absent when unbounded)",
              "peak_kv_bytes": "most KV bytes seen in use after a step since start",
              "peak_running": "most requests seen decoding at once since start"}
    TOTALS = {"preemptions": "requests preempted", "prompt_tokens": "prompt tokens admitted",
              "generation_tokens": "tokens generated"}

    def __init__(self, loop):
        self.loop = loop

    def collect(self):
        snap = self.loop.snapshot() if self.loop is not None else {}
        snap = dict(snap, waiting=int(snap.get("waiting", 0)) + int(snap.get("queued", 0)))
        for key, doc in self.GAUGES.items():
            value = snap.get(key)
            name = {"peak_running": "ltengine_requests_running_peak"}.get(
                key, f"ltengine_{key}" if key.startswith(("kv", "peak")) else f"ltengine_requests_{key}")
            g = GaugeMetricFamily(name, doc)
            if value is not None:
                g.add_metric([], float(value))
            yield g
        for key, doc in self.TOTALS.items():
            c = CounterMetricFamily(f"ltengine_{key}", doc)  # the client adds the _total suffix
            c.add_metric([], float(snap.get(f"{key}_total", 0) or 0))
            yield c


class ServerMetrics:
    """The server's metrics; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, num_layers: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("ltengine_time_to_first_token_seconds", "from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("ltengine_inter_token_latency_seconds", "time between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("ltengine_request_latency_seconds", "from arrival to the last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.lazy_layers = Histogram("ltengine_lazy_layers", "lazy layers per finished request",
                                     buckets=tuple(range(num_layers + 1)), registry=r)
        self.kv_saved = Histogram("ltengine_kv_saved_ratio", "share of full-attention KV saved per request",
                                  buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.requests = Counter("ltengine_requests_finished", "finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("ltengine_requests_rejected", "requests refused before the engine saw them",
                                ["reason"], registry=r)
        self._collector: _EngineCollector | None = None

    def attach(self, loop) -> None:
        """Export the engine loop's snapshot (once the loop exists)."""
        self._collector = _EngineCollector(loop)
        self.registry.register(self._collector)

    def request_done(self, out, seconds: float) -> None:
        self.requests.labels(out.finish_reason).inc()
        if out.finish_reason in ("eos", "stop", "length"):
            self.e2e.observe(seconds)
            self.lazy_layers.observe(len(out.lazy_layers))
            self.kv_saved.observe(out.stats.kv_saved)

    def finished(self, reason: str) -> None:
        self.requests.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
