"""
Round-robin, the master's side (C{--balance round-robin}, Node's cluster
default): the master accepts each connection and passes its descriptor to
a ready worker over a Unix socket pair (C{SCM_RIGHTS},
L{txcluster.wire.send_connections}); the worker adopts it
(L{txcluster.worker.receive}).  Even under keep-alive, where connections
are long-lived and a burst decides the split for good, at the cost of one
C{accept} per connection and one C{sendmsg} per worker and wakeup in the
master.  The master still never reads a request's bytes.

One L{ConnectionDispatcher} deals every connection the master passes on;
an L{Acceptor} per socket the master accepts on feeds it.  In every mode
it also deals the idle kept-alive connections stopping workers hand back;
and with C{--balance reuseport} (and so C{auto}), where it has no acceptor
of its own, what a worker hands on beyond its fair share, with the dealer
of L{txcluster.master.fairshare}, and what the L{StandIns} accept on the
sockets no worker accepts on (a worker starting or being replaced, an id
SIGTTOU removed).

With C{--cpu-affinity} each worker is pinned, and L{Dealer} prefers, for
each connection, a worker on the CPU whose network stack received it
(C{SO_INCOMING_CPU}), while keeping the split even whatever CPUs the
connections arrive on.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import attr
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from ..accepting import accept_waiting
from ..cpus import incoming_cpu
from ..wire import ACCEPT_BATCH, receive_connections, send_connections

log = Logger(namespace="txcluster.master")

#: While no worker can take a connection (every channel full), the master
#: holds what it accepted, stops accepting, and retries after this many seconds.
RETRY_SECONDS = 0.01

#: How often the master closes its copies of connections the workers have
#: taken, when it keeps them (L{txcluster.master.fairshare.LedgerDealer});
#: each is also closed as the next connection goes to that worker.
SWEEP_SECONDS = 0.5

#: After accept() fails for another reason than one connection's (out of
#: descriptors or memory, say), the master stops accepting for this long:
#: the socket stays readable, so retrying at once would spin.  Also how long
#: it waits before reading again after its doRead raised.
PAUSE_SECONDS = 0.1


@attr.s(frozen=True, auto_attribs=True, eq=False)
class WorkerChannel:
    """The master's end of a worker's connection channel, the CPU the
    worker is pinned to (C{None}: not pinned), the worker's id and its
    process's ledger row."""

    socket: socket.socket
    cpu: Optional[int] = None
    worker_id: int = 0
    #: reuseport: the process's row in the ledger (0: none)
    row: int = 0


class Descriptor(int):
    """
    A connection's descriptor, as the master holds it until a worker has
    its copy.  Not a C{socket.socket}: the master never reads or writes a
    connection, and building a socket object (with its family and type
    looked up as enums) cost more than the C{accept} itself.
    """

    def fileno(self) -> int:
        return int(self)

    def close(self) -> None:
        os.close(self)

    def getsockopt(self, level: int, option: int) -> int:
        """Ask the socket (L{incoming_cpu}); only when workers are pinned."""
        handle = socket.socket(fileno=self)
        try:
            return handle.getsockopt(level, option)
        finally:
            handle.detach()


