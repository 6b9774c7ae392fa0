"""
C{--cpu-affinity} as a worker sees it: keep each keep-alive client on the
CPU it runs on.
"""

from __future__ import annotations

from typing import Any, Callable, FrozenSet, Optional, Sequence, Tuple

import attr

from ..cpus import cpu_for, incoming_cpu, usable_cpus
from ..wire import WorkerEnvironment

#: With --cpu-affinity, how many requests a keep-alive connection whose
#: client now runs on another worker's CPU gets before it is closed (see
#: L{Locality}): the most reconnections this adds is one per this many requests.
RECONNECT_AFTER_REQUESTS = 50


@attr.s(frozen=True, auto_attribs=True)
class Locality:
    """
    The CPU this worker is pinned to (C{home}), the CPUs the master pins
    workers to in turn (C{cpus}), and how many workers there are, hence
    which CPUs have one (C{served}).

    A new connection goes to a worker on the CPU that received it (the
    master deals it there, or in reuseport mode the kernel hands it to
    that worker's socket).  On loopback that is the CPU its client ran on
    when it connected, and a client may move afterwards (wrk starts all its
    threads on one CPU, and the scheduler spreads them a moment later).
    From then on every response wakes the client across CPUs, which is
    what separates a shared port from N independent processes.  So once a
    keep-alive connection has had L{RECONNECT_AFTER_REQUESTS} requests, if
    its packets now arrive on another CPU that has a worker, its next
    response says C{Connection: close}: the client reconnects from where it
    runs now, and the new connection goes to a worker on that CPU.
    """

    home: int
    cpus: Tuple[int, ...]
    workers: int
    #: does the kernel steer new connections by CPU now?  (Not while the
    #: master's steering guard has it spread them by hash: then a client
    #: that reconnects would just be hashed again.)
    steered: Callable[[], bool] = attr.ib(default=lambda: True, eq=False, repr=False)
    served: FrozenSet[int] = attr.ib(init=False)

    @served.default
    def _served(self) -> FrozenSet[int]:
        return frozenset(cpu_for(i, self.cpus) for i in range(1, self.workers + 1))

    def with_workers(self, count: int) -> "Locality":
        """After scaling: the CPUs that have a worker may have changed."""
        return attr.evolve(self, workers=count)

    def should_reconnect(self, client: Any, requests: int) -> bool:
        """Should the connection C{client} (a socket), which has had
        C{requests} requests, be closed after this one?"""
        if requests < RECONNECT_AFTER_REQUESTS or not self.steered():
            return False
        cpu = incoming_cpu(client)
        return cpu is not None and cpu != self.home and cpu in self.served

    @classmethod
    def of_worker(
        cls, environment: WorkerEnvironment,
        affinity: Callable[[], Sequence[int]] = usable_cpus,
        steered: Callable[[], bool] = lambda: True,
    ) -> Optional["Locality"]:
        """The worker's locality, or C{None} if the master did not ask for
        one, or if this process is not pinned to its home CPU after all
        (pinning failed): then its connections are left where they are."""
        home = environment.home_cpu
        if home is None or not environment.cpus or list(affinity()) != [home]:
            return None
        return cls(home, environment.cpus, environment.count, steered)
