"""
How connections are spread over the workers (C{--balance}).

C{kernel} (every worker accepts on the shared socket): the kernel wakes the
workers and the first to call C{accept()} wins.  Twisted's port accepts up
to 100+ connections per wakeup, so one worker could drain a whole burst;
L{accept_one_per_wakeup} makes each wakeup take one, as tornado and libuv
did for the same problem.  The master stays off the accept path.

C{round-robin} (Node's cluster default): the master accepts and passes each
connection's descriptor to the next ready worker over a Unix socket pair
(C{SCM_RIGHTS}); the worker adopts it with C{adoptStreamConnection}.  Even
under keep-alive, where connections are long-lived and a burst decides the
split for good, and at the cost of one C{accept} per connection and one
C{sendmsg} per worker and wakeup in the master.  The master still never
reads a request's bytes.

C{reuseport} (opt-in, TCP only): the master binds one C{SO_REUSEPORT}
socket per worker id (L{txcluster.reuseport.ReusePortGroup}) and each
worker accepts on its own; the kernel picks the socket by a hash of the
connection's addresses.  No master on the accept path and no thundering
herd, but no evenness either: a busy worker's queue waits for it, and the
split of a few keep-alive connections is as even as their hash.  The
master holds every socket, so the connections queued on one whose worker
is respawned or replaced wait for the next worker; only removing a
worker (SIGTTOU) closes a socket, and resets what is queued on it unless
C{net.ipv4.tcp_migrate_req} is 1.

C{--cpu-affinity} pins worker N to CPU N-1 (modulo the usable CPUs), and
keeps each connection's packets and requests on one core, without
cross-core wake-ups.  Round-robin then prefers, for each connection, a
worker on the CPU whose network stack received it (C{SO_INCOMING_CPU}),
and L{Dealer} keeps the split even whatever CPUs the connections arrive
on.  With reuseport, each socket is marked with its worker's CPU, and the
kernel (6.2 and later) hands each connection to a worker on the CPU that
received it: the split follows the CPUs the clients run on.  In both,
L{Locality} has a worker send back, to be reconnected, a keep-alive
connection whose client has since moved to another worker's CPU.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import (
    Any, Callable, Dict, FrozenSet, List, Mapping, NamedTuple, Optional, Sequence, Tuple,
)

import attr

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from .listening import address_family

log = Logger(namespace="txcluster.balancing")

KERNEL = "kernel"
ROUND_ROBIN = "round-robin"
REUSEPORT = "reuseport"
MODES = (ROUND_ROBIN, KERNEL, REUSEPORT)

#: The modes where --cpu-affinity also keeps each connection on the CPU
#: that received it (and so a worker sends back a client that moved).
STEERED_MODES = (ROUND_ROBIN, REUSEPORT)

#: The endpoint types reuseport can bind more sockets of.
REUSEPORT_ENDPOINTS = ("tcp", "tcp6", "ssl")

#: Connections the master accepts per wakeup in round-robin mode; also the
#: most descriptors one message to a worker carries (the receiver's limit).
ACCEPT_BATCH = 64

#: While no worker can take a connection (every channel full), the master
#: holds what it accepted, stops accepting, and retries after this many seconds.
RETRY_SECONDS = 0.01

#: After accept() fails for another reason than one connection's (out of
#: descriptors or memory, say), the master stops accepting for this long:
#: the socket stays readable, so retrying at once would spin.  Also how long
#: either end waits before reading again after its doRead raised.
PAUSE_SECONDS = 0.1

#: Linux's socket option (named in the socket module from Python 3.11 only).
SO_INCOMING_CPU = getattr(socket, "SO_INCOMING_CPU", 49)

#: accept(2) errors that concern one connection only, to be treated like EAGAIN.
_ONE_CONNECTION_ERRORS = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.ENETDOWN,
    errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.ENETUNREACH,
})


def cpu_for(worker_id: int, cpus: Sequence[int]) -> int:
    """The CPU that worker C{worker_id} (1..N) is pinned to with
    C{--cpu-affinity}: the usable CPUs in turn."""
    return sorted(cpus)[(worker_id - 1) % len(cpus)]


def accept_one_per_wakeup(port: IListeningPort) -> None:
    """Make a Twisted TCP/Unix port accept one connection per reactor wakeup.

    C{tcp.Port.doRead} raises its C{numberAccepts} after every full batch;
    resetting it before each read keeps it at one.
    """
    if not hasattr(port, "numberAccepts"):  # pragma: no cover - not a tcp.Port
        return
    read = port.doRead

    def read_one() -> Any:
        port.numberAccepts = 1
        return read()

    port.doRead = read_one


@attr.s(frozen=True, auto_attribs=True, eq=False)
class WorkerChannel:
    """The master's end of a worker's connection channel, and the CPU the
    worker is pinned to (C{None}: not pinned)."""

    socket: socket.socket
    cpu: Optional[int] = None


class Accepted(NamedTuple):
    """A connection accepted by the master, and the CPU that received it
    (C{None}: unknown, or not asked because no worker is pinned)."""

    client: Any  # socket.socket, or a test's stand-in
    cpu: Optional[int] = None


class Dealer:
    """
    Which worker takes each new connection.

    The least-served worker first, in the order given, which is round-robin
    while every worker takes its turn.  When workers are pinned, a
    connection goes to the least-served worker on the CPU that received it,
    unless that worker is more than L{SLACK} connections ahead of the least
    served: however unevenly connections arrive over the CPUs, no worker
    gets more than C{SLACK + 1} connections ahead of another.

    No worker falls further behind than that either: one that joins (a
    respawn, a rolling restart, SIGTTIN) or that could not take its share
    for a while (its channel was full) is lifted to that distance from the
    most served, so it is never flooded with a burst to catch up.
    """

    SLACK = 1

    def __init__(self) -> None:
        self._served: Dict[WorkerChannel, int] = {}

    def deal(self, accepted: Sequence[Accepted],
             targets: Sequence[WorkerChannel]) -> List[List[Accepted]]:
        """Each target's share of C{accepted}; L{record} what it took."""
        floor = max(self._served.values(), default=0) - (self.SLACK + 1)
        for target in targets:
            self._served[target] = max(self._served.get(target, floor), floor)
        counts = {t: self._served[t] for t in targets}
        shares: Dict[WorkerChannel, List[Accepted]] = {t: [] for t in targets}
        for connection in accepted:
            least = min(counts.values())
            local = [t for t in targets if t.cpu is not None and t.cpu == connection.cpu]
            choice = min(local, key=counts.__getitem__) if local else None
            if choice is None or counts[choice] > least + self.SLACK:
                choice = min(targets, key=counts.__getitem__)
            counts[choice] += 1
            shares[choice].append(connection)
        return [shares[t] for t in targets]

    def record(self, target: WorkerChannel, n: int) -> None:
        """C{target} took C{n} connections."""
        self._served[target] = self._served.get(target, 0) + n

    def keep_only(self, targets: Sequence[WorkerChannel]) -> None:
        """Forget the workers that are gone."""
        self._served = {t: n for t, n in self._served.items() if t in targets}