class Accepted(NamedTuple):
    """A connection accepted by the master, and the CPU that received it
    (C{None}: unknown, or not asked because no worker is pinned)."""

    client: Any  # a Descriptor, or a test's stand-in
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
        """Each target's share of C{accepted}; the caller L{record}s what
        each took."""
        if all(t.cpu is None for t in targets):  # nothing pinned: the least served
            shares, start = [], 0
            for n in self.split(len(accepted), targets):
                shares.append(list(accepted[start:start + n]))
                start += n
            return shares
        served = self._lifted(targets)
        counts = {t: n for t, n in zip(targets, served)}
        pinned: Dict[WorkerChannel, List[Accepted]] = {t: [] for t in targets}
        for connection in accepted:
            least = min(counts.values())
            local = [t for t in targets if t.cpu is not None and t.cpu == connection.cpu]
            choice = min(local, key=counts.__getitem__) if local else None
            if choice is None or counts[choice] > least + self.SLACK:
                choice = min(targets, key=counts.__getitem__)
            counts[choice] += 1
            pinned[choice].append(connection)
        return [pinned[t] for t in targets]

    def split(self, n: int, targets: Sequence[WorkerChannel]) -> List[int]:
        """How many of C{n} connections each target takes when none is
        pinned: each to the least served, in the order given; the caller
        L{record}s what each took."""
        served = self._lifted(targets)
        counts = [0] * len(served)
        for _ in range(n):
            least = served.index(min(served))
            served[least] += 1
            counts[least] += 1
        return counts

    def _lifted(self, targets: Sequence[WorkerChannel]) -> List[int]:
        """How many connections each target has taken, after lifting those
        that fell more than C{SLACK + 1} behind the most served."""
        served = [self._served.get(t) for t in targets]
        floor = max(self._served.values(), default=0) - (self.SLACK + 1)
        if any(n is None or n < floor for n in served):
            served = [floor if n is None else max(n, floor) for n in served]
            self._served.update(zip(targets, served))
        return served  # type: ignore[return-value]

    def record(self, target: WorkerChannel, n: int) -> None:
        """C{target} took C{n} connections."""
        self._served[target] = self._served.get(target, 0) + n

    def keep_only(self, targets: Sequence[WorkerChannel]) -> None:
        """Forget the workers that are gone."""
        self._served = {t: n for t, n in self._served.items() if t in targets}

    def handed(self, target: WorkerChannel, fds: Sequence[int]) -> None:
        """C{fds} were sent to C{target}: the worker has its copies, so the
        master closes its own."""
        for fd in fds:
            os.close(fd)

    def waiting(self) -> bool:
        """Does the master keep copies of connections sent (L{sweep})?"""
        return False

    def sweep(self) -> None:
        """Close the copies kept of connections the workers have taken."""

    def release(self, target: WorkerChannel) -> List[int]:
        """C{target}'s process is gone: what it was sent and never took,
        for the master to deal again."""
        return []


