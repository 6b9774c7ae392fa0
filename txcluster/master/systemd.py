"""
Talking to systemd (C{sd_notify}): C{READY=1} once every worker is ready,
C{RELOADING=1} and C{READY=1} around a rolling restart
(C{Type=notify-reload}), C{STOPPING=1}, and C{WATCHDOG=1} pings
(C{WatchdogSec=}).

Outside systemd (no C{NOTIFY_SOCKET}) every call is a no-op; a socket that
cannot be reached is one warning line, and the cluster runs on.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Mapping, Optional

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger(namespace="txcluster.master")


def _send(address: str, message: bytes) -> None:
    if address.startswith("@"):  # Linux's abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message, address)


def watchdog_interval(environ: Mapping[str, str], pid: int) -> Optional[float]:
    """Seconds between C{WATCHDOG=1} pings: half of C{WATCHDOG_USEC}, if
    it is set for this process (C{WATCHDOG_PID} unset, or ours)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    owner = environ.get("WATCHDOG_PID")
    if usec <= 0 or (owner and owner != str(pid)):
        return None
    return usec / 1e6 / 2


class Systemd:
    """The master's notifications to systemd."""

    def __init__(self, clock: Any, environ: Mapping[str, str] = os.environ,
                 send: Callable[[str, bytes], None] = _send,
                 monotonic: Callable[[], float] = time.monotonic,
                 pid: Callable[[], int] = os.getpid) -> None:
        self._clock = clock
        self._environ = environ
        self._send = send
        self._monotonic = monotonic
        self._pid = pid
        self._warned = False
        self._watchdog: Optional[LoopingCall] = None

    def notify(self, message: str) -> None:
        """Send C{message} (C{"READY=1"}, ...) if systemd listens."""
        address = self._environ.get("NOTIFY_SOCKET")
        if not address:
            return
        try:
            self._send(address, message.encode())
        except Exception as e:  # OSError; ValueError for an embedded NUL
            if not self._warned:  # once: the next would fail the same way
                self._warned = True
                log.warn("cannot notify systemd at NOTIFY_SOCKET={address!r}: {error}; "
                         "going on without", address=address,
                         error=getattr(e, "strerror", None) or e)
        else:
            self._warned = False

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}")

    def reloading(self) -> None:
        """Type=notify-reload: a rolling restart begins (READY=1 ends it)."""
        usec = int(self._monotonic() * 1_000_000)
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def start_watchdog(self) -> None:
        """Ping at half C{WatchdogSec=} while the reactor runs, if asked to."""
        interval = watchdog_interval(self._environ, self._pid())
        if interval is None or self._watchdog is not None:
            return
        self._watchdog = LoopingCall(self.notify, "WATCHDOG=1")
        self._watchdog.clock = self._clock
        self._watchdog.start(interval, now=True)

    def stop_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
