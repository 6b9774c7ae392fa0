"""
The master's view of a worker process, with a fake process transport (in
the style of Twisted's procmon tests): its control channel, its output,
its exit, and what the spawner tells it.
"""

import os
import signal
import socket

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from txcluster.cpus import Pinning, cpu_for, usable_cpus
from txcluster.master.dispatch import WorkerChannel
from txcluster.master.process import WorkerProcessProtocol, WorkerSpawner
from txcluster.master.supervisor import ExitInfo
from txcluster.settings import KERNEL, REUSEPORT, ROUND_ROBIN, Settings
from txcluster.wire import (
    CONNECTIONS_FD, CONTROL_FROM_WORKER, CONTROL_TO_WORKER, ExitStatus, WorkerStats,
)
from txcluster.worker.control import WorkerSide
from txcluster.worker.locality import Locality


class FakeProcessTransport:
    """What spawnProcess gives a ProcessProtocol, as far as ours uses it."""

    pid = 4242

    def __init__(self):
        self.to_child = {}
        self.closed_fds = []
        self.stdin_closed = False
        self.signals = []
        self.exited = False

    def closeStdin(self):
        self.stdin_closed = True

    def writeToChild(self, fd, data):
        self.to_child[fd] = self.to_child.get(fd, b"") + data

    def closeChildFD(self, fd):
        self.closed_fds.append(fd)

    def signalProcess(self, signum):
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(signum)


class RecordingWorker:
    """The supervisor's L{Worker}, as far as the protocol calls it."""

    id = 3

    def __init__(self):
        self.events = []

    def ready(self):
        self.events.append("ready")

    def heartbeat(self, stats=None):
        self.events.append("heartbeat" if stats is None else ("heartbeat", stats))

    def leaving(self):
        self.events.append("leaving")

    def failed(self, status, summary, details):
        self.events.append(("failed", status, summary, details))

    def exited(self, info):
        self.events.append(info)


class WorkerEnd:
    """The worker's end of the control channel, fed what the master wrote."""

    def __init__(self, transport):
        self.cron_started = 0
        self.counts = []
        self.side = WorkerSide(on_start_cron=self._cron, on_master_lost=lambda: None,
                               on_count=self.counts.append)
        self._transport = transport
        self._fed = 0

    def _cron(self):
        self.cron_started += 1

    def pump(self):
        data = self._transport.to_child.get(CONTROL_TO_WORKER, b"")
        self.side.dataReceived(data[self._fed:])
        self._fed = len(data)


