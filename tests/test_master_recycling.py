"""Recycling's policy, the served totals and the metrics built from them,
with fake processes, a fake clock and no sockets."""

from prometheus_client.exposition import generate_latest
from twisted.trial import unittest

from txcluster.master.metrics import ClusterMetrics
from txcluster.master.recycling import MEMORY_POLL_SECONDS, MemoryWatch, resident_memory
from txcluster.master.served import Served
from txcluster.master.supervisor import MIB, ExitInfo, RecyclePolicy
from txcluster.wire import DURATION_BUCKETS, WorkerStats

from .test_master_supervisor import Harness


def served(requests, **by_code):
    return WorkerStats(requests=requests, by_code={int(c[1:]): n for c, n in by_code.items()})


class PolicyTests(unittest.TestCase):
    def test_off_by_default(self):
        self.assertFalse(RecyclePolicy().active)
        self.assertIsNone(RecyclePolicy().request_limit(lambda a, b: 0))

    def test_each_worker_gets_its_own_jitter(self):
        policy = RecyclePolicy(max_requests=1000, jitter=100)
        self.assertEqual(policy.request_limit(lambda low, high: high), 1100)
        self.assertEqual(policy.request_limit(lambda low, high: low), 1000)
        self.assertEqual(RecyclePolicy(max_requests=5).request_limit(lambda a, b: 1 / 0), 5)

    def test_reasons(self):
        class W:
            stats = WorkerStats(requests=1000)
            rss = 612 * MIB

        self.assertEqual(RecyclePolicy(max_requests=1000).why(W(), 1000), "1000 requests")
        self.assertIsNone(RecyclePolicy(max_requests=1000).why(W(), 1001))
        self.assertEqual(RecyclePolicy(max_memory=500).why(W(), None), "RSS 612 MiB > 500 MiB")
        self.assertIsNone(RecyclePolicy(max_memory=700).why(W(), None))


class RecycleTests(unittest.TestCase):
    def test_a_worker_over_its_limit_is_replaced_its_successor_ready_first(self):
        h = Harness(count=2, recycling=RecyclePolicy(max_requests=50, jitter=10))
        h.supervisor._randint = lambda low, high: 3
        h.start_all_ready()
        h.clock.advance(5)  # no recycling in a worker's first seconds
        old = h.current(1)
        old.heartbeat(served(52))
        self.assertEqual(len(h.spawned), 2)  # under 53
        old.heartbeat(served(53))
        self.assertEqual(len(h.spawned), 3)
        self.assertEqual(h.spawned[0].signals, [])  # not before its successor is ready
        new = h.supervisor.processes[-1]
        new.ready()
        self.assertIs(h.current(1), new)
        self.assertEqual(h.spawned[0].signals, [15])  # SIGTERM: it drains
        self.assertEqual(h.supervisor.restarts["recycle"], 1)

    def test_one_replacement_at_a_time(self):
        h = Harness(count=2, recycling=RecyclePolicy(max_requests=10))
        h.start_all_ready()
        h.clock.advance(5)
        h.current(1).heartbeat(served(10))
        h.current(2).heartbeat(served(10))
        h.current(1).heartbeat(served(11))  # asked again: still one successor
        self.assertEqual(len(h.spawned), 3)
        h.supervisor.processes[-1].ready()  # worker 1's successor
        self.assertEqual(len(h.spawned), 3)  # the old worker 1 drains first
        h.spawned[0].worker.exited(ExitInfo(status=0))
        self.assertEqual(len(h.spawned), 4)  # now worker 2's

    def test_a_successor_that_fails_is_retried_later_and_later(self):
        h = Harness(count=1, recycling=RecyclePolicy(max_requests=10))
        h.start_all_ready()
        h.clock.advance(5)
        h.current(1).heartbeat(served(10))
        self.assertEqual(len(h.spawned), 2)
        delays = []
        for _ in range(3):
            h.supervisor.processes[-1].exited(ExitInfo(status=4))  # the new code is broken
            before, waited = len(h.spawned), 0
            while len(h.spawned) == before:
                h.clock.advance(1)
                waited += 1
                h.current(1).heartbeat(served(10))
            delays.append(waited)
        self.assertEqual(delays, [1, 2, 4])

    def test_not_in_its_first_seconds(self):
        h = Harness(count=1, recycling=RecyclePolicy(max_memory=100))
        h.start_all_ready()
        h.supervisor.memory_read(h.current(1), 200 * MIB)
        self.assertEqual(len(h.spawned), 1)
        h.clock.advance(5)
        h.supervisor.memory_read(h.current(1), 200 * MIB)
        self.assertEqual(len(h.spawned), 2)

    def test_memory(self):
        h = Harness(count=1, recycling=RecyclePolicy(max_memory=100))
        h.start_all_ready()
        watch = MemoryWatch(h.supervisor, h.clock, rss=lambda pid: 101 * MIB)
        watch.start()
        h.clock.pump([MEMORY_POLL_SECONDS] * 3)
        self.assertEqual(h.current(1).rss, 101 * MIB)
        self.assertEqual(len(h.spawned), 2)
        watch.stop()

    def test_the_master_reads_resident_memory_from_proc(self):
        import os

        self.assertGreater(resident_memory(os.getpid()), MIB)
        self.assertEqual(resident_memory(2 ** 22 + 12345), 0)  # no such process


