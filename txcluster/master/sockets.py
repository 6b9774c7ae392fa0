"""
The listening socket: bound once by the master, before any worker starts.

The master binds through Twisted's own endpoint parser (so every endpoint
type works), then stops reading at once: the port itself never accepts
(round-robin, and reuseport for a socket no worker accepts on, accept
through a copy: L{txcluster.master.dispatch}).  It
also never calls C{stopListening} on that port, because a C{listenTCP} port
C{shutdown()}s its socket, which would refuse connections for every worker
sharing it; the master's copy is simply closed when the master exits.

L{SharedSocket} is the one socket every worker gets; with C{--balance
reuseport} the master binds one socket per worker instead
(L{txcluster.master.reuseport.ReusePortGroup}).  Both answer the same
questions (L{Listeners}).
"""

from __future__ import annotations

import os
from typing import Any, Collection, List, Optional, Protocol

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ServerFactory


class StartupError(Exception):
    """Starting failed for a reason a user can fix; the message says which."""


class NeverAccepts(ServerFactory):
    """The master's factory: its port never reads, so this never builds."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


class Listeners(Protocol):
    """The listening sockets the master holds for its workers."""

    #: the port the master reports listening on
    listening: IListeningPort

    def fileno(self, worker_id: int) -> int:
        """The listening descriptor worker C{worker_id} is given."""

    def steers(self, worker_id: int) -> bool:
        """Does the kernel hand worker C{worker_id} the connections that
        arrive on its own CPU (C{--cpu-affinity})?"""

    def release(self, worker_id: int) -> None:
        """Worker id C{worker_id} is gone for good (SIGTTOU)."""

    def unserved(self, serving: Collection[int]) -> List[int]:
        """The sockets no worker accepts on while only the worker ids in
        C{serving} do, which the master must accept on itself."""

    def close(self) -> None:
        """The master is stopping: close its copies, so that once the
        workers have closed theirs new connections are refused at once
        instead of waiting in a backlog nobody will accept from."""


class SharedSocket:
    """One listening socket for every worker (round-robin, kernel)."""

    def __init__(self, listening: IListeningPort) -> None:
        self.listening = listening

    def fileno(self, worker_id: int) -> int:
        return self.listening.fileno()

    def steers(self, worker_id: int) -> bool:
        # Round-robin deals each connection to the worker of its CPU itself.
        return True

    def release(self, worker_id: int) -> None:
        pass

    def unserved(self, serving: Collection[int]) -> List[int]:
        # Round-robin: the master accepts on it anyway; kernel: every worker does.
        return []

    def close(self) -> None:
        close_our_copy(self.listening)


def close_our_copy(port: IListeningPort) -> None:
    """Close this process's copy of a listening socket that workers may
    share.  Not C{stopListening()}: a C{tcp.Port} shuts its socket down,
    which would also stop the others from accepting, and refuse what is
    queued for them."""
    handle = getattr(port, "socket", None)
    if handle is not None:
        handle.close()


def describe(port: IListeningPort) -> str:
    """A human form of a port's address: C{127.0.0.1:8080}, a socket path."""
    host = port.getHost()
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    name = getattr(host, "name", host)  # a Unix socket's path
    return os.fsdecode(name) if isinstance(name, bytes) else str(name)


def bind(reactor: Any, description: str, backlog: Optional[int] = None) -> IListeningPort:
    """
    Bind C{description} (C{--listen}) without accepting on it, with a
    listen C{backlog} (C{--backlog}) if given.

    @raise StartupError: the address is in use, not permitted, or invalid.
    """
    port = listen(reactor, description, NeverAccepts(), option="--listen")
    port.stopReading()
    if backlog is not None:
        set_backlog(port, backlog)
    return port


def set_backlog(port: IListeningPort, backlog: int) -> None:
    """Listen again with C{backlog}: Linux resizes the queue of a listening
    socket in place, whoever bound it (even systemd, for socket
    activation).  The kernel caps it at C{net.core.somaxconn}."""
    handle = getattr(port, "socket", None)
    if handle is not None:
        handle.listen(backlog)


def listen(reactor: Any, description: str, factory: Any, option: str) -> IListeningPort:
    """
    Listen on C{description}, given as C{option}, now.

    @raise StartupError: the address is in use, not permitted, or invalid.
    """
    from twisted.internet.endpoints import serverFromString

    endpoint = serverFromString(reactor, description)
    outcome: List[Any] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:  # pragma: no cover - every supported endpoint is synchronous
        raise StartupError(f"endpoint is asynchronous ({option} {description})")
    result = outcome[0]
    if not IListeningPort.providedBy(result):
        error = result.value
        reason = error
        if isinstance(error, CannotListenError) and isinstance(error.socketError, OSError):
            reason = error.socketError.strerror or error.socketError
        # The reason first: a daemonizing twistd shows only 100 bytes.
        raise StartupError(f"{reason} ({option} {description})")
    return result