def incoming_cpu(client: socket.socket) -> Optional[int]:
    """The CPU whose network stack last received data for C{client}."""
    try:
        cpu = client.getsockopt(socket.SOL_SOCKET, SO_INCOMING_CPU)
    except (OSError, AttributeError):  # not Linux, or not a socket (a TLS handle)
        return None
    return cpu if cpu >= 0 else None  # -1: unknown (a Unix socket, say)


#: With --cpu-affinity, how many requests a keep-alive connection whose
#: client now runs on another worker's CPU gets before it is closed (see
#: L{Locality}): the most reconnections this adds is one per this many requests.
RECONNECT_AFTER_REQUESTS = 50

_HOME_CPU_VARIABLE = "TXCLUSTER_WORKER_CPU"
_CPUS_VARIABLE = "TXCLUSTER_WORKER_CPUS"
_WORKERS_VARIABLE = "TXCLUSTER_WORKERS"


@attr.s(frozen=True, auto_attribs=True)
class Locality:
    """
    C{--cpu-affinity} as a worker sees it: the CPU it is pinned to
    (C{home}), the CPUs the master pins workers to in turn (C{cpus}), and
    how many workers there are, hence which CPUs have one (C{served}).

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
        if requests < RECONNECT_AFTER_REQUESTS:
            return False
        cpu = incoming_cpu(client)
        return cpu is not None and cpu != self.home and cpu in self.served

    def to_environment(self) -> Dict[str, str]:
        """For the master to pass to the worker it is about to pin."""
        return {_HOME_CPU_VARIABLE: str(self.home),
                _CPUS_VARIABLE: ",".join(map(str, self.cpus)),
                _WORKERS_VARIABLE: str(self.workers)}

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str],
        affinity: Callable[[], Sequence[int]] = lambda: sorted(os.sched_getaffinity(0)),
    ) -> Optional["Locality"]:
        """The worker's locality, or C{None} if it was not asked for, or if
        this process is not pinned to its home CPU after all (pinning
        failed): then its connections are left where they are."""
        try:
            home = int(environ[_HOME_CPU_VARIABLE])
            cpus = tuple(int(c) for c in environ[_CPUS_VARIABLE].split(","))
            workers = int(environ[_WORKERS_VARIABLE])
        except (KeyError, ValueError):
            return None
        if list(affinity()) != [home]:
            return None
        return cls(home, cpus, workers)


@implementer(IReadDescriptor)
class ConnectionDispatcher:
    """
    Master side of round-robin: accept on the listening socket and send
    each connection to one of C{targets()}, the channels of the ready
    workers, as the L{Dealer} decides.  While there is no ready worker,
    connections wait in the kernel's backlog.

    One wakeup accepts what is waiting (up to L{ACCEPT_BATCH}) and sends
    each worker its share in one message.  A connection no worker can take
    yet (every channel full) is held, not dropped: the master stops
    accepting, so the backlog takes the pressure, and retries shortly.  So
    at most L{ACCEPT_BATCH} connections are ever held, and no message
    carries more descriptors than a worker reads at once.
    """

    def __init__(self, reactor: Any, listening_fd: int,
                 targets: Callable[[], List[WorkerChannel]]) -> None:
        self._reactor = reactor
        self._socket = socket.socket(fileno=os.dup(listening_fd))
        self._socket.setblocking(False)
        self._targets = targets
        self._dealer = Dealer()
        self._held: List[Accepted] = []
        self._retry: Optional[Any] = None
        self._closed = False
        self.reading = False
        self.dispatched = 0

    def fileno(self) -> int:
        return self._socket.fileno()

    def logPrefix(self) -> str:
        return "ConnectionDispatcher"

    @property
    def held(self) -> int:
        """Connections accepted that no worker could take yet."""
        return len(self._held)

    def start(self) -> None:
        """(Re)start accepting; called whenever a worker becomes ready."""
        if self._closed:
            return
        if self._held:
            self._schedule_retry()  # accepting resumes once they are sent
        elif not self.reading and self._socket.fileno() >= 0:
            self.reading = True
            self._reactor.addReader(self)

    def stop(self) -> None:
        """Stop accepting; what is not accepted stays in the backlog."""
        if self.reading:
            self.reading = False
            self._reactor.removeReader(self)

    def close(self) -> None:
        """Stop for good: send what is held to the workers still serving
        (they drain it), and close what none can take, like the connections
        left in the backlog when the listening socket closes."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        try:
            self._send_held(self._targets())
        except Exception:
            log.failure("could not send the held connections at shutdown")
        finally:
            if self._retry is not None and self._retry.active():
                self._retry.cancel()
            for connection in self._held:
                connection.client.close()
            if self._held:
                log.warn("closed {n} connections no worker could take", n=len(self._held))
            self._held = []
            self._socket.close()  # our copy only: never shutdown()

    def doRead(self) -> None:
        targets = self._targets()
        if not targets:
            self.stop()  # resumed by start() when a worker is ready
            return
        steering = any(t.cpu is not None for t in targets)
        self._held.extend(
            Accepted(client, incoming_cpu(client) if steering else None)
            for client in self._accept_waiting())
        self._send_held(targets)

    def _accept_waiting(self) -> List[socket.socket]:
        accepted: List[socket.socket] = []
        while len(accepted) + len(self._held) < ACCEPT_BATCH:
            try:
                client, _ = self._socket.accept()
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in _ONE_CONNECTION_ERRORS:  # that client is gone: next
                    continue
                log.warn("accept() failed: {error}; pausing", error=e)
                self.stop()
                self._reactor.callLater(PAUSE_SECONDS, self.start)
                break
            accepted.append(client)
        return accepted

    def _send_held(self, ready: List[WorkerChannel]) -> None:
        """Deal the held connections over the C{ready} workers, one message
        per worker; a worker that cannot take its share (busy, gone, over
        its fd limit) leaves it to be dealt again over the others.  What
        none takes stays held: accepting stops, and while some worker is
        ready a retry is due (else the next ready worker's start())."""
        self._dealer.keep_only(ready)
        targets = list(ready)
        try:
            while self._held and targets:
                shares = self._dealer.deal(self._held, targets)
                refused = []
                for target, share in zip(targets, shares):
                    if share and self._send(target.socket, share):
                        self._dealer.record(target, len(share))
                        self._held = [c for c in self._held if c not in share]
                    elif share:
                        refused.append(target)
                targets = [t for t in targets if t not in refused]
        finally:
            if self._held:
                self.stop()
                if ready:
                    self._schedule_retry()

    def _send(self, channel: socket.socket, share: List[Accepted]) -> bool:
        try:
            socket.send_fds(channel, [b"c"], [c.client.fileno() for c in share])
        except OSError:
            return False
        for connection in share:
            connection.client.close()  # the worker has its copy
        self.dispatched += len(share)
        return True

    def _schedule_retry(self) -> None:
        if self._retry is None or not self._retry.active():
            self._retry = self._reactor.callLater(RETRY_SECONDS, self._retry_held)

    def _retry_held(self) -> None:
        self._retry = None
        if self._closed:
            return
        try:
            self._send_held(self._targets())
        finally:
            if not self._held:
                self.start()

    def connectionLost(self, reason: Any) -> None:
        """doRead raised: Twisted has dropped us from the reactor."""
        log.failure("the connection dispatcher failed; resuming", reason)
        self.reading = False
        self._reactor.callLater(PAUSE_SECONDS, self.start)


