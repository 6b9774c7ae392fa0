"""
A worker process's life (L{WorkerProcess}), driven on a memory reactor:
ready and heartbeats on the control channel, leaving the rotation before
draining, and exiting by itself when its master is gone.
"""

from klein import Klein
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from txcluster.app import Cluster
from txcluster.master.channel import MasterSide
from txcluster.settings import Settings
from txcluster.wire import ExitStatus, WorkerEnvironment, heartbeat_interval
from txcluster.worker.main import ORPHAN_DRAIN_SECONDS, ORPHAN_EXIT_SECONDS, WorkerProcess

MASTER_PID = 1234


class FakePort:
    def __init__(self):
        self.stopped = False

    def stopListening(self):
        self.stopped = True
        return succeed(None)


class WorkerProcessTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.exits = []
        self.parent = MASTER_PID
        self.port = FakePort()
        self.cluster = Cluster(Klein())
        self.worker = self.make()

    def make(self, load=None, timeout=5.0):
        environment = WorkerEnvironment(worker_id=2, count=3, master_pid=MASTER_PID,
                                        settings=Settings(timeout=timeout, shutdown_timeout=30))
        worker = WorkerProcess(
            self.reactor, environment,
            listen=lambda reactor, settings, site: self.port,
            load=load or (lambda spec: self.cluster),
            parent_pid=lambda: self.parent, exit_now=self.exits.append)
        self.heard = []
        self.master = MasterSide(on_ready=lambda: self.heard.append("Ready"),
                                 on_heartbeat=lambda stats: self.heard.append("Heartbeat"),
                                 on_stopping=lambda: self.heard.append("Stopping"),
                                 on_failed=lambda status, summary, details: self.heard.append(
                                     ("Failed", status, summary, details.splitlines()[-1])))
        self.to_master, self.to_worker = StringTransport(), StringTransport()
        worker.control.makeConnection(self.to_master)
        self.master.makeConnection(self.to_worker)
        return worker

    def pump(self):
        """Deliver what each end of the control channel wrote to the other."""
        while self.to_master.value() or self.to_worker.value():
            for transport, receiver in ((self.to_master, self.master),
                                        (self.to_worker, self.worker.control)):
                data = transport.value()
                transport.clear()
                receiver.dataReceived(data)

    def commands(self):
        """The AMP commands the master has heard from the worker, in order."""
        self.pump()
        return self.heard

    def test_start_serves_and_reports_ready_then_beats(self):
        self.worker.start()
        self.assertEqual(self.commands(), ["Heartbeat", "Ready"])
        self.assertEqual(self.cluster.worker.id, 2)
        self.reactor.advance(heartbeat_interval(5.0))
        self.assertEqual(self.commands()[-1], "Heartbeat")

    def test_heartbeats_carry_what_the_site_has_served(self):
        reported = []
        self.master._on_heartbeat = reported.append
        self.worker.start()
        self.worker.service.site.stats.record(200, 0.01)
        self.reactor.advance(heartbeat_interval(5.0))
        self.pump()
        self.assertEqual(reported[0], None)  # the first beat came before the site
        self.assertEqual(reported[-1].requests, 1)

    def test_a_failed_start_stops_the_reactor_with_its_exit_status(self):
        def broken(spec):
            raise ImportError("no module named nope")

        worker = self.make(load=broken)
        worker.start()
        self.assertFalse(self.reactor.running)
        self.assertEqual(worker.service.exit_status, ExitStatus.APP_LOAD_ERROR)
        summary = "cannot load app txcluster.demo:cluster: ImportError: no module named nope"
        self.assertEqual(self.commands(), [
            "Heartbeat", ("Failed", 4, summary, "ImportError: no module named nope")])

    def test_shutdown_leaves_the_rotation_before_it_drains(self):
        self.worker.start()
        stopped = self.worker.shutdown()
        self.assertFalse(self.port.stopped)  # not until the master has answered
        # Once it has: drain, then one last report of what was served.
        self.assertEqual(self.commands()[-2:], ["Stopping", "Heartbeat"])
        self.assertTrue(self.port.stopped)
        self.successResultOf(stopped)
        self.assertEqual(self.exits, [])

    def test_idle_connections_go_back_only_if_the_master_takes_them(self):
        self.worker.start()
        self.master._takes_back = lambda: True  # a rolling restart, not its shutdown
        self.worker.shutdown()
        self.pump()
        self.assertTrue(self.worker.service.may_hand_back)

    def test_shutdown_goes_on_if_the_master_never_answers(self):
        self.worker.start()
        stopped = self.worker.shutdown()
        self.reactor.advance(1.0)
        self.assertTrue(self.port.stopped)
        self.assertFalse(self.worker.service.may_hand_back)
        self.assertNoResult(stopped)  # its last counts are not answered either
        self.reactor.advance(1.0)
        self.successResultOf(stopped)

    def test_an_orphan_drains_briefly_and_exits_in_any_case(self):
        self.worker.start()
        self.worker.control.connectionLost(Failure(ConnectionDone()))  # EOF: the master is gone
        self.assertFalse(self.reactor.running)
        self.assertEqual(self.worker.service.drain_seconds, ORPHAN_DRAIN_SECONDS)
        self.reactor.advance(ORPHAN_EXIT_SECONDS)
        self.assertEqual(self.exits, [ExitStatus.OK])

    def test_sigterm_because_the_master_died_is_an_orphan_too(self):
        self.worker.start()
        self.parent = 1  # re-parented: PR_SET_PDEATHSIG sent the SIGTERM
        self.worker.shutdown()
        self.assertEqual(self.worker.service.drain_seconds, ORPHAN_DRAIN_SECONDS)
        self.reactor.advance(ORPHAN_EXIT_SECONDS)
        self.assertEqual(self.exits, [ExitStatus.OK])

    def test_the_master_can_scale_and_hand_over_cron(self):
        runs = []
        self.cluster.cron(seconds=1)(lambda: runs.append(1))
        self.worker.start()
        self.master.tell_count(5)
        self.master.start_cron()
        self.pump()
        self.assertEqual(self.cluster.worker.count, 5)
        self.reactor.advance(1)
        self.assertEqual(runs, [1])
