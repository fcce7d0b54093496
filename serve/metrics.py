"""Prometheus metrics of one server (its own registry, so several servers in one process stay apart):
requests and errors per endpoint, request latency, queries per micro-batch, the index size."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("uniret_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("uniret_request_errors", "HTTP requests answered with a 4xx or 5xx status.",
                              ["endpoint"], registry=self.registry)
        self.latency = Histogram("uniret_request_latency_seconds", "Time to answer a request.", ["endpoint"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.batch_size = Histogram("uniret_batch_queries", "Queries embedded and searched per micro-batch.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.items = Gauge("uniret_index_items", "Items in the index version being served.", registry=self.registry)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
