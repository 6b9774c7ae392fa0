"""
Each worker's load, in memory the master and the workers share: what keeps
C{--balance reuseport} (and so the default, C{auto}) even.

There, each worker accepts on a socket of its own, and the kernel picks
the socket (by the CPU that received the connection, or by hash).  That
split is only as even as the clients are spread: a client that runs on
one CPU (a single-threaded proxy or load test, a script) would send every
connection to one worker, and so would a network card with one receive
queue.  So a worker keeps a new connection unless it is both busier
than the least loaded serving worker (more open connections, by half
again) and ahead of it in connections served by more than its slack
(L{keeps}); any other it hands to the master, which deals it to the least
loaded (L{least_loaded}).  For that each one must see the others' load at once,
without a message: hence shared memory, read with no system call.

A worker's load is its open connections, then what it has served in all:

- open connections first (with those the master sent it that it has not
  taken yet), because that is what a busy worker has more of, under
  keep-alive as with a new connection per request;
- served (kept, plus dealt to it) between equals, so that while the
  cluster is idle (a person, a test, a script) connections go round-robin.

Each worker process has a row of its own (not its id: during a rolling
restart two processes share an id), and each number one writer: a worker
sets its C{open} and adds to its C{kept} and C{received}; the master adds
to its C{dealt} and C{lifted} and sets which rows serve.  What the master
sent that a worker has not yet C{received} the master keeps a copy of,
so that it deals it again if that worker dies first.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import Dict, Iterable, List, NamedTuple, Optional

#: Rows: worker processes alive at once (twice the workers during a
#: rolling restart); a process without a row keeps what it accepts.
MAX_ROWS = 2048

#: How far ahead in connections served a worker may be before it hands
#: new ones on (L{served_slack}): at most this many...
MAX_SERVED_SLACK = 256
#: ...and one per this many it accepted in the last RATE_WINDOW seconds
#: beyond the first BURST: large under load, where the small, passing
#: unevenness of well spread clients should cost no hand-offs, and none
#: for a burst of long-lived connections (a pool, keep-alive clients
#: starting), whose split lasts as long as they do: there only the open
#: connections' half again (OPEN_SLACK_FRACTION) is allowed.
CONNECTIONS_PER_SLACK = 4
BURST = 32
RATE_WINDOW = 0.1

#: How many more open connections than the least loaded a worker may have
#: and still keep new ones: the least loaded's open connections over this,
#: half again (none while few are open).  Less would hand on a part of
#: every burst of well spread keep-alive clients (wrk's start, a pool)
#: to another CPU for good: measured, 0.15 cross-CPU wake-ups per request
#: instead of none.
OPEN_SLACK_FRACTION = 2


class Load(NamedTuple):
    """A worker's load, in the order it is compared."""

    open: int
    served: int


