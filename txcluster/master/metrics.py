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
from twisted.web.resource import Resource
from twisted.web.server import Site

from ..wire import DURATION_BUCKETS
from .supervisor import RESTART_REASONS, Supervisor


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


class MetricsResource(Resource):
    """C{GET /metrics}, in the format the scraper accepts.

    Rendered in the reactor's thread (C{prometheus_client.twisted}'s
    resource renders in a thread pool, where reading the supervisor's
    state would race the reactor)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Any) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encode, content_type = choose_encoder(accept)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        return encode(self._registry)


def metrics_site(metrics: ClusterMetrics) -> Site:
    """A site serving C{GET /metrics} (anything else: 404)."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics.registry()))
    site = Site(root)
    site.noisy = False
    return site