class ServedTests(unittest.TestCase):
    def test_totals_only_grow_when_a_process_is_replaced(self):
        totals = Served()
        first, second = object(), object()
        totals.add(first, 1, served(10, c200=9, c404=1))
        totals.add(first, 1, served(15, c200=14, c404=1))
        totals.forget(first)
        totals.add(second, 1, served(3, c200=3))  # the successor starts from 0
        self.assertEqual(dict(totals.requests), {(1, 200): 17, (1, 404): 1})

    def test_durations_add_up_per_bucket(self):
        totals = Served()
        process = object()
        buckets = [0] * (len(DURATION_BUCKETS) + 1)
        buckets[0], buckets[-1] = 2, 1
        totals.add(process, 2, WorkerStats(3, 0, {200: 3}, tuple(buckets), 12.5))
        buckets[0] = 5
        totals.add(process, 2, WorkerStats(6, 0, {200: 6}, tuple(buckets), 12.75))
        self.assertEqual((totals.durations[2][0], totals.durations[2][-1],
                          totals.duration_sums[2]), (5, 1, 12.75))


class MetricsTests(unittest.TestCase):
    def test_the_exposition(self):
        h = Harness(count=2)
        h.start_all_ready()
        buckets = [0] * (len(DURATION_BUCKETS) + 1)
        buckets[1] = 4
        h.current(1).heartbeat(WorkerStats(4, 2, {200: 3, 500: 1}, tuple(buckets), 0.03))
        h.current(1).rss = 50 * MIB
        text = generate_latest(ClusterMetrics(h.supervisor).registry()).decode()
        for line in ('txcluster_workers 2.0', 'txcluster_workers_ready 2.0',
                     'txcluster_worker_restarts_total{reason="crash"} 0.0',
                     'txcluster_http_requests_total{code="500",worker="1"} 1.0',
                     'txcluster_http_request_duration_seconds_bucket{le="0.005",worker="1"} 0.0',
                     'txcluster_http_request_duration_seconds_bucket{le="0.01",worker="1"} 4.0',
                     'txcluster_http_request_duration_seconds_bucket{le="+Inf",worker="1"} 4.0',
                     'txcluster_http_request_duration_seconds_count{worker="1"} 4.0',
                     'txcluster_worker_resident_memory_bytes{worker="1"} 5.24288e+07',
                     'txcluster_connections_open{worker="1"} 2.0'):
            self.assertIn(line + "\n", text)

    def test_served_over_http_on_metrics_only(self):
        from twisted.internet.testing import StringTransport

        from txcluster.master.metrics import metrics_site

        h = Harness(count=1)
        h.start_all_ready()
        for request, status in ((b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
                                (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"404")):
            channel = metrics_site(ClusterMetrics(h.supervisor), h.clock).buildProtocol(None)
            transport = StringTransport()
            channel.makeConnection(transport)
            channel.dataReceived(request)
            response = transport.value()
            self.assertTrue(response.startswith(b"HTTP/1.1 " + status), response[:100])
            if status == b"200":
                self.assertIn(b"txcluster_workers 1.0", response)
                self.assertIn(b"text/plain; version=", response)