def served_slack(accepted_last_window: int, loads: Dict[int, "Load"]) -> int:
    """How far ahead in connections served a worker may be: 0 while the
    cluster has no more connections open than workers (one client at a
    time: round-robin exactly) or while the worker accepted no more than
    a L{BURST} in the last L{RATE_WINDOW}, else a quarter of the rest,
    but at most 8 per connection open beyond one per worker, and
    L{MAX_SERVED_SLACK}."""
    surplus = sum(load.open for load in loads.values()) - len(loads)
    beyond_burst = accepted_last_window - BURST
    if surplus <= 0 or beyond_burst <= 0:
        return 0
    return min(MAX_SERVED_SLACK, beyond_burst // CONNECTIONS_PER_SLACK, surplus * 8)


def least_loaded(loads: Dict[int, Load]) -> Optional[int]:
    """The row with the least load (the lowest row among equals)."""
    return min(loads, key=lambda i: (loads[i], i), default=None)


def keeps(loads: Dict[int, Load], me: int, slack: int) -> bool:
    """Should the worker of row C{me} keep a new connection, given every
    serving worker's load and its L{served_slack}?"""
    best = least_loaded(loads)
    if me not in loads or best is None or best == me:
        return True
    mine, least = loads[me], loads[best]
    served_ok = mine.served - min(load.served for load in loads.values()) <= slack
    if mine.open == least.open:
        return served_ok
    return served_ok or mine.open - least.open <= least.open // OPEN_SLACK_FRACTION


def share(loads: Dict[int, Load], me: int, n: int, slack: int) -> List[bool]:
    """Which of C{n} connections just accepted the worker of row C{me} keeps (True)
    and which it hands on; C{loads} is updated as the master will deal
    (each one handed on goes to the least loaded)."""
    kept = []
    for _ in range(n):
        keep = keeps(loads, me, slack)
        target = me if keep else least_loaded(loads)
        if target in loads:
            load = loads[target]
            loads[target] = Load(load.open + 1, load.served + 1)
        kept.append(keep)
    return kept


# Layout: int64 words.  Word 0: the highest row that serves; word 1: 1
# while the kernel steers connections by CPU (master-written).  Then, per
# row from 1: serving (0 or 1), open, kept, received (worker-written),
# dealt, lifted (master-written).
_HIGHEST, _STEERING, _HEADER = 0, 1, 2
_SERVING, _OPEN, _KEPT, _RECEIVED, _DEALT, _LIFTED = range(6)
_WORDS_PER_ROW = 6
_SIZE = (_HEADER + _WORDS_PER_ROW * MAX_ROWS) * 8


def _base(row: int) -> int:
    return _HEADER + _WORDS_PER_ROW * (row - 1)


class Ledger:
    """The shared numbers, mapped from the descriptor C{fd} (the caller
    owns C{fd}: L{create} makes one, a worker inherits it)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._map = mmap.mmap(fd, _SIZE)
        self._words = memoryview(self._map).cast("q")

    @classmethod
    def create(cls) -> "Ledger":
        """A new, zeroed ledger, in anonymous shared memory where the
        system has it (Linux's memfd), else in an unlinked temporary file."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("txcluster-ledger")
        else:  # pragma: no cover - not Linux
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        os.ftruncate(fd, _SIZE)
        return cls(fd)

    def fileno(self) -> int:
        return self._fd

    @staticmethod
    def has(row: int) -> bool:
        """Is C{row} one the ledger has room for?"""
        return 1 <= row <= MAX_ROWS

    def load(self, row: int) -> Load:
        words, base = self._words, _base(row)
        pending = words[base + _DEALT] - words[base + _RECEIVED]
        return Load(words[base + _OPEN] + max(0, pending),
                    words[base + _KEPT] + words[base + _DEALT] + words[base + _LIFTED])

    def loads(self) -> Dict[int, Load]:
        """Each serving row, with its load."""
        words = self._words
        return {row: self.load(row) for row in range(1, words[_HIGHEST] + 1)
                if words[_base(row) + _SERVING]}

    def kept(self, row: int) -> int:
        return self._words[_base(row) + _KEPT]

    def steering(self) -> bool:
        """Does the kernel steer connections by CPU now (the master's
        L{txcluster.master.steering.SteeringGuard} says)?"""
        return bool(self._words[_STEERING])

    def received(self, row: int) -> int:
        """How many connections the master sent it the process of C{row} has taken."""
        return self._words[_base(row) + _RECEIVED]

    # A worker's side ----------------------------------------------------------

    def set_open(self, row: int, n: int) -> None:
        """C{row}'s process has C{n} connections open."""
        self._words[_base(row) + _OPEN] = n

    def add_kept(self, row: int, n: int) -> None:
        """C{row}'s process kept C{n} more connections it accepted."""
        self._words[_base(row) + _KEPT] += n

    def add_received(self, row: int, n: int) -> None:
        """C{row}'s process took C{n} more connections the master sent."""
        self._words[_base(row) + _RECEIVED] += n

    # The master's side --------------------------------------------------------

    def clear(self, row: int) -> None:
        """A new process takes C{row}: it starts from nothing."""
        base = _base(row)
        self._words[base:base + _WORDS_PER_ROW] = memoryview(bytes(8 * _WORDS_PER_ROW)).cast("q")

    def add_dealt(self, row: int, n: int) -> None:
        """The master sent C{n} more connections to C{row}'s process."""
        self._words[_base(row) + _DEALT] += n

    def lift(self, row: int, n: int) -> None:
        """Count C{n} more connections as served by C{row} (see
        L{txcluster.master.fairshare.LedgerDealer.keep_only})."""
        self._words[_base(row) + _LIFTED] += n

    def set_steering(self, on: bool) -> None:
        self._words[_STEERING] = int(on)

    def set_serving(self, rows: Iterable[int]) -> None:
        """From now on these rows, and no other, serve."""
        serving = {row for row in rows if self.has(row)}
        words = self._words
        highest = max(serving, default=0)
        for row in range(1, max(highest, words[_HIGHEST]) + 1):
            words[_base(row) + _SERVING] = int(row in serving)
        words[_HIGHEST] = highest

    def close(self) -> None:
        """Unmap; the descriptor stays open."""
        self._words.release()
        self._map.close()


class LedgerSlot:
    """One worker process's row in the ledger: what its site, its acceptor
    and its receiver write, and its view of the others."""

    def __init__(self, ledger: Ledger, row: int) -> None:
        self.ledger = ledger
        self.row = row
        self._counted = ledger.has(row)

    def set_open(self, n: int) -> None:
        if self._counted:
            self.ledger.set_open(self.row, n)

    def add_kept(self, n: int) -> None:
        if self._counted:
            self.ledger.add_kept(self.row, n)

    def add_received(self, n: int) -> None:
        if self._counted:
            self.ledger.add_received(self.row, n)

    def loads(self) -> Dict[int, Load]:
        return self.ledger.loads() if self._counted else {}

    def steering(self) -> bool:
        return self.ledger.steering()
