"""What crosses the process boundary: the environment, the descriptors
passed in round-robin mode, and what exit statuses mean."""

import os
import socket

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial import unittest

from txcluster.settings import Settings
from txcluster.wire import (
    ACCEPT_BATCH, ExitStatus, Goodbye, QuietAMP, WorkerEnvironment, receive_connections,
    send_connections,
)


class EnvironmentTests(unittest.TestCase):
    def test_round_trip_keeps_the_inherited_environment(self):
        sent = WorkerEnvironment(worker_id=2, count=4, master_pid=77,
                                 settings=Settings(workers=4, app="tests.apps:hello"),
                                 home_cpu=1, cpus=(0, 1))
        environ = sent.to_environ({"HOME": "/home/x", "TXCLUSTER_WORKER_CPU": "9"})
        self.assertEqual(environ["HOME"], "/home/x")
        self.assertEqual((environ["TXCLUSTER_WORKER_ID"], environ["TXCLUSTER_WORKERS"]),
                         ("2", "4"))
        self.assertEqual(WorkerEnvironment.from_environ(environ), sent)

    def test_an_unpinned_worker_inherits_no_cpu_from_its_master(self):
        unpinned = WorkerEnvironment(worker_id=1, count=1, master_pid=77, settings=Settings())
        environ = unpinned.to_environ({"TXCLUSTER_WORKER_CPU": "9", "TXCLUSTER_WORKER_CPUS": "9"})
        self.assertEqual(WorkerEnvironment.from_environ(environ), unpinned)

    def test_what_systemd_gave_the_master_is_not_inherited(self):
        environ = WorkerEnvironment(worker_id=1, count=1, master_pid=77,
                                    settings=Settings()).to_environ({
            "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "77",
            "LISTEN_FDS": "1", "LISTEN_PID": "77", "LISTEN_FDNAMES": "http", "PATH": "/bin"})
        self.assertEqual({k for k in environ if not k.startswith("TXCLUSTER_")},
                         {"PATH", "PYTHONUNBUFFERED"})

    def test_not_started_by_a_master(self):
        self.assertRaises(KeyError, WorkerEnvironment.from_environ, {})


class ConnectionPassingTests(unittest.TestCase):
    def setUp(self):
        self.master_end, self.worker_end = socket.socketpair()
        self.addCleanup(self.master_end.close)
        self.addCleanup(self.worker_end.close)
        self.worker_end.setblocking(False)

    def test_descriptors_arrive_as_new_copies_of_the_same_sockets(self):
        originals = [socket.socket() for _ in range(3)]
        for s in originals:
            self.addCleanup(s.close)
        send_connections(self.master_end, [s.fileno() for s in originals])
        received = receive_connections(self.worker_end)
        self.assertEqual((received.closed, received.truncated), (False, False))
        self.assertEqual([os.fstat(fd).st_ino for fd in received.fds],
                         [os.fstat(s.fileno()).st_ino for s in originals])
        for fd in received.fds:
            os.close(fd)

    def test_nothing_to_read(self):
        self.assertRaises(BlockingIOError, receive_connections, self.worker_end)

    def test_the_master_closing_its_end_is_seen(self):
        self.master_end.close()
        self.assertEqual(receive_connections(self.worker_end), ([], True, False))

    def test_a_batch_fits_one_message(self):
        sockets = [socket.socket() for _ in range(ACCEPT_BATCH)]
        for s in sockets:
            self.addCleanup(s.close)
        send_connections(self.master_end, [s.fileno() for s in sockets])
        received = receive_connections(self.worker_end)
        self.assertEqual((len(received.fds), received.truncated), (ACCEPT_BATCH, False))
        for fd in received.fds:
            os.close(fd)


class QuietAMPTests(unittest.TestCase):
    """QuietAMP calls BinaryBoxProtocol's makeConnection and connectionLost,
    skipping AMP's: fine while AMP's only log, which this checks."""

    def connect_ask_lose(self, protocol):
        """What C{protocol} logged and held while connected, asking once."""
        logged = []
        globalLogPublisher.addObserver(logged.append)
        try:
            protocol.makeConnection(StringTransport())
            asked = protocol.callRemote(Goodbye, stats="{}")
            held = set(vars(protocol))
            protocol.connectionLost(Failure(ConnectionDone()))
        finally:
            globalLogPublisher.removeObserver(logged.append)
        self.failureResultOf(asked, ConnectionDone)  # the connection did its work
        return [formatEvent(event) for event in logged], held

    def test_amp_only_logs_before_binary_box_protocol_does_the_work(self):
        self.assertIn(amp.BinaryBoxProtocol, amp.AMP.__bases__)
        amp_logged, amp_held = self.connect_ask_lose(amp.AMP())
        quiet_logged, quiet_held = self.connect_ask_lose(QuietAMP())
        self.assertEqual([line.split(" (")[0] for line in amp_logged],
                         ["AMP connection established", "AMP connection lost"])
        self.assertEqual(quiet_logged, [])
        # what AMP's makeConnection keeps, it keeps for its log line
        self.assertEqual(amp_held ^ quiet_held, {"_transportPeer", "_transportHost"})


class ExitStatusTests(unittest.TestCase):
    def test_worker_statuses_have_a_meaning(self):
        self.assertEqual(ExitStatus.meaning(4), "could not load the app")
        self.assertEqual(ExitStatus.meaning(3), "failed to boot")
        self.assertIsNone(ExitStatus.meaning(1))  # an uncaught exception's, not ours
