"""
Everything that crosses the boundary between the master and a worker.

- the descriptors a worker is spawned with (L{LISTEN_FD} and friends);
- its environment (L{WorkerEnvironment}): who it is and what to run;
- the control channel's AMP commands, both ways;
- round-robin's hand-over of accepted connections (L{send_connections},
  L{receive_connections});
- what a worker's exit status means (L{ExitStatus}).

Both sides import this module and nothing of each other.
"""

from __future__ import annotations

import json
import socket
from enum import IntEnum
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import attr
from twisted.internet.interfaces import ITransport
from twisted.protocols import amp

from .settings import Settings

# Exit statuses ---------------------------------------------------------------


class ExitStatus(IntEnum):
    """Exit statuses of the master and of a worker, after gunicorn's."""

    OK = 0
    CRASH_LOOP = 1  # the master gave up on a crash loop
    BOOT_ERROR = 3  # a worker's startup hook failed, or it could not listen
    APP_LOAD_ERROR = 4  # a worker could not import --app, or cannot serve it

    @classmethod
    def meaning(cls, status: Optional[int]) -> Optional[str]:
        """What a worker's exit status says, for the master's log."""
        return _MEANINGS.get(status)  # type: ignore[arg-type]


_MEANINGS = {
    ExitStatus.OK: "stopped",
    ExitStatus.BOOT_ERROR: "failed to boot",
    ExitStatus.APP_LOAD_ERROR: "could not load the app",
}


def heartbeat_interval(timeout: float) -> float:
    """How often a worker beats (and the master checks), for a silence
    C{timeout}: often enough that one late beat never looks like a hang."""
    return max(0.05, min(1.0, timeout / 5))


# Descriptors -----------------------------------------------------------------

#: File descriptors as the worker sees them.
LISTEN_FD = 3  # kernel and reuseport modes: the listening socket to adopt
CONTROL_FROM_WORKER = 4  # the worker writes, the master reads
CONTROL_TO_WORKER = 5  # the master writes, the worker reads
CONNECTIONS_FD = 6  # connections from the master (all of them in round-robin), and back
LEDGER_FD = 7  # reuseport mode: the shared tally of connections (txcluster.ledger)


# Environment -----------------------------------------------------------------

WORKER_ID_VARIABLE = "TXCLUSTER_WORKER_ID"
WORKERS_VARIABLE = "TXCLUSTER_WORKERS"
_MASTER_PID_VARIABLE = "TXCLUSTER_MASTER_PID"
_SETTINGS_VARIABLE = "TXCLUSTER_SETTINGS"
_HOME_CPU_VARIABLE = "TXCLUSTER_WORKER_CPU"
_CPUS_VARIABLE = "TXCLUSTER_WORKER_CPUS"
_LEDGER_ROW_VARIABLE = "TXCLUSTER_LEDGER_ROW"
_MASTER_ONLY = frozenset({
    _HOME_CPU_VARIABLE, _CPUS_VARIABLE, _LEDGER_ROW_VARIABLE, "NOTIFY_SOCKET", "WATCHDOG_USEC",
    "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
})


@attr.s(frozen=True, auto_attribs=True)
class WorkerEnvironment:
    """
    What the master tells a worker through its environment.

    C{worker_id} and C{count} are also for the app (C{TXCLUSTER_WORKER_ID},
    C{TXCLUSTER_WORKERS}, as the contract says).  C{home_cpu} and C{cpus}
    are set with C{--cpu-affinity} where the worker should keep clients on
    its CPU (L{txcluster.worker.locality.Locality}).  C{ledger_row} is the
    process's row in the ledger of loads (reuseport, L{LEDGER_FD}).
    """

    worker_id: int
    count: int
    master_pid: int
    settings: Settings
    home_cpu: Optional[int] = None
    cpus: Tuple[int, ...] = ()
    ledger_row: Optional[int] = None

    def to_environ(self, inherited: Mapping[str, str]) -> Dict[str, str]:
        """The worker's whole environment: C{inherited} plus ours, less what
        is only the master's (systemd's notify socket, watchdog and
        activated sockets are for the process systemd started)."""
        env = {k: v for k, v in inherited.items() if k not in _MASTER_ONLY}
        env.update({
            WORKER_ID_VARIABLE: str(self.worker_id),
            WORKERS_VARIABLE: str(self.count),
            _MASTER_PID_VARIABLE: str(self.master_pid),
            _SETTINGS_VARIABLE: self.settings.to_json(),
            "PYTHONUNBUFFERED": "1",  # its log lines reach the master at once
        })
        if self.home_cpu is not None:
            env[_HOME_CPU_VARIABLE] = str(self.home_cpu)
            env[_CPUS_VARIABLE] = ",".join(map(str, self.cpus))
        if self.ledger_row is not None:
            env[_LEDGER_ROW_VARIABLE] = str(self.ledger_row)
        return env

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "WorkerEnvironment":
        """@raise KeyError, ValueError: not started by a txcluster master."""
        home = environ.get(_HOME_CPU_VARIABLE)
        row = environ.get(_LEDGER_ROW_VARIABLE)
        return cls(
            worker_id=int(environ[WORKER_ID_VARIABLE]),
            count=int(environ[WORKERS_VARIABLE]),
            master_pid=int(environ[_MASTER_PID_VARIABLE]),
            settings=Settings.from_json(environ[_SETTINGS_VARIABLE]),
            home_cpu=None if home is None else int(home),
            cpus=tuple(int(c) for c in environ.get(_CPUS_VARIABLE, "").split(",") if c),
            ledger_row=None if row is None else int(row),
        )