@implementer(IReadDescriptor, IListeningPort)
class ConnectionReceiver:
    """
    Worker side of round-robin: adopt the connections the master sends.
    Acts as the worker's listening port: C{stopListening} adopts what the
    master already sent, then stops.
    """

    def __init__(self, reactor: Any, channel_fd: int, factory: IProtocolFactory) -> None:
        self._reactor = reactor
        self._channel = socket.socket(fileno=channel_fd)
        self._channel.setblocking(False)
        self._factory = factory
        self._family: Optional[socket.AddressFamily] = None  # one listening socket: one family
        self.adopted = 0

    def fileno(self) -> int:
        return self._channel.fileno()

    def logPrefix(self) -> str:
        return "ConnectionReceiver"

    def startListening(self) -> None:
        self._factory.doStart()
        self._reactor.addReader(self)

    def stopListening(self) -> Deferred:
        if self._channel.fileno() >= 0:
            self._reactor.removeReader(self)
            # The master may not know yet that this worker is stopping (say,
            # systemd sent SIGTERM to every process): from now on its sends
            # fail, and it deals those connections to another worker.
            self._channel.shutdown(socket.SHUT_RD)
            self.doRead()  # what the master sent before
            self._channel.close()
            self._factory.doStop()
        return succeed(None)

    def getHost(self) -> Any:
        return None

    def doRead(self) -> Optional[Any]:
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self._channel, ACCEPT_BATCH, ACCEPT_BATCH)
            except BlockingIOError:
                return None
            except OSError as e:
                log.warn("receiving connections failed: {error}", error=e)
                return None
            if flags & socket.MSG_CTRUNC:  # the kernel closed what did not fit
                log.error("connections lost: the message from the master was truncated "
                          "(this worker is out of file descriptors, or more than {n} "
                          "came at once)", n=ACCEPT_BATCH)
            for fd in fds:
                self._adopt(fd)
            if not data:  # the master closed its end: it is gone
                self._reactor.removeReader(self)
                return None

    def _adopt(self, fd: int) -> None:
        try:
            if self._family is None:
                self._family = address_family(fd)
            self._reactor.adoptStreamConnection(fd, self._family, self._factory)
            self.adopted += 1
        except OSError as e:  # the client went away meanwhile
            log.debug("could not adopt a connection: {error}", error=e)
        except Exception:
            log.failure("could not adopt a connection")
        finally:
            os.close(fd)

    def connectionLost(self, reason: Any) -> None:
        """doRead raised: Twisted has dropped us from the reactor."""
        log.failure("receiving connections failed; resuming", reason)
        if self._channel.fileno() >= 0:
            self._reactor.callLater(PAUSE_SECONDS, self._reactor.addReader, self)

