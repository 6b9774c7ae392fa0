"""
C{--balance reuseport}: one listening socket per worker id, all bound to
the same address with C{SO_REUSEPORT}, held by the master.

The kernel spreads connections over the sockets, and each worker accepts
on its own.  Because the master holds every socket for as long as its
worker id exists, the connections queued on one whose worker is being
respawned or replaced wait for the next process under that id instead of
being reset, which is what makes C{SO_REUSEPORT} safe for rolling
restarts.  (Imported by the master only: C{twisted.internet.tcp} imports
pyOpenSSL, which the master keeps out until its options are parsed.)
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Dict, Optional

from twisted.internet import tcp
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

from .balancing import REUSEPORT_ENDPOINTS
from .listening import NeverAccepts, StartupError, bind

log = Logger(namespace="txcluster.master")


class _ReusePort(tcp.Port):
    """A TCP port whose socket joins the C{SO_REUSEPORT} group of its address."""

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


class ReusePortGroup:
    """
    The listening sockets of C{description}'s address, one per worker id;
    the master never accepts on them.

    The first C{count} are bound at once, before twistd drops privileges
    (the kernel only lets one user's sockets share a port).  A worker id
    added later (SIGTTIN) gets a socket of its own if it can still be
    bound, else shares an existing one.  L{release} closes the master's
    copy when an id goes away (SIGTTOU).  With C{cpu_of}, each socket is
    marked with its worker's CPU (C{SO_INCOMING_CPU}): since Linux 6.2 the
    kernel then hands a connection to a socket marked with the CPU that
    received it, if there is one.

    @raise StartupError: like L{bind}, or C{description} is not TCP.
    """

    def __init__(self, reactor: Any, description: str, count: int,
                 cpu_of: Optional[Callable[[int], int]] = None) -> None:
        if description.partition(":")[0] not in REUSEPORT_ENDPOINTS:
            raise StartupError(f"--balance reuseport needs a tcp:, tcp6: or ssl: endpoint "
                               f"(--listen {description})")
        self._binder = _ReusePortReactor(reactor)
        self._cpu_of = cpu_of
        self._ports: Dict[int, tcp.Port] = {}
        #: the socket of worker 1: what the master reports listening on
        self.first: tcp.Port = bind(self._binder, description)  # type: ignore[assignment]
        try:
            self._add(1, self.first)
            for worker_id in range(2, count + 1):
                self._add(worker_id, self._bind_more())
        except BaseException:
            self.close()
            raise

    def fileno(self, worker_id: int) -> int:
        """Worker C{worker_id}'s socket, bound now if it has none yet."""
        if worker_id not in self._ports:
            try:
                self._add(worker_id, self._bind_more())
            except CannotListenError as e:
                shared = sorted(self._ports)[(worker_id - 1) % len(self._ports)]
                log.warn("worker {id} shares the socket of worker {shared}: cannot bind "
                         "another: {error}", id=worker_id, shared=shared, error=e)
                return self._ports[shared].fileno()
        return self._ports[worker_id].fileno()

    def release(self, worker_id: int) -> None:
        """Close the master's copy of C{worker_id}'s socket: it leaves the
        group when its worker has stopped listening too."""
        port = self._ports.pop(worker_id, None)
        if port is not None:
            port.socket.close()

    def close(self) -> None:
        for worker_id in list(self._ports):
            self.release(worker_id)

    def _bind_more(self) -> tcp.Port:
        port = self._binder.listen_more(self.first.getHost().port, NeverAccepts())
        port.stopReading()
        return port

    def _add(self, worker_id: int, port: tcp.Port) -> None:
        if self._cpu_of is not None:
            port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_INCOMING_CPU,
                                   self._cpu_of(worker_id))
        self._ports[worker_id] = port
