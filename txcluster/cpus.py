"""
Which CPUs this process may use, and which CPU a connection arrived on.

Shared by the master (C{--workers auto}, pinning, marking reuseport
sockets, dealing connections) and the workers (L{txcluster.worker.locality});
the one place that knows C{os.sched_getaffinity} is Linux only.
"""

from __future__ import annotations

import os
import platform
import socket
from typing import Any, List, Optional, Sequence

#: Linux's socket option (named in the socket module from Python 3.11 only).
SO_INCOMING_CPU = getattr(socket, "SO_INCOMING_CPU", 49)


def kernel_steers_by_cpu(release: str = platform.release()) -> bool:
    """Does this kernel hand a connection to the C{SO_REUSEPORT} socket
    marked with the CPU that received it?  (Linux 6.2 and later.)"""
    try:
        version = tuple(int(part) for part in release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return platform.system() == "Linux" and version >= (6, 2)


def usable_cpus() -> List[int]:
    """The CPUs this process may run on (taskset, cpusets), sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux (macOS has no sched_getaffinity)
        return list(range(os.cpu_count() or 1))


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup",
                     membership: Optional[str] = None) -> Optional[int]:
    """
    The CPU quota of this process's cgroup (a container's C{--cpus}, a
    systemd unit's C{CPUQuota=}), rounded up to whole CPUs, or C{None} if
    there is none: cgroup v2's C{cpu.max}, or v1's C{cpu.cfs_quota_us} over
    C{cpu.cfs_period_us}, of its cgroup and every parent (the lowest wins).

    @param membership: the text of C{/proc/self/cgroup} (read if C{None}).
    """
    if membership is None:
        try:
            with open("/proc/self/cgroup") as f:
                membership = f.read()
        except OSError:
            return None
    limits = []
    for line in membership.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy
            limits += _limits_along(os.path.join(root, path.lstrip("/")), root, _v2_limit)
        elif "cpu" in controllers.split(","):
            top = os.path.join(root, controllers)
            limits += _limits_along(os.path.join(top, path.lstrip("/")), top, _v1_limit)
    return min(limits, default=None)


def _limits_along(directory: str, top: str, read: Any) -> List[int]:
    """The limits set in C{directory} and its parents up to C{top}."""
    found = []
    while True:
        limit = read(directory)
        if limit is not None:
            found.append(limit)
        if os.path.normpath(directory) == os.path.normpath(top) or directory == "/":
            return found
        directory = os.path.dirname(directory)


def _v2_limit(directory: str) -> Optional[int]:
    try:
        with open(os.path.join(directory, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else _whole_cpus(int(quota), int(period))


def _v1_limit(directory: str) -> Optional[int]:
    try:
        with open(os.path.join(directory, "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(directory, "cpu.cfs_period_us")) as f:
            period = int(f.read())
    except (OSError, ValueError):
        return None
    return None if quota < 0 else _whole_cpus(quota, period)


def _whole_cpus(quota: int, period: int) -> Optional[int]:
    if period <= 0 or quota <= 0:
        return None
    return max(1, -(-quota // period))  # rounded up: 1.5 CPUs is 2 workers


def default_workers(cpus: Sequence[int], limit: Optional[int]) -> int:
    """C{--workers auto}: the CPUs this process may run on, or its cgroup's
    CPU quota if that is lower (a container limited to 2 CPUs on a 64-core
    host starts 2 workers, not 64)."""
    return min(len(cpus), limit) if limit is not None else len(cpus)


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
