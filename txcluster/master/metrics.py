"""
C{--metrics}: the cluster in the Prometheus text format, served by the
master, from what the workers report with their heartbeats
(L{txcluster.wire.WorkerStats}) and the supervisor's own state.

Every family is built with C{prometheus_client} (a custom collector), and
written by its encoder.  The request counts are the supervisor's totals
(L{txcluster.master.served}), which keep their sums when a worker is
replaced.  No request for metrics ever reaches a worker.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Tuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.logger import Logger
from twisted.web import http

from ..wire import DURATION_BUCKETS
from .supervisor import RESTART_REASONS, Supervisor


log = Logger(namespace="txcluster.master")


class ClusterMetrics(Collector):
    """The cluster's metrics, read from the supervisor when scraped."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def registry(self) -> CollectorRegistry:
        """A registry with these metrics only (not the master's own)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return registry

    def collect(self) -> Iterator[Any]:
        supervisor = self._supervisor
        current = {wid: w for wid, w in supervisor.slots.items() if w is not None and w.alive}
        yield GaugeMetricFamily("txcluster_workers", "Workers configured",
                                value=supervisor.count)
        yield GaugeMetricFamily("txcluster_workers_ready", "Workers ready and serving",
                                value=len(supervisor.serving()))
        restarts = CounterMetricFamily("txcluster_worker_restarts",
                                       "Worker processes replaced, by reason", labels=["reason"])
        for reason in RESTART_REASONS:
            restarts.add_metric([reason], supervisor.restarts[reason])
        yield restarts
        requests = CounterMetricFamily("txcluster_http_requests",
                                       "HTTP requests answered by the workers",
                                       labels=["worker", "code"])
        served = supervisor.served
        for (worker_id, code), n in sorted(served.requests.items()):
            requests.add_metric([str(worker_id), str(code)], n)
        yield requests
        durations = HistogramMetricFamily("txcluster_http_request_duration_seconds",
                                          "Time from a request's first line to its last byte",
                                          labels=["worker"])
        for worker_id, counts in sorted(served.durations.items()):
            durations.add_metric([str(worker_id)], _cumulative(counts),
                                 served.duration_sums[worker_id])
        yield durations
        memory = GaugeMetricFamily("txcluster_worker_resident_memory_bytes",
                                   "Resident memory of each worker", labels=["worker"])
        connections = GaugeMetricFamily("txcluster_connections_open",
                                        "Connections open in each worker", labels=["worker"])
        for worker_id, worker in sorted(current.items()):
            if worker.rss:
                memory.add_metric([str(worker_id)], worker.rss)
            connections.add_metric([str(worker_id)], worker.stats.connections)
        yield memory
        yield connections


def _cumulative(counts: List[int]) -> List[Tuple[str, float]]:
    """Per-bucket counts as Prometheus buckets: cumulative, +Inf last."""
    buckets, total = [], 0
    for bound, n in zip((*map(str, DURATION_BUCKETS), "+Inf"), counts):
        total += n
        buckets.append((bound, total))
    return buckets


class MetricsRequest(http.Request):
    """C{GET /metrics}, in the format the scraper accepts; anything else
    is a 404.  Rendered in the reactor's thread: C{prometheus_client}'s
    Twisted resource renders in a thread pool, where reading the
    supervisor's state would race the reactor, and C{twisted.web.server}
    would cost the master 2.3 MiB more than C{twisted.web.http}."""

    def process(self) -> None:
        try:
            self._answer()
        except Exception:
            log.failure("cannot serve the metrics")
            self.setResponseCode(500)
        finally:
            self.finish()

    def _answer(self) -> None:
        if self.path != b"/metrics" or self.method not in (b"GET", b"HEAD"):
            self.setResponseCode(404)
            self.setHeader(b"content-type", b"text/plain; charset=utf-8")
            self.write(b"not found: the metrics are at /metrics\n")
        else:
            accept = (self.getHeader(b"accept") or b"").decode("latin-1")
            encode, content_type = choose_encoder(accept)
            body = encode(self.channel.factory.registry)
            self.setHeader(b"content-type", content_type.encode("latin-1"))
            self.setHeader(b"content-length", str(len(body)).encode())
            if self.method == b"GET":
                self.write(body)


class MetricsFactory(http.HTTPFactory):
    noisy = False

    def __init__(self, registry: CollectorRegistry, reactor: Any) -> None:
        super().__init__(reactor=reactor)
        self.registry = registry

    def buildProtocol(self, addr: Any) -> http.HTTPChannel:
        channel = super().buildProtocol(addr)
        channel.requestFactory = MetricsRequest
        return channel

    def log(self, request: Any) -> None:
        """No access log for scrapes."""


def metrics_site(metrics: ClusterMetrics, reactor: Any) -> MetricsFactory:
    """What serves C{GET /metrics} on the C{--metrics} endpoint."""
    return MetricsFactory(metrics.registry(), reactor)
