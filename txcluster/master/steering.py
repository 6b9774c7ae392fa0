"""
C{--balance reuseport --cpu-affinity} (and so C{auto}): steer connections
by CPU only while that pays.

Steering hands each new connection to the worker on the CPU that received
it: no other process touches it, and the client and its worker share a
CPU's caches.  That is the fast path while clients are spread over the
CPUs.  When they are not (one client thread, which the scheduler moves
from CPU to CPU; a network card with one receive queue), one worker gets
most new connections, and the workers hand a large part of them on
through the master: hashing would spread them at no cost.  So every
L{CHECK_SECONDS} the guard looks at the share of new connections the
workers handed on; above L{HANDED_ON_LIMIT} in two checks in a row, it
stops steering (the sockets' CPU marks are cleared, and workers stop
sending clients that moved back to their CPU) for a while, and tries
again at the first busy check after that; each try that fails doubles
the wait, from L{FIRST_HOLD_SECONDS} up to L{LAST_HOLD_SECONDS}.  A quiet
second (fewer than L{ENOUGH_CONNECTIONS} new connections) decides
nothing, so an idle cluster logs nothing.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..ledger import BURST, RATE_WINDOW

log = Logger(namespace="txcluster.master")

CHECK_SECONDS = 1.0
#: Fewer new connections than this per serving worker in a check says
#: nothing: at that rate a worker has no slack (L{txcluster.ledger.BURST})
#: and hands on whatever puts it ahead of the least loaded, wherever the
#: kernel sent it, so its hand-offs say little of steering.
ENOUGH_PER_WORKER = round(BURST * CHECK_SECONDS / RATE_WINDOW)
HANDED_ON_LIMIT = 0.25
FIRST_HOLD_SECONDS = 10.0
LAST_HOLD_SECONDS = 600.0


class SteeringGuard(Service):
    """
    @param kept: how many connections the workers have kept in all (it may
        go down when a worker process is replaced: that check is skipped).
    @param handed_on: how many they have handed on to the master in all.
    @param serving: how many workers serve now.
    @param steer: turns steering on (True) or off.
    """

    def __init__(self, clock: Any, kept: Callable[[], int], handed_on: Callable[[], int],
                 serving: Callable[[], int], steer: Callable[[bool], None]) -> None:
        self._clock = clock
        self._kept = kept
        self._handed_on = handed_on
        self._serving = serving
        self._steer = steer
        self.steering = True
        self.hold = FIRST_HOLD_SECONDS
        #: when steering may be tried again (while it is off)
        self._try_at = 0.0
        #: busy checks in a row that handed on too much
        self._high = 0
        self._last = (kept(), handed_on())
        self._check = LoopingCall(self.check)
        self._check.clock = clock

    def startService(self) -> None:
        super().startService()
        self._last = (self._kept(), self._handed_on())
        self._check.start(CHECK_SECONDS, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._check.running:
            self._check.stop()

    def check(self) -> None:
        kept, handed_on = self._kept(), self._handed_on()
        new_kept, new_handed = kept - self._last[0], handed_on - self._last[1]
        self._last = (kept, handed_on)
        total = new_kept + new_handed
        enough = ENOUGH_PER_WORKER * max(1, self._serving())
        if new_kept < 0 or total < enough:  # a worker replaced, or no load
            self._high = 0
            return
        if not self.steering:
            if self._clock.seconds() >= self._try_at:
                log.info("steering connections by CPU again")
                self.steering = True
                self._steer(True)
            return
        share = new_handed / total
        if share <= HANDED_ON_LIMIT:
            self._high = 0
            self.hold = FIRST_HOLD_SECONDS  # it pays: the next failure starts afresh
            return
        self._high += 1
        if self._high < 2:
            return
        log.info("the workers handed on {share:.0%} of new connections: clients are not "
                 "spread over the CPUs; spreading connections by hash for {hold:.0f} s",
                 share=share, hold=self.hold)
        self.steering = False
        self._high = 0
        self._steer(False)
        self._try_at = self._clock.seconds() + self.hold
        self.hold = min(LAST_HOLD_SECONDS, self.hold * 2)