class ConnectionDispatcher:
    """
    Send each connection the master has to one of the serving workers'
    channels, as the L{Dealer} decides: those its L{Acceptor}s accept (one
    per socket the master accepts on: round-robin's, or with reuseport the
    L{StandIns}'), and those workers hand back or on.  The master tells it
    which workers serve (L{serve}); while none does, its acceptors stop and
    connections wait in the kernel's backlog.

    Each wakeup of an acceptor sends each worker its share in one message.
    A connection no worker can take yet (every channel full) is held, not
    dropped: the acceptors stop, so the backlog takes the pressure, and
    sending is retried shortly.  So at most L{ACCEPT_BATCH} connections are
    ever held, and no message carries more descriptors than a worker reads
    at once.
    """

    def __init__(self, reactor: Any, dealer: Optional[Dealer] = None) -> None:
        self._reactor = reactor
        self._acceptors: List[Acceptor] = []
        self._serving: List[WorkerChannel] = []
        self._steering = False  # some serving worker is pinned
        #: who takes which connection
        self.dealer = dealer if dealer is not None else Dealer()
        self._held: List[Accepted] = []
        self._retry: Optional[Any] = None
        self._closed = False
        self._watched: Dict[WorkerChannel, "_HandedBack"] = {}
        self._sweeping: Optional[Any] = None
        self.dispatched = 0
        self.handed_back = 0

    @property
    def held(self) -> int:
        """Connections accepted that no worker could take yet."""
        return len(self._held)

    @property
    def sockets(self) -> List[int]:
        """The listening sockets it accepts on (the master's copies)."""
        return [acceptor.fileno() for acceptor in self._acceptors]

    @property
    def accepting(self) -> bool:
        """Should its acceptors accept now: some worker serves, and no
        connection waits for one to take it?"""
        return bool(self._serving) and not self._held and not self._closed

    def accept_on(self, listening_fd: int) -> "Acceptor":
        """Accept on C{listening_fd} too (a copy is made), while
        L{accepting}."""
        acceptor = Acceptor(self._reactor, listening_fd, self)
        self._acceptors.append(acceptor)
        if self.accepting:
            acceptor.resume()
        return acceptor

    def stop_accepting_on(self, acceptor: "Acceptor") -> None:
        """Close that acceptor; what waits in its socket's backlog stays."""
        if acceptor in self._acceptors:
            self._acceptors.remove(acceptor)
        acceptor.close()

    def serve(self, channels: Sequence[WorkerChannel]) -> None:
        """From now on, deal connections to C{channels} (the ready workers
        that are not stopping), in this order; none: stop accepting."""
        self._serving = list(channels)
        self._steering = any(t.cpu is not None for t in self._serving)
        self.dealer.keep_only(self._serving)
        if self._serving:
            self._start()
        else:
            self._stop()

    def _start(self) -> None:
        if self._closed:
            return
        if self._held:
            self._schedule_retry()  # accepting resumes once they are sent
        else:
            for acceptor in self._acceptors:
                acceptor.resume()

    def _stop(self) -> None:
        """Stop accepting; what is not accepted stays in the backlog."""
        for acceptor in self._acceptors:
            acceptor.pause()

    def close(self) -> None:
        """Stop for good: send what is held to the workers still serving
        (they drain it), and close what none can take, like the connections
        left in the backlog when the listening socket closes."""
        if self._closed:
            return
        self._closed = True
        for acceptor in self._acceptors:
            acceptor.close()
        self._acceptors = []
        try:
            self._send_held(self._serving)
        except Exception:
            log.failure("could not send the held connections at shutdown")
        finally:
            if self._retry is not None and self._retry.active():
                self._retry.cancel()
            if self._sweeping is not None and self._sweeping.active():
                self._sweeping.cancel()
            for connection in self._held:
                connection.client.close()
            if self._held:
                log.warn("closed {n} connections no worker could take", n=len(self._held))
            self._held = []

    def dispatch(self, fds: List[int]) -> None:
        """Deal connections an acceptor just accepted (while L{accepting})."""
        if self._held or self._steering:
            self._held.extend(Accepted(client, incoming_cpu(client) if self._steering else None)
                              for client in map(Descriptor, fds))
            self._send_held(self._serving)
        elif fds:
            self._send_fresh(fds)

    def _send_fresh(self, fds: List[int]) -> None:
        """The common case, kept short: nothing held and nothing pinned, so
        each serving worker takes its L{Dealer.split} of C{fds} in one
        message.  What a worker cannot take goes the way of held
        connections (L{_send_held}), over the others."""
        sent = 0
        try:
            for target, n in zip(self._serving, self.dealer.split(len(fds), self._serving)):
                if n:
                    if not self._send_fds(target, fds[sent:sent + n]):
                        break
                    self.dealer.record(target, n)
                    sent += n
        finally:
            if sent < len(fds):
                self._held.extend(Accepted(Descriptor(fd)) for fd in fds[sent:])
                self._send_held(self._serving)

    def _send_held(self, ready: List[WorkerChannel]) -> None:
        """Deal the held connections over the C{ready} workers, one message
        per worker; a worker that cannot take its share (busy, gone, over
        its fd limit) leaves it to be dealt again over the others.  What
        none takes stays held: accepting stops, and while some worker is
        ready a retry is due (else the next L{serve})."""
        targets = list(ready)
        try:
            while self._held and targets:
                shares = self.dealer.deal(self._held, targets)
                refused = []
                for target, share in zip(targets, shares):
                    if share and self._send(target, share):
                        self.dealer.record(target, len(share))
                        self._held = [c for c in self._held if c not in share]
                    elif share:
                        refused.append(target)
                targets = [t for t in targets if t not in refused]
        finally:
            if self._held:
                self._stop()
                if ready:
                    self._schedule_retry()

    def _send(self, target: WorkerChannel, share: List[Accepted]) -> bool:
        """Send C{share} (L{_send_fds}); what was not sent stays held
        (True: all of it was sent)."""
        sent = self._send_fds(target, [c.client.fileno() for c in share])
        if 0 < sent < len(share):  # some went: only the rest stays held
            self._held = [c for c in self._held if c not in share[:sent]]
        return sent == len(share)

    def _send_fds(self, target: WorkerChannel, fds: Sequence[int]) -> int:
        """Send C{fds} in messages of at most L{ACCEPT_BATCH}, then leave
        the master's copies to the dealer (L{Dealer.handed}); how many
        were sent (the worker's channel refused the rest)."""
        sent = 0
        for start in range(0, len(fds), ACCEPT_BATCH):
            batch = fds[start:start + ACCEPT_BATCH]
            try:
                send_connections(target.socket, batch)
            except OSError:
                break
            self.dealer.handed(target, batch)
            sent += len(batch)
            self.dispatched += len(batch)
        if self.dealer.waiting():
            self._schedule_sweep()
        return sent

    def _schedule_sweep(self) -> None:
        if self._sweeping is None or not self._sweeping.active():
            self._sweeping = self._reactor.callLater(SWEEP_SECONDS, self._sweep)

    def _sweep(self) -> None:
        self._sweeping = None
        self.dealer.sweep()
        if self.dealer.waiting():
            self._schedule_sweep()

    # Connections handed back by a stopping worker ------------------------------

    def watch(self, channel: WorkerChannel) -> None:
        """Take the connections the worker on C{channel} hands back: idle
        keep-alive connections, when it stops (a rolling restart, a
        recycle), which go on with another worker, so no client sees its
        connection closed."""
        reader = _HandedBack(channel, self)
        self._watched[channel] = reader
        self._reactor.addReader(reader)

    def unwatch(self, channel: WorkerChannel) -> None:
        reader = self._watched.pop(channel, None)
        if reader is not None:
            self._reactor.removeReader(reader)

    def release(self, channel: WorkerChannel) -> None:
        """The worker on C{channel} is gone: stop reading from it, and deal
        again what it was sent and never took
        (L{txcluster.master.fairshare.LedgerDealer})."""
        self.unwatch(channel)
        left = self.dealer.release(channel)
        if left:
            log.info("dealing again {n} connections worker {id} never took",
                     n=len(left), id=channel.worker_id)
            self.hold([Accepted(Descriptor(fd)) for fd in left])

    def takes_back(self) -> bool:
        """Will connections handed back be passed on?  (Not once closed:
        the master is stopping.)"""
        return not self._closed

    def take_back(self, fds: Sequence[int]) -> None:
        """Deal these connections again, as if just accepted."""
        self.handed_back += len(fds)
        self.hold([Accepted(Descriptor(fd)) for fd in fds])

    def hold(self, connections: Sequence[Accepted]) -> None:
        """Deal C{connections}, accepted elsewhere, with those held here."""
        if self._closed:
            for connection in connections:
                connection.client.close()  # shutting down: like a connection in the backlog
            return
        self._held.extend(connections)
        self._send_held(self._serving)

    def _schedule_retry(self) -> None:
        if self._retry is None or not self._retry.active():
            self._retry = self._reactor.callLater(RETRY_SECONDS, self._retry_held)

    def _retry_held(self) -> None:
        self._retry = None
        if self._closed:
            return
        try:
            self._send_held(self._serving)
        finally:
            if not self._held and self._serving:
                self._start()


