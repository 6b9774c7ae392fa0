"""
C{--balance reuseport}: one listening socket per worker id, all bound to
the same address with C{SO_REUSEPORT}, held by the master.

The kernel spreads connections over the sockets, and each worker accepts
on its own.  The master holds every socket, and accepts itself on those
no worker accepts on (L{ReusePortGroup.unserved}: a worker starting, being
respawned or replaced, or an id removed by SIGTTOU), dealing those
connections to the workers that serve as round-robin does.  So nothing
queued on a socket waits for a process that is not there, and nothing is
ever reset by a socket leaving the group (it never leaves while the
master runs): what makes C{SO_REUSEPORT} safe for rolling restarts and
scaling.  (A module of its own: C{twisted.internet.tcp} imports
pyOpenSSL, which the master keeps out until its options are parsed, so
only this mode imports it.)
"""

from __future__ import annotations

import platform
import socket
from typing import Any, Callable, Collection, Dict, List, Optional

from twisted.internet import tcp
from twisted.internet.abstract import isIPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

from ..cpus import SO_INCOMING_CPU, kernel_steers_by_cpu
from ..settings import REUSEPORT_ENDPOINTS, endpoint_kind
from .sockets import NeverAccepts, StartupError, bind, close_our_copy, set_backlog

log = Logger(namespace="txcluster.master")


class _ReusePort(tcp.Port):
    """
    A TCP port whose socket joins the C{SO_REUSEPORT} group of its address.

    C{createInternetSocket} is the hook C{tcp.Port.startListening} makes its
    socket with, before it binds: public in name, undocumented in fact.
    C{tests/test_master_reuseport.py} checks that every socket of a group has
    C{SO_REUSEPORT} set, so a Twisted that stops calling it fails there.
    """

    def createInternetSocket(self) -> socket.socket:
        s = super().createInternetSocket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return s