class ProcessProtocolTests(unittest.TestCase):
    def setUp(self):
        self.worker = RecordingWorker()
        self.protocol = WorkerProcessProtocol(self.worker)
        self.transport = FakeProcessTransport()
        self.protocol.makeConnection(self.transport)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def from_worker(self, *commands):
        """Send what a worker's control channel would, as raw bytes."""
        side = WorkerSide(lambda: None, lambda: None, lambda count: None)
        side.makeConnection(StringTransport())
        for command in commands:
            command(side)
        self.protocol.childDataReceived(CONTROL_FROM_WORKER, side.transport.value())

    def test_connection_made_takes_the_pid_and_closes_stdin(self):
        self.assertEqual(self.protocol.pid, 4242)
        self.assertTrue(self.transport.stdin_closed)

    def test_control_messages_reach_the_worker(self):
        stats = WorkerStats(requests=7, connections=2, by_code={200: 6, 404: 1},
                            durations=(5, 2), duration_sum=0.125)
        self.from_worker(WorkerSide.report_ready, WorkerSide.heartbeat,
                         lambda side: side.heartbeat(stats))
        self.assertEqual(self.worker.events, ["ready", "heartbeat", ("heartbeat", stats)])

    def test_a_start_failure_reaches_the_worker(self):
        self.from_worker(lambda side: side.report_failure(4, "cannot load app x:y: ImportError: x",
                                                          "Traceback...\nImportError: x\n"))
        self.assertEqual(self.worker.events, [
            ("failed", 4, "cannot load app x:y: ImportError: x", "Traceback...\nImportError: x\n")])

    def test_stopping_is_answered_after_the_worker_leaves_the_rotation(self):
        worker_end = WorkerEnd(self.transport)
        worker_end.side.makeConnection(_Collecting(self.protocol))
        answered = worker_end.side.report_stopping(Clock())
        self.assertEqual(self.worker.events, ["leaving"])
        worker_end.pump()
        self.successResultOf(answered)  # the master answered

    def test_cron_and_count_reach_the_worker(self):
        worker_end = WorkerEnd(self.transport)
        self.protocol.start_cron()
        self.protocol.tell_count(5)
        worker_end.pump()
        self.assertEqual((worker_end.cron_started, worker_end.counts), (1, [5]))

    def test_output_is_logged_line_by_line_under_the_worker_id(self):
        self.protocol.childDataReceived(1, b"hello\npart")
        self.protocol.childDataReceived(2, b"boom\n")
        self.protocol.childDataReceived(1, b"ial\n")
        lines = [(e["line"], e["log_system"], e["log_level"]) for e in self.events if "line" in e]
        self.assertEqual(lines, [("hello", "worker 3", LogLevel.info),
                                 ("boom", "worker 3", LogLevel.error),
                                 ("partial", "worker 3", LogLevel.info)])
        self.assertEqual(self.protocol.output_tail(), ["hello", "boom", "partial"])

    def test_exit_status_and_signal_reach_the_worker(self):
        self.protocol.childDataReceived(1, b"no newline at the end")
        self.protocol.processEnded(Failure(ProcessTerminated(exitCode=4)))
        self.assertEqual(self.worker.events, [ExitInfo(status=4)])
        self.assertEqual(self.protocol.output_tail(), ["no newline at the end"])
        other = RecordingWorker()
        killed = WorkerProcessProtocol(other)
        killed.makeConnection(FakeProcessTransport())
        killed.processEnded(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        self.assertEqual(other.events, [ExitInfo(signal=signal.SIGKILL)])

    def test_exit_releases_then_closes_the_connection_channel(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        channel = WorkerChannel(ours)
        released = []
        protocol = WorkerProcessProtocol(
            RecordingWorker(), channel,
            release_channel=lambda c: released.append((c, c.socket.fileno() != -1)))
        protocol.makeConnection(FakeProcessTransport())
        protocol.processEnded(Failure(ProcessDone(None)))
        self.assertEqual(released, [(channel, True)])
        self.assertEqual(ours.fileno(), -1)

    def test_a_worker_that_sends_garbage_gets_its_control_pipe_closed(self):
        # AMP drops a connection whose key is over 255 bytes: over a child's
        # pipe, ChildPipeTransport.loseConnection closes the master's end
        self.protocol.childDataReceived(CONTROL_FROM_WORKER, b"\x01\x00" + b"k" * 256)
        self.assertEqual(self.transport.closed_fds, [CONTROL_TO_WORKER])

    def test_a_signal_to_a_process_that_exited_is_ignored(self):
        self.protocol.signal(signal.SIGTERM)
        self.transport.exited = True
        self.protocol.signal(signal.SIGKILL)
        self.assertEqual(self.transport.signals, [signal.SIGTERM])


class _Collecting:
    """A transport that delivers a worker's writes to the master's protocol."""

    def __init__(self, protocol):
        self._protocol = protocol

    def write(self, data):
        self._protocol.childDataReceived(CONTROL_FROM_WORKER, data)

    def writeSequence(self, data):
        self.write(b"".join(data))

    def getPeer(self):
        return None

    def getHost(self):
        return None


class ExitInfoTests(unittest.TestCase):
    def test_each_exit_status_says_what_it_means(self):
        self.assertEqual(str(ExitInfo(status=ExitStatus.APP_LOAD_ERROR)),
                         "exited with status 4 (could not load the app)")
        self.assertEqual(str(ExitInfo(status=ExitStatus.BOOT_ERROR)),
                         "exited with status 3 (failed to boot)")
        self.assertEqual(str(ExitInfo(status=0)), "exited with status 0")
        self.assertEqual(str(ExitInfo(status=1)), "exited with status 1")
        self.assertEqual(str(ExitInfo(signal=9)), "exited on signal 9 (SIGKILL)")


class Sockets:
    """L{Listeners} for the spawner, without sockets."""

    def __init__(self, steers=True):
        self._steers = steers

    def fileno(self, worker_id):
        return -1

    def steers(self, worker_id):
        return self._steers

    def release(self, worker_id):
        pass


class SpawnerEnvironmentTests(unittest.TestCase):
    def test_worker_environment_names_the_worker_and_carries_the_settings(self):
        settings = Settings(workers=3, app="tests.apps:hello")
        environ = WorkerSpawner(Clock(), settings, Sockets(),
                                environ={"KEEP": "me"}).environment(2, 3).to_environ({"KEEP": "me"})
        self.assertEqual((environ["TXCLUSTER_WORKER_ID"], environ["TXCLUSTER_WORKERS"],
                          environ["KEEP"], environ["TXCLUSTER_MASTER_PID"]),
                         ("2", "3", "me", str(os.getpid())))
        self.assertIn('"app": "tests.apps:hello"', environ["TXCLUSTER_SETTINGS"])

    def test_master_passes_each_worker_its_cpu_and_the_served_ones(self):
        cpus = usable_cpus()
        pinning = Pinning(cpus)
        expected = Locality(cpu_for(2, cpus), tuple(cpus), workers=2)
        for balance in (ROUND_ROBIN, REUSEPORT):
            settings = Settings(cpu_affinity=True, balance=balance)
            environment = WorkerSpawner(Clock(), settings, Sockets(), pinning).environment(2, 2)
            self.assertEqual(Locality.of_worker(environment, affinity=lambda: [expected.home]),
                             expected, balance)
        for settings, pinned in ((Settings(), None),
                                 (Settings(cpu_affinity=True, balance=KERNEL), pinning)):
            environment = WorkerSpawner(Clock(), settings, Sockets(), pinned).environment(2, 2)
            self.assertIsNone(environment.home_cpu)
        # reuseport, where the kernel does not steer this worker's connections
        unsteered = WorkerSpawner(Clock(), Settings(cpu_affinity=True, balance=REUSEPORT),
                                  Sockets(steers=False), pinning)
        self.assertIsNone(unsteered.environment(2, 2).home_cpu)


class SpawningReactor:
    """spawnProcess, as far as the spawner uses it: the protocol connects to
    a fake process at once, as with a real reactor."""

    def __init__(self, fails=False):
        self.spawned = []
        self._fails = fails

    def spawnProcess(self, protocol, executable, args, env, path, childFDs):
        self.spawned.append((protocol, protocol.channel, childFDs))
        if self._fails:
            raise OSError("EAGAIN")
        protocol.makeConnection(FakeProcessTransport())


class RecordingDispatcher:
    """The spawner's view of the round-robin dispatcher."""

    def __init__(self):
        self.watched = []
        self.unwatched = []

    def watch(self, channel):
        self.watched.append(channel)

    def unwatch(self, channel):
        self.unwatched.append(channel)

    def release(self, channel):
        self.unwatch(channel)

    def takes_back(self):
        return True


class NotPinning(WorkerSpawner):
    """A spawner that records whom it would pin (the fake pid is no child)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pinned = []

    def _pin(self, pid, worker_id):
        self.pinned.append((pid, worker_id))


class SpawnerChannelTests(unittest.TestCase):
    """Round-robin: each process protocol is built with its connection channel."""

    def spawn(self, reactor, pinning=None):
        dispatcher = RecordingDispatcher()
        spawner = NotPinning(reactor, Settings(balance=ROUND_ROBIN), Sockets(), pinning,
                             environ={}, dispatcher=dispatcher)
        return spawner, dispatcher

    def test_the_protocol_has_its_channel_before_the_process_starts(self):
        reactor = SpawningReactor()
        spawner, dispatcher = self.spawn(reactor)
        protocol = spawner(RecordingWorker(), 1)
        [(spawned, channel, child_fds)] = reactor.spawned
        self.assertIs(spawned, protocol)
        self.assertIsInstance(channel, WorkerChannel)
        self.assertIs(protocol.channel, channel)
        self.assertIsNone(channel.cpu)
        self.assertFalse(channel.socket.getblocking())
        self.assertIn(CONNECTIONS_FD, child_fds)
        self.assertEqual(dispatcher.watched, [channel])
        self.assertEqual(spawner.pinned, [])
        protocol.processEnded(Failure(ProcessDone(None)))
        self.assertEqual(dispatcher.unwatched, [channel])
        self.assertEqual(channel.socket.fileno(), -1)

    def test_a_pinned_workers_channel_names_its_cpu(self):
        pinning = Pinning(usable_cpus())
        spawner, dispatcher = self.spawn(SpawningReactor(), pinning)
        protocol = spawner(RecordingWorker(), 1)
        can_pin = hasattr(os, "sched_setaffinity")  # not on macOS
        self.assertEqual(protocol.channel.cpu,
                         pinning.cpu_of(RecordingWorker.id) if can_pin else None)
        self.assertEqual(spawner.pinned, [(FakeProcessTransport.pid, RecordingWorker.id)])
        self.addCleanup(protocol.channel.socket.close)

    def test_a_spawn_that_fails_closes_the_channel(self):
        reactor = SpawningReactor(fails=True)
        spawner, dispatcher = self.spawn(reactor)
        self.assertRaises(OSError, spawner, RecordingWorker(), 1)
        [(_, channel, _)] = reactor.spawned
        self.assertEqual(channel.socket.fileno(), -1)
        self.assertEqual(dispatcher.watched, [])