@implementer(IReadDescriptor)
class Acceptor:
    """Accepts on one listening socket (its own copy) while its
    L{ConnectionDispatcher} is L{accepting<ConnectionDispatcher.accepting>},
    and gives it what it accepted."""

    def __init__(self, reactor: Any, listening_fd: int, dispatcher: ConnectionDispatcher) -> None:
        self._reactor = reactor
        self._socket = socket.socket(fileno=os.dup(listening_fd))
        self._socket.setblocking(False)
        self._dispatcher = dispatcher
        self.reading = False

    def fileno(self) -> int:
        return self._socket.fileno()

    def logPrefix(self) -> str:
        return f"Acceptor(fd {self.fileno()})"

    def resume(self) -> None:
        if not self.reading and self._socket.fileno() >= 0:
            self.reading = True
            self._reactor.addReader(self)

    def pause(self) -> None:
        if self.reading:
            self.reading = False
            self._reactor.removeReader(self)

    def close(self) -> None:
        """Stop, and close our copy of the socket (never shutdown())."""
        self.pause()
        self._socket.close()

    def doRead(self) -> None:
        dispatcher = self._dispatcher
        if not dispatcher.accepting:  # another acceptor's wakeup just stopped us
            self.pause()
            return
        accepted, error = accept_waiting(self._socket, ACCEPT_BATCH - dispatcher.held)
        if accepted:
            dispatcher.dispatch(accepted)
        if error is not None:
            log.warn("accept() failed: {error}; pausing", error=error)
            self.pause()
            self._reactor.callLater(PAUSE_SECONDS, self._resume_if_wanted)

    def _resume_if_wanted(self) -> None:
        if self._dispatcher.accepting:
            self.resume()

    def connectionLost(self, reason: Any) -> None:
        """doRead raised: Twisted has dropped us from the reactor."""
        log.failure("accepting failed; resuming", reason)
        self.reading = False
        self._reactor.callLater(PAUSE_SECONDS, self._resume_if_wanted)


