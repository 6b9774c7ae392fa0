"""
C{--balance reuseport} (and so C{auto}), the master's side of the workers'
fair shares (L{txcluster.ledger}): it deals what a worker hands on, and
what it accepts on a socket no worker serves, to the least loaded worker;
keeps its copy of each connection until that worker has taken it; and
gives each worker process its row in the ledger.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Deque, Dict, List, Sequence

from ..ledger import MAX_ROWS, MAX_SERVED_SLACK, Ledger, Load, least_loaded
from .dispatch import Accepted, Dealer, WorkerChannel


class LedgerDealer(Dealer):
    """
    C{--balance reuseport}: workers accept themselves, and the master deals
    only what one of them hands on (more than its fair share) and what it
    accepts on a socket no worker serves.  Each goes to the least loaded
    serving worker by the L{Ledger} they all share
    (L{txcluster.ledger.least_loaded}), and is counted there.

    The master keeps its copy of each connection it sends until the
    worker's row says the worker has taken it (C{received}): if the worker
    dies first (say C{kill -9} of a hung one), the master deals it again,
    and no client sees its connection reset.  It also gives each worker
    process its row (L{allocate}).
    """

    def __init__(self, ledger: Ledger) -> None:
        super().__init__()
        self.ledger = ledger
        self._free_rows = list(range(MAX_ROWS, 0, -1))
        #: per channel: the descriptors sent and not known to be taken yet,
        #: oldest first, and how many of those sent before were closed
        self._unconfirmed: Dict[WorkerChannel, Deque[int]] = {}
        self._confirmed: Dict[WorkerChannel, int] = {}

    def allocate(self) -> int:
        """A row for a new worker process, cleared (0: none is left; that
        process keeps every connection it accepts)."""
        if not self._free_rows:
            return 0
        row = self._free_rows.pop()
        self.ledger.clear(row)
        return row

    def deal(self, accepted: Sequence[Accepted],
             targets: Sequence[WorkerChannel]) -> List[List[Accepted]]:
        by_row = {t.row: t for t in targets if self.ledger.has(t.row)}
        if not by_row:
            return super().deal(accepted, targets)
        loads = {row: self.ledger.load(row) for row in by_row}
        shares: Dict[WorkerChannel, List[Accepted]] = {t: [] for t in targets}
        for connection in accepted:
            row = least_loaded(loads)
            shares[by_row[row]].append(connection)  # type: ignore[index]
            load = loads[row]  # type: ignore[index]
            loads[row] = Load(load.open + 1, load.served + 1)  # type: ignore[index]
        return [shares[t] for t in targets]

    def split(self, n: int, targets: Sequence[WorkerChannel]) -> List[int]:
        return [len(share) for share in self.deal([Accepted(None)] * n, targets)]

    def record(self, target: WorkerChannel, n: int) -> None:
        if self.ledger.has(target.row):
            self.ledger.add_dealt(target.row, n)
        else:
            super().record(target, n)

    def keep_only(self, targets: Sequence[WorkerChannel]) -> None:
        """C{targets} serve from now on.  One that joins having served
        fewer connections than the others (a new process) is lifted to
        just within the slack of the most served, else the others would
        hand it every connection until it caught up."""
        super().keep_only(targets)
        rows = [t.row for t in targets if self.ledger.has(t.row)]
        self.ledger.set_serving(rows)
        floor = max((self.ledger.load(row).served for row in rows), default=0) - MAX_SERVED_SLACK
        for row in rows:
            behind = floor - self.ledger.load(row).served
            if behind > 0:
                self.ledger.lift(row, behind)

    def handed(self, target: WorkerChannel, fds: Sequence[int]) -> None:
        if not self.ledger.has(target.row):
            super().handed(target, fds)
            return
        self._unconfirmed.setdefault(target, deque()).extend(fds)
        self._confirmed.setdefault(target, 0)
        self._sweep(target)

    def waiting(self) -> bool:
        return any(self._unconfirmed.values())

    def serving(self) -> int:
        """How many worker processes serve now."""
        return len(self.ledger.loads())

    def kept(self) -> int:
        """How many connections the serving workers kept of those they
        accepted themselves."""
        return sum(self.ledger.kept(row) for row in self.ledger.loads())

    def sweep(self) -> None:
        for target in list(self._unconfirmed):
            self._sweep(target)

    def _sweep(self, target: WorkerChannel) -> None:
        unconfirmed = self._unconfirmed[target]
        taken = self.ledger.received(target.row) - self._confirmed[target]
        for _ in range(min(taken, len(unconfirmed))):
            os.close(unconfirmed.popleft())
            self._confirmed[target] += 1

    def release(self, target: WorkerChannel) -> List[int]:
        left: List[int] = []
        if target in self._unconfirmed:
            self._sweep(target)
            left = list(self._unconfirmed.pop(target))
            del self._confirmed[target]
        if self.ledger.has(target.row):
            self._free_rows.append(target.row)
            self._free_rows.sort(reverse=True)
        return left
