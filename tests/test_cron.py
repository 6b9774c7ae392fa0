"""Cron jobs on a fake clock: timing, failures, no overlap, stopping."""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from txcluster.app import Cluster, CronSpec
from txcluster.cron import CronService


class CronTests(unittest.TestCase):
    def service(self, job, seconds=10):
        self.clock = Clock()
        return CronService([CronSpec(job, seconds)], self.clock)

    def test_first_run_one_interval_after_start(self):
        runs = []
        cron = self.service(lambda: runs.append(self.clock.seconds()))
        cron.start()
        self.clock.advance(9.5)
        self.assertEqual(runs, [])
        self.clock.advance(0.5)
        self.assertEqual(runs, [10])
        self.clock.advance(10)
        self.assertEqual(runs, [10, 20])

    def test_failing_run_is_logged_and_job_goes_on(self):
        runs = []

        def job():
            runs.append(1)
            raise RuntimeError("boom")

        cron = self.service(job)
        cron.start()
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(len(runs), 2)
        self.assertEqual(cron.jobs[0].failures, 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_async_job(self):
        runs = []

        async def job():
            runs.append(1)

        cron = self.service(job)
        cron.start()
        self.clock.advance(10)
        self.assertEqual(runs, [1])

    def test_slow_run_delays_next_never_overlaps(self):
        pending = []

        def job():
            pending.append(Deferred())
            return pending[-1]

        cron = self.service(job)
        cron.start()
        self.clock.advance(10)
        self.assertEqual(len(pending), 1)
        self.clock.advance(25)  # two intervals pass while the run is going
        self.assertEqual(len(pending), 1)
        pending[0].callback(None)
        self.clock.advance(5)  # next interval boundary
        self.assertEqual(len(pending), 2)

    def test_stop_waits_for_the_run_in_progress(self):
        pending = []
        cron = self.service(lambda: pending.append(Deferred()) or pending[-1])
        cron.start()
        self.clock.advance(10)
        stopped = cron.stop()
        self.assertNoResult(stopped)
        pending[0].callback(None)
        self.successResultOf(stopped)
        self.clock.advance(100)
        self.assertEqual(len(pending), 1)

    def test_stop_before_start(self):
        cron = self.service(lambda: None)
        self.successResultOf(cron.stop())

    def test_cluster_decorator(self):
        cluster = Cluster(object.__new__(_Resource))

        @cluster.cron(seconds=60)
        def flush():
            pass

        self.assertEqual(cluster.cron_jobs, [CronSpec(flush, 60.0)])
        self.assertRaises(ValueError, cluster.cron, 0)


class _Resource:
    pass
