"""Cron jobs on a fake clock: timing, failures, no overlap, stopping."""

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
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


    def test_a_job_takes_no_argument_or_its_lease(self):
        cluster = Cluster(object.__new__(_Resource))

        with self.assertRaises(ValueError) as raised:
            cluster.cron(seconds=1)(lambda a, b: None)
        self.assertIn("at most one argument (its lease), not 2", str(raised.exception))

        async def job():
            pass

        with self.assertRaises(ValueError) as raised:
            cluster.cron(seconds=1, thread=True)(job)
        self.assertIn("job is async def", str(raised.exception))
        self.assertTrue(CronSpec(lambda lease, other=1: None, 1).takes_lease)
        self.assertFalse(CronSpec(lambda: None, 1).takes_lease)
        self.assertFalse(CronSpec(print, 1).takes_lease)


class FakeGuard:
    """Runs the job with "the lease", or answers C{retry_in}; records calls."""

    def __init__(self, clock):
        self.clock = clock
        self.calls = []
        self.retry_in = None

    def __call__(self, spec, run):
        self.calls.append(self.clock.seconds())
        if self.retry_in is not None:
            return succeed(self.retry_in)
        return run("the lease").addCallback(lambda _: None)

    def release(self):
        self.calls.append("released")
        return succeed(None)


class GuardedTests(unittest.TestCase):
    """What the guard decides: the lease the job gets, when it runs next,
    and what is released on stop."""

    def setUp(self):
        self.clock = Clock()
        self.guard = FakeGuard(self.clock)

    def test_the_job_receives_the_lease_if_it_takes_one_argument(self):
        leases = []
        cron = CronService([CronSpec(leases.append, 10)], self.clock, guard=self.guard)
        cron.start()
        self.clock.advance(10)
        self.assertEqual(leases, ["the lease"])
        unguarded = CronService([CronSpec(leases.append, 10)], self.clock)
        unguarded.start()
        self.clock.advance(10)
        self.assertEqual(leases, ["the lease", "the lease", None])

    def test_a_guard_may_ask_for_an_earlier_attempt_and_the_grid_follows_it(self):
        cron = CronService([CronSpec(lambda: None, 10)], self.clock, guard=self.guard)
        cron.start()
        self.guard.retry_in = 3  # held elsewhere, the holder ticks in 3 s
        self.clock.advance(10)
        self.clock.advance(3)
        self.guard.retry_in = None  # taken: it runs, then every 10 s from here
        self.clock.advance(3)
        self.clock.advance(10)
        self.assertEqual(self.guard.calls, [10, 13, 16, 26])
        self.assertEqual(cron.jobs[0].runs, 2)

    def test_stop_releases_the_lease_after_the_run_in_progress(self):
        pending = Deferred()
        cron = CronService([CronSpec(lambda: pending, 10)], self.clock, guard=self.guard)
        cron.start()
        self.clock.advance(10)
        stopped = cron.stop()
        self.assertEqual(self.guard.calls, [10])
        pending.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.guard.calls, [10, "released"])

    def test_a_service_never_started_releases_nothing(self):
        cron = CronService([CronSpec(lambda: None, 10)], self.clock, guard=self.guard)
        self.successResultOf(cron.stop())
        self.assertEqual(self.guard.calls, [])


class BlockingTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.errors = []

        def observe(event):
            if event.get("log_namespace") == "txcluster.cron" and \
                    event["log_level"] == LogLevel.error:
                self.errors.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def test_a_job_that_blocks_the_reactor_is_an_error_naming_it_and_how_long(self):
        def report():
            self.clock.rightNow += 3  # as the reactor's clock reads after a blocking call

        cron = CronService([CronSpec(report, 1, lock=True)], self.clock)
        cron.start()
        self.clock.advance(1)
        [error] = self.errors
        self.assertIn("cron job " + report.__qualname__ + " blocked the reactor for 3.0s", error)
        self.assertIn("thread=True", error)

    def test_a_short_job_is_no_error(self):
        def report():
            self.clock.rightNow += 0.4

        cron = CronService([CronSpec(report, 1)], self.clock)
        cron.start()
        self.clock.advance(1)
        self.assertEqual(self.errors, [])

    def test_thread_jobs_run_through_the_thread_runner(self):
        threaded = []

        def in_thread(function, *args):
            threaded.append((function, args))
            return succeed(None)

        def report(lease):
            pass

        cron = CronService([CronSpec(report, 1, thread=True)], self.clock, in_thread=in_thread)
        cron.start()
        self.clock.advance(1)
        self.assertEqual(threaded, [(report, (None,))])


class _Resource:
    pass
