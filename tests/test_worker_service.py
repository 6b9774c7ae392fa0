"""A worker's start and stop sequence, with a fake clock and a fake port."""

import os

from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from txcluster.app import Cluster, WorkerInfo
from txcluster.settings import Settings
from txcluster.wire import ExitStatus
from txcluster.worker.locality import Locality
from txcluster.worker.service import WorkerService


class FakePort:
    def __init__(self, events):
        self.events = events

    def stopListening(self):
        self.events.append("stop listening")
        return succeed(None)


class WorkerServiceTests(unittest.TestCase):
    def make(self, cluster, locality=None, **settings):
        self.events = []
        self.clock = Clock()

        def listen(site):
            self.events.append("listen")
            self.site = site
            return FakePort(self.events)

        service = WorkerService(
            self.clock, Settings(**settings), WorkerInfo(id=1, count=2, pid=99), listen,
            on_ready=lambda: self.events.append("ready"), load=lambda spec: cluster,
            locality=locality,
        )
        return service

    def test_order(self):
        cluster = Cluster(Klein())
        cron_runs = []

        @cluster.on_startup
        async def connect():
            self.events.append(f"startup as worker {cluster.worker.id}")

        @cluster.on_shutdown
        def disconnect():
            self.events.append("shutdown hook")

        @cluster.cron(seconds=5)
        def job():
            cron_runs.append(self.clock.seconds())

        service = self.make(cluster)
        service.startService()
        self.assertEqual(self.events, ["startup as worker 1", "listen", "ready"])
        service.start_cron()
        self.clock.advance(5)
        self.assertEqual(cron_runs, [5])
        self.successResultOf(service.stopService())
        self.assertEqual(self.events[3:], ["stop listening", "shutdown hook"])
        self.clock.advance(50)
        self.assertEqual(cron_runs, [5])

    def test_scaling_tells_the_site_which_cpus_have_a_worker(self):
        service = self.make(Cluster(Klein()), locality=Locality(home=0, cpus=(0, 1), workers=2))
        self.patch(os, "environ", dict(os.environ))  # set_count exports the count
        service.startService()
        self.assertEqual(self.site.locality.served, {0, 1})
        service.set_count(1)
        self.assertEqual(self.site.locality.served, {0})
        self.assertEqual(service.info.count, 1)

    def test_failing_startup_hook_is_a_boot_error(self):
        cluster = Cluster(Klein())

        @cluster.on_startup
        def broken():
            raise RuntimeError("no database")

        service = self.make(cluster)
        service.startService()
        self.failureResultOf(service.started, RuntimeError)
        self.assertEqual(service.exit_status, ExitStatus.BOOT_ERROR)
        self.assertNotIn("listen", self.events)
        self.flushLoggedErrors(RuntimeError)

    def test_app_load_error(self):
        service = WorkerService(Clock(), Settings(app="no_such_mod:app"),
                                WorkerInfo(1, 1, 1), listen=lambda site: None)
        service.startService()
        self.failureResultOf(service.started, ImportError)
        self.assertEqual(service.exit_status, ExitStatus.APP_LOAD_ERROR)
        self.flushLoggedErrors(ImportError)

    def test_drain_deadline_aborts_connections(self):
        service = self.make(Cluster(Klein()), shutdown_timeout=3)
        service.startService()
        waiting = Deferred()
        self.site.drain = lambda hand_back=None: waiting
        aborted = []
        self.site.abort = lambda: aborted.append(True)
        stopped = service.stopService()
        self.clock.advance(2.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.successResultOf(stopped)
        self.assertEqual(aborted, [True])

    def test_hurry_cuts_a_drain_under_way_short(self):
        service = self.make(Cluster(Klein()), shutdown_timeout=30)
        service.startService()
        self.site.drain = lambda hand_back=None: Deferred()
        aborted = []
        self.site.abort = lambda: aborted.append(True)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        service.hurry()  # SIGQUIT after SIGTERM
        self.successResultOf(stopped)
        self.assertEqual(aborted, [True])
