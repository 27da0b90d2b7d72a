"""Prometheus metrics of one server (prometheus-client, a registry of its own per app, so that two apps in
one process, as in tests, never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """Requests by model, route and status; latency; onnxruntime batch sizes; the queue's depth."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vggspec_requests", "HTTP requests served, by model, route and status",
                                ["model", "route", "status"], registry=self.registry)
        self.latency = Histogram("vggspec_request_seconds", "Request latency, from headers received to response",
                                 ["model", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("vggspec_batch_size", "Rows in each onnxruntime run (dynamic batching)",
                               ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue = Gauge("vggspec_queue_depth", "Inference requests admitted and not yet answered",
                           registry=self.registry)
        self.rejected = Counter("vggspec_rejected", "Requests refused because the queue was full",
                                registry=self.registry)

    def observe_request(self, model: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(model, route, str(status)).inc()
        self.latency.labels(model, route).observe(seconds)

    def observe_header_timeout(self) -> None:
        """A 408 sent by the connection before any route was known (serve.protocol's header deadline)."""
        self.requests.labels("", "(headers)", "408").inc()

    def observe_batch(self, model: str, rows: int) -> None:
        self.batch.labels(model).observe(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
