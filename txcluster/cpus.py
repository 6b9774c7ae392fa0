"""
Which CPUs this process may use, and which CPU a connection arrived on.

Shared by the master (C{--workers auto}, pinning, marking reuseport
sockets, dealing connections) and the workers (L{txcluster.worker.locality});
the one place that knows C{os.sched_getaffinity} is Linux only.
"""

from __future__ import annotations

import os
import socket
from typing import Any, List, Optional, Sequence

#: Linux's socket option (named in the socket module from Python 3.11 only).
SO_INCOMING_CPU = getattr(socket, "SO_INCOMING_CPU", 49)


def usable_cpus() -> List[int]:
    """The CPUs this process may run on (taskset, cpusets), sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux (macOS has no sched_getaffinity)
        return list(range(os.cpu_count() or 1))


def cpu_for(worker_id: int, cpus: Sequence[int]) -> int:
    """The CPU that worker C{worker_id} (1..N) is pinned to with
    C{--cpu-affinity}: the usable CPUs in turn."""
    return sorted(cpus)[(worker_id - 1) % len(cpus)]


def incoming_cpu(client: Any) -> Optional[int]:
    """The CPU whose network stack last received data for C{client} (a
    socket), or C{None} if unknown."""
    try:
        cpu = client.getsockopt(socket.SOL_SOCKET, SO_INCOMING_CPU)
    except (OSError, AttributeError):  # not Linux, or not a socket (a TLS handle)
        return None
    return cpu if cpu >= 0 else None  # -1: unknown (a Unix socket, say)


class Pinning:
    """C{--cpu-affinity}: worker N runs on usable CPU N-1, modulo the CPUs,
    read once when the master starts (workers inherit the same set)."""

    def __init__(self, cpus: Sequence[int]) -> None:
        self.cpus = tuple(sorted(cpus))

    def cpu_of(self, worker_id: int) -> int:
        return cpu_for(worker_id, self.cpus)
