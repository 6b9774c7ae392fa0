"""The master's notifications to systemd, through a fake send and a fake
clock; and once through a real AF_UNIX datagram socket."""

import os
import socket
import tempfile

from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from txcluster.master.systemd import Systemd, watchdog_interval


class NotifyTests(unittest.TestCase):
    def make(self, **environ):
        self.sent = []
        self.clock = Clock()
        return Systemd(self.clock, environ, send=lambda address, m: self.sent.append(m),
                       monotonic=lambda: 12.5, pid=lambda: 42)

    def test_nothing_outside_systemd(self):
        systemd = self.make()
        systemd.ready("ok")
        systemd.start_watchdog()
        self.assertEqual(self.sent, [])

    def test_reload_is_reloading_with_the_monotonic_time_then_ready(self):
        systemd = self.make(NOTIFY_SOCKET="/run/notify")
        systemd.reloading()
        systemd.ready("2 workers")
        self.assertEqual(self.sent, [b"RELOADING=1\nMONOTONIC_USEC=12500000",
                                     b"READY=1\nSTATUS=2 workers"])

    def test_watchdog_pings_at_half_the_interval(self):
        systemd = self.make(NOTIFY_SOCKET="/run/notify", WATCHDOG_USEC="4000000")
        systemd.start_watchdog()
        self.clock.pump([1.0] * 4)
        self.assertEqual(self.sent, [b"WATCHDOG=1"] * 3)  # at 0, 2 and 4 s

    def test_watchdog_is_for_the_pid_it_names(self):
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "1000000"}, 42), 0.5)
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "42"},
                                           42), 0.5)
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "7"},
                                            42))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "x"}, 42))
        self.assertIsNone(watchdog_interval({}, 42))

    def notify_warnings(self) -> list:
        """The log lines about NOTIFY_SOCKET from now on, formatted."""
        warnings = []

        def observer(event):
            if "NOTIFY_SOCKET" in str(event.get("log_format")):
                warnings.append(formatEvent(event))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return warnings

    def test_an_unreachable_socket_is_one_warning_and_no_error(self):
        warnings = self.notify_warnings()
        systemd = Systemd(Clock(), {"NOTIFY_SOCKET": "/nonexistent/notify"})
        systemd.ready("ok")
        systemd.stopping()
        self.assertEqual(len(warnings), 1)

    def test_an_address_that_is_not_even_a_path_is_one_warning_and_no_error(self):
        warnings = self.notify_warnings()
        # A lone surrogate: sendto raises UnicodeEncodeError, a ValueError,
        # not an OSError.
        systemd = Systemd(Clock(), {"NOTIFY_SOCKET": "/run/\ud800notify"})
        systemd.ready("ok")
        systemd.reloading()
        self.assertEqual(len(warnings), 1)
        self.assertIn("surrogates not allowed", warnings[0])


class RealSocketTests(unittest.TestCase):
    def test_a_datagram_socket_receives_each_state(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, directory)
        path = os.path.join(directory, "notify")
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(path)
        self.addCleanup(os.unlink, path)
        self.addCleanup(receiver.close)
        receiver.settimeout(5)
        systemd = Systemd(Clock(), {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
        systemd.ready("ready")
        systemd.reloading()
        systemd.start_watchdog()
        systemd.stop_watchdog()
        received = [receiver.recv(1024) for _ in range(3)]
        self.assertEqual(received[0], b"READY=1\nSTATUS=ready")
        self.assertTrue(received[1].startswith(b"RELOADING=1\nMONOTONIC_USEC="))
        self.assertEqual(received[2], b"WATCHDOG=1")
