"""
The master service's own policy, with fake worker processes, a memory
reactor and a fake systemd: logrotate's SIGUSR1 reaches workers that were
still starting, the signals it has no use for, and what systemd hears
when rolling restarts overlap.
"""

import signal

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from txcluster.master.service import (
    MasterService, harmless_signals, signal_name,
)
from txcluster.master.supervisor import ExitInfo
from txcluster.master.systemd import Systemd
from txcluster.settings import Settings

from .test_master_supervisor import FakeProcess

#: What the master uses itself: never made harmless.
USED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
        signal.SIGTTIN, signal.SIGTTOU)


class FakeListening:
    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 8080)


class FakeListeners:
    listening = FakeListening()


class Harness:
    """A master with N fake workers, none of them ready yet."""

    def __init__(self, workers=2):
        self.reactor = MemoryReactorClock()
        self.spawned = []
        self.notified = []
        systemd = Systemd(self.reactor, {"NOTIFY_SOCKET": "/run/notify"},
                          send=lambda address, message: self.notified.append(message.decode()),
                          monotonic=lambda: 7.0)

        def spawn(worker, count):
            process = FakeProcess(worker, count)
            self.spawned.append(process)
            return process

        self.master = MasterService(self.reactor, Settings(workers=workers), FakeListeners(),
                                    spawn, systemd=systemd)
        self.supervisor = self.master.supervisor
        self.supervisor.start()

    def worker(self, index):
        return self.spawned[index].worker

    def states(self):
        """What systemd heard, without the STATUS= lines."""
        return [message.split("\n")[0] for message in self.notified]


class ReopenLogsTests(unittest.TestCase):
    def test_a_ready_worker_is_told_at_once(self):
        h = Harness()
        h.worker(0).ready()
        h.worker(1).ready()
        h.master.reopen_logs()
        self.assertEqual([p.signals for p in h.spawned], [[signal.SIGUSR1]] * 2)

    def test_a_worker_starting_during_a_reopen_is_told_once_it_is_ready(self):
        h = Harness()
        h.worker(0).ready()
        h.master.reopen_logs()
        h.master.reopen_logs()  # twice while it starts: told once
        self.assertEqual(h.spawned[1].signals, [])  # its default action would kill it
        h.worker(1).ready()
        self.assertEqual(h.spawned[1].signals, [signal.SIGUSR1])
        self.assertEqual(h.spawned[0].signals, [signal.SIGUSR1] * 2)
        h.master.reopen_logs()  # a later one reaches it like any ready worker
        self.assertEqual(h.spawned[1].signals, [signal.SIGUSR1] * 2)

    def test_a_worker_started_after_the_reopen_is_not_told(self):
        h = Harness(workers=1)
        h.worker(0).ready()
        h.master.reopen_logs()
        h.reactor.advance(h.supervisor.policy.fast_crash_seconds)  # not a crash loop
        h.worker(0).exited(ExitInfo(signal=signal.SIGKILL))
        h.reactor.advance(h.supervisor.policy.max_delay)  # respawned
        respawned = h.spawned[-1]
        self.assertIsNot(respawned, h.spawned[0])
        respawned.worker.ready()
        self.assertEqual(respawned.signals, [])

    def test_a_worker_that_dies_before_it_is_ready_is_forgotten(self):
        h = Harness(workers=1)
        starting = h.worker(0)
        h.master.reopen_logs()
        starting.exited(ExitInfo(status=4))  # no unhandled WorkerDied either
        self.assertEqual(h.spawned[0].signals, [])
        self.assertEqual(h.master._reopen_once_ready, set())


class HarmlessSignalTests(unittest.TestCase):
    def test_every_signal_that_would_end_the_master_but_a_fault(self):
        harmless = set(harmless_signals(USED))
        for signum in (signal.SIGUSR2, signal.SIGALRM, signal.SIGPIPE, signal.SIGVTALRM,
                       signal.SIGPROF, signal.SIGXCPU, signal.SIGIO, signal.SIGPWR,
                       signal.SIGRTMIN, signal.SIGRTMIN + 1, signal.SIGRTMAX):
            self.assertIn(signum, harmless, signal_name(signum))
        for signum in (*USED, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL,
                       signal.SIGABRT, signal.SIGTRAP, signal.SIGSYS, signal.SIGKILL,
                       signal.SIGSTOP, signal.SIGCHLD, signal.SIGWINCH, signal.SIGCONT):
            self.assertNotIn(signum, harmless, signal_name(signum))

    def test_every_one_may_have_a_handler(self):
        for signum in harmless_signals(USED):
            previous = signal.signal(signum, lambda n, frame: None)
            signal.signal(signum, previous)

    def test_names(self):
        self.assertEqual(signal_name(signal.SIGALRM), "SIGALRM")
        self.assertEqual(signal_name(signal.SIGRTMIN + 1), "SIGRTMIN+1")
        self.assertEqual(signal_name(signal.SIGRTMAX), "SIGRTMAX")

    def test_each_is_logged_the_first_time_it_arrives(self):
        lines = []
        observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        master = Harness().master
        for signum in (signal.SIGALRM, signal.SIGALRM, signal.SIGRTMIN + 2):
            master.ignored(signum)
        self.assertEqual([line.split(":")[0] for line in lines if "ignored" in line],
                         ["ignored SIGALRM", "ignored SIGRTMIN+2"])


class ReloadNotificationTests(unittest.TestCase):
    def ready_all(self, h):
        for process in list(h.spawned):
            process.worker.ready()

    def finish_rolling_restart(self, h):
        """Each successor ready, each old process gone, in turn."""
        for worker_id in sorted(h.supervisor.slots):
            old = h.supervisor.slots[worker_id]
            h.spawned[-1].worker.ready()
            old.exited(ExitInfo(status=0))

    def test_one_reload(self):
        h = Harness()
        self.ready_all(h)
        done = h.master.reload()
        self.assertEqual(h.states(), ["READY=1", "RELOADING=1"])
        self.assertEqual(h.notified[1], "RELOADING=1\nMONOTONIC_USEC=7000000")
        self.finish_rolling_restart(h)
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(h.states(), ["READY=1", "RELOADING=1", "READY=1"])

    def test_a_reload_during_a_reload_is_reloading_too_and_ready_when_it_ends(self):
        h = Harness()
        self.ready_all(h)
        first = h.master.reload()
        second = h.master.reload()  # SIGHUP again, or txcluster reload
        self.assertEqual(h.states(), ["READY=1", "RELOADING=1", "RELOADING=1"])
        self.assertNoResult(second)
        self.assertEqual(len(h.spawned), 3)  # one rolling restart, not two
        self.finish_rolling_restart(h)
        self.assertEqual(h.states(), ["READY=1", "RELOADING=1", "RELOADING=1", "READY=1"])
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)),
                         (None, None))
        h.master.reload()  # the next one starts again
        self.assertEqual(len(h.spawned), 5)

    def test_a_reload_that_fails_is_ready_too_and_says_why_to_each(self):
        h = Harness()
        self.ready_all(h)
        first, second = h.master.reload(), h.master.reload()
        h.spawned[-1].worker.exited(ExitInfo(status=4))
        self.assertEqual(h.states()[-1], "READY=1")
        why = self.successResultOf(first)
        self.assertIn("exited with status 4", why)
        self.assertEqual(self.successResultOf(second), why)

    def test_no_reload_while_stopping(self):
        h = Harness()
        self.ready_all(h)
        h.supervisor.stop()
        self.assertEqual(self.successResultOf(h.master.reload()), "the master is stopping")
        self.assertEqual(h.states(), ["READY=1"])