class StandIns:
    """
    C{--balance reuseport}: the master accepts on the sockets no worker
    accepts on (L{txcluster.master.sockets.Listeners.unserved}), with an
    L{Acceptor} each, and C{dispatcher} deals those connections to the
    workers that serve.
    """

    def __init__(self, dispatcher: ConnectionDispatcher) -> None:
        self._dispatcher = dispatcher
        self._by_fd: Dict[int, Acceptor] = {}

    @property
    def sockets(self) -> List[int]:
        """The descriptors the master accepts on now."""
        return sorted(self._by_fd)

    def serve(self, unserved: Sequence[int]) -> None:
        """Accept on the C{unserved} sockets, and no other."""
        for fd in unserved:
            if fd not in self._by_fd:
                self._by_fd[fd] = self._dispatcher.accept_on(fd)
        for fd in [fd for fd in self._by_fd if fd not in unserved]:
            self._dispatcher.stop_accepting_on(self._by_fd.pop(fd))  # its worker serves again

    def close(self) -> None:
        for acceptor in self._by_fd.values():
            self._dispatcher.stop_accepting_on(acceptor)
        self._by_fd = {}


@implementer(IReadDescriptor)
class _HandedBack:
    """Reads the connections a worker sends back on its channel."""

    def __init__(self, channel: WorkerChannel, dispatcher: ConnectionDispatcher) -> None:
        self._channel = channel
        self._dispatcher = dispatcher

    def fileno(self) -> int:
        return self._channel.socket.fileno()

    def logPrefix(self) -> str:
        return "HandedBack"

    def doRead(self) -> None:
        while True:
            try:
                received = receive_connections(self._channel.socket)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the worker is gone
                self._dispatcher.unwatch(self._channel)
                return
            if received.fds:
                self._dispatcher.take_back(received.fds)
            if received.closed:
                self._dispatcher.unwatch(self._channel)
                return

    def connectionLost(self, reason: Any) -> None:
        log.failure("reading connections handed back failed", reason)
        self._dispatcher.unwatch(self._channel)