class _ReusePortReactor:
    """
    The reactor as an endpoint sees it while L{ReusePortGroup} binds: its
    C{listenTCP} (and C{listenSSL}: the master never speaks TLS) binds a
    L{_ReusePort}, and remembers how, so that more sockets can join.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.backlog = 50
        self.interface = ""

    def listenTCP(self, port: int, factory: IProtocolFactory, backlog: int = 50,
                  interface: str = "") -> _ReusePort:
        self.backlog, self.interface = backlog, interface
        if port:
            _refuse_if_taken(interface, port)
        return self.listen_more(port, factory)

    def listenSSL(self, port: int, factory: IProtocolFactory, contextFactory: Any,
                  backlog: int = 50, interface: str = "") -> _ReusePort:
        return self.listenTCP(port, factory, backlog, interface)

    def listen_more(self, port: int, factory: IProtocolFactory) -> _ReusePort:
        listening = _ReusePort(port, factory, self.backlog, self.interface, self._reactor)
        listening.startListening()
        return listening

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def _refuse_if_taken(interface: str, port: int) -> None:
    """
    Fail like the other modes if the address is in use.  A socket with
    C{SO_REUSEPORT} would silently join another process's group on it (a
    second cluster started by mistake, an old one still draining), which
    would then get part of the connections.  So bind once without it.

    @raise CannotListenError: the address is in use (or not ours to bind).
    """
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's ports
        try:
            probe.bind((interface, port))
        except OSError as e:
            raise CannotListenError(interface, port, e) from None


class ReusePortGroup:
    """
    The listening sockets of C{description}'s address, one per worker id;
    the master accepts on those no worker accepts on (L{unserved}).

    The first C{count} are bound at once, before twistd drops privileges
    (the kernel only lets one user's sockets share a port).  An id that
    goes away (SIGTTOU, L{release}) leaves its socket behind, for the
    master to accept on; a worker id added later (SIGTTIN) takes such a
    socket, else one of its own if it can still be bound, else shares an
    existing one.

    With C{cpu_of}, each socket is marked with its worker's CPU
    (C{SO_INCOMING_CPU}): since Linux 6.2 the kernel then hands a
    connection to a socket marked with the CPU that received it, if there
    is one.  L{steers} says whether that happens for a worker.

    @raise StartupError: an address in use, not permitted or invalid, or
        C{description} is not TCP.
    """

    def __init__(self, reactor: Any, description: str, count: int,
                 cpu_of: Optional[Callable[[int], int]] = None,
                 kernel_steers: bool = kernel_steers_by_cpu(),
                 backlog: Optional[int] = None) -> None:
        if endpoint_kind(description) not in REUSEPORT_ENDPOINTS:
            raise StartupError(f"--balance reuseport needs a tcp:, tcp6: or ssl: endpoint "
                               f"(--listen {description})")
        self._binder = _ReusePortReactor(reactor)
        self._cpu_of = cpu_of
        self._backlog = backlog
        self._ports: Dict[int, tcp.Port] = {}
        #: sockets left by the ids SIGTTOU removed
        self._left: List[tcp.Port] = []
        #: whether marked sockets get the connections of their CPU
        self.steering = cpu_of is not None and kernel_steers
        #: whether the sockets are marked now (L{steer})
        self.steered = True
        if cpu_of is not None and not kernel_steers:
            log.warn("--cpu-affinity: this kernel ({release}) does not hand connections to "
                     "the worker of the CPU that received them (Linux 6.2 does); workers "
                     "are pinned, connections spread by hash", release=platform.release())
        #: the socket of worker 1: what the master reports listening on
        self.listening: tcp.Port = bind(self._binder, description)  # type: ignore[assignment]
        try:
            self._add(1, self.listening)
            for worker_id in range(2, count + 1):
                self._add(worker_id, self._bind_more())
        except CannotListenError as e:
            bound = len(self._ports)
            self.close()
            raise StartupError(f"{e.socketError.strerror or e.socketError} binding socket "
                               f"{bound + 1} of {count} (--listen {description})") from None
        except BaseException:
            self.close()
            raise

    def fileno(self, worker_id: int) -> int:
        """Worker C{worker_id}'s socket: if it has none yet, one an id
        removed left behind, else one bound now."""
        if worker_id not in self._ports and self._left:
            self._add(worker_id, self._left.pop())
        elif worker_id not in self._ports:
            try:
                self._add(worker_id, self._bind_more())
            except CannotListenError as e:
                shared = sorted(self._ports)[(worker_id - 1) % len(self._ports)]
                log.warn("worker {id} shares the socket of worker {shared}: cannot bind "
                         "another: {error}", id=worker_id, shared=shared, error=e)
                return self._ports[shared].fileno()
        return self._ports[worker_id].fileno()

    def steers(self, worker_id: int) -> bool:
        """Do worker C{worker_id}'s new connections come from its own CPU?
        (Not if it shares another worker's socket.)"""
        return self.steering and worker_id in self._ports

    def release(self, worker_id: int) -> None:
        """C{worker_id} is gone: its socket stays in the group, unserved
        (closing it would reset what the kernel queued on it meanwhile,
        unless C{net.ipv4.tcp_migrate_req} is set), until an id added later
        takes it."""
        port = self._ports.pop(worker_id, None)
        if port is None:
            return
        if self.steering:  # else the master would get every connection of that CPU
            try:
                port.socket.setsockopt(socket.SOL_SOCKET, SO_INCOMING_CPU, -1)
            except OSError as e:
                log.warn("could not unmark the socket of worker {id}: {error}",
                         id=worker_id, error=e)
        self._left.append(port)
        log.info("the socket of worker {id} stays in the group: the master accepts "
                 "its share of connections until a worker is added", id=worker_id)

    def steer(self, on: bool) -> None:
        """Mark every worker's socket with its CPU again (C{on}), or clear
        the marks, so that the kernel spreads connections by hash
        (L{txcluster.master.steering.SteeringGuard})."""
        if not self.steering or self.steered == on:
            return
        self.steered = on
        for worker_id, port in self._ports.items():
            self._mark(worker_id, port)

    def unserved(self, serving: Collection[int]) -> List[int]:
        return ([port.fileno() for worker_id, port in sorted(self._ports.items())
                 if worker_id not in serving]
                + [port.fileno() for port in self._left])

    def close(self) -> None:
        for port in [*self._ports.values(), *self._left]:
            close_our_copy(port)
        self._ports, self._left = {}, []

    def _bind_more(self) -> tcp.Port:
        port = self._binder.listen_more(self.listening.getHost().port, NeverAccepts())
        port.stopReading()
        return port

    def _add(self, worker_id: int, port: tcp.Port) -> None:
        self._ports[worker_id] = port
        if self._backlog is not None:
            set_backlog(port, self._backlog)
        if self.steering:
            self._mark(worker_id, port)

    def _mark(self, worker_id: int, port: tcp.Port) -> None:
        """Mark C{port} with its worker's CPU while steering, else clear it."""
        cpu = self._cpu_of(worker_id) if self.steered else -1  # type: ignore[misc]
        try:
            port.socket.setsockopt(socket.SOL_SOCKET, SO_INCOMING_CPU, cpu)
        except OSError as e:
            self.steering = False
            log.warn("--cpu-affinity: cannot mark listening sockets with their CPU "
                     "({error}); connections spread by hash", error=e)