# What a worker reports -------------------------------------------------------

#: Upper bounds, in seconds, of the request duration histogram's buckets
#: (prometheus_client's defaults); a last bucket, +Inf, takes the rest.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0)


@attr.s(frozen=True, auto_attribs=True)
class WorkerStats:
    """
    What one worker process has served since it started (every count only
    grows while it lives), and how many connections it has open.

    C{by_code} and C{durations} are kept only with C{--metrics}: the
    requests per status code, and how many took at most each of
    L{DURATION_BUCKETS} (not cumulative; the last entry is +Inf), whose
    durations add up to C{duration_sum}.
    """

    requests: int = 0
    connections: int = 0
    by_code: Dict[int, int] = attr.ib(factory=dict)
    durations: Tuple[int, ...] = ()
    duration_sum: float = 0.0

    def to_json(self) -> str:
        return json.dumps([self.requests, self.connections, self.by_code,
                           self.durations, self.duration_sum], separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "WorkerStats":
        requests, connections, by_code, durations, duration_sum = json.loads(text)
        return cls(requests, connections, {int(code): n for code, n in by_code.items()},
                   tuple(durations), duration_sum)


# The control channel: AMP over a pipe pair -----------------------------------


class Ready(amp.Command):
    """Worker -> master: the port is adopted, the app is serving."""

    requiresAnswer = False


class Heartbeat(amp.Command):
    """Worker -> master: the reactor is alive, and what it has served so
    far (L{WorkerStats} as JSON; empty before the site exists)."""

    arguments = [(b"stats", amp.Unicode(optional=True))]
    requiresAnswer = False


class Failed(amp.Command):
    """Worker -> master: I could not start, and exit with C{status} next;
    C{summary} is one line, C{details} the traceback (at most
    L{MAX_DETAILS} characters)."""

    arguments = [(b"status", amp.Integer()), (b"summary", amp.Unicode()),
                 (b"details", amp.Unicode())]
    requiresAnswer = False


#: AMP values are at most 65535 bytes; a traceback longer than this keeps its end.
MAX_DETAILS = 16000


class Stopping(amp.Command):
    """Worker -> master: I am shutting down; send me no more connections.
    The answer means the master has taken the worker out of its rotation;
    C{take_back} that it will take the worker's idle connections back and
    pass them on (round-robin, while the master is not stopping itself)."""

    response = [(b"take_back", amp.Boolean())]


class Goodbye(amp.Command):
    """Worker -> master, once drained: its last counts (as L{Heartbeat}'s),
    answered, so that the worker exits only once the master has them."""

    arguments = [(b"stats", amp.Unicode())]


class Leaving(amp.Command):
    """Master -> worker: the cluster shuts down soon (C{--shutdown-delay});
    answer health checks with 503, and go on serving."""

    requiresAnswer = False


class WorkerCount(amp.Command):
    """Master -> worker: the cluster now has C{count} workers."""

    arguments = [(b"count", amp.Integer())]
    requiresAnswer = False


class StartCron(amp.Command):
    """Master -> worker: you are worker 1 now; start the cron jobs."""

    requiresAnswer = False


class QuietAMP(amp.AMP):
    """AMP without its connection established/lost log lines: the master
    logs each worker's start and exit itself.

    AMP's own C{makeConnection} and C{connectionLost} log, then call
    L{amp.BinaryBoxProtocol}'s, which do the work: calling those directly
    skips the log lines (besides them, AMP's only set up subclasses that
    skip its C{__init__}, and forget the transport once lost).
    C{tests/test_wire.py} (C{QuietAMPTests}) fails if AMP's ever keep more.
    """

    def makeConnection(self, transport: ITransport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)


# Round-robin: connections over a Unix socket pair (SCM_RIGHTS) ---------------

#: The most connections one message carries; the master accepts at most
#: this many per wakeup, and a worker reads this many at once.
ACCEPT_BATCH = 64


def send_connections(channel: socket.socket, fds: Sequence[int]) -> None:
    """Send C{fds} in one message; the caller closes its copies.

    @raise OSError: the worker cannot take them now (EAGAIN: its channel is
        full) or ever (it is gone, or stopping).
    """
    socket.send_fds(channel, [b"c"], list(fds))


class Received(NamedTuple):
    """One message from L{send_connections}."""

    fds: List[int]
    #: the master closed its end (no message, only EOF)
    closed: bool
    #: the kernel dropped descriptors that did not fit (out of fds)
    truncated: bool


def receive_connections(channel: socket.socket) -> Received:
    """Read one message from the master.

    @raise BlockingIOError: nothing to read.
    """
    data, fds, flags, _ = socket.recv_fds(channel, ACCEPT_BATCH, ACCEPT_BATCH)
    return Received(list(fds), closed=not data, truncated=bool(flags & socket.MSG_CTRUNC))
