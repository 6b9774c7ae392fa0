"""
The listening socket: bound once by the master, adopted by every worker.

The master binds through Twisted's own endpoint parser (so every endpoint
type works), then stops reading at once: it never accepts.  It also never
calls C{stopListening} on that port, because a C{listenTCP} port
C{shutdown()}s its socket, which would refuse connections for every worker
sharing it; the master's copy is simply closed when the master exits.
Workers adopt the inherited descriptor with C{adoptStreamPort}, whose ports
only C{close()} their own copy.

With C{--balance reuseport} the master binds one socket per worker instead
(L{txcluster.reuseport}).
"""

from __future__ import annotations

import os
import socket
from typing import Any, List

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import Factory, ServerFactory


class StartupError(Exception):
    """Starting failed for a reason a user can fix; the message says which."""


class NeverAccepts(ServerFactory):
    """The master's factory: its port never reads, so this never builds."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


def describe(port: IListeningPort) -> str:
    """A human form of a port's address: C{127.0.0.1:8080}, a socket path."""
    host = port.getHost()
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    name = getattr(host, "name", host)  # a Unix socket's path
    return os.fsdecode(name) if isinstance(name, bytes) else str(name)


def bind(reactor: Any, description: str) -> IListeningPort:
    """
    Bind C{description} without accepting on it.

    @raise StartupError: the address is in use, not permitted, or invalid.
    """
    from twisted.internet.endpoints import serverFromString

    endpoint = serverFromString(reactor, description)
    outcome: List[Any] = []
    endpoint.listen(NeverAccepts()).addBoth(outcome.append)
    if not outcome:  # pragma: no cover - every supported endpoint is synchronous
        raise StartupError(f"endpoint is asynchronous (--listen {description})")
    result = outcome[0]
    if not IListeningPort.providedBy(result):
        error = result.value
        reason = error
        if isinstance(error, CannotListenError) and isinstance(error.socketError, OSError):
            reason = error.socketError.strerror or error.socketError
        # The reason first: a daemonizing twistd shows only 100 bytes.
        raise StartupError(f"{reason} (--listen {description})")
    result.stopReading()
    return result


def adopt(
    reactor: Any, fd: int, factory: IProtocolFactory, description: str,
    accept_one: bool = False,
) -> IListeningPort:
    """Serve C{factory} on an inherited listening descriptor; with
    C{accept_one}, one connection per wakeup (see L{txcluster.balancing})."""
    port = reactor.adoptStreamPort(fd, address_family(fd), tls_wrapped(reactor, factory, description))
    if accept_one:
        from .balancing import accept_one_per_wakeup

        accept_one_per_wakeup(port)
    return port


def address_family(fd: int) -> socket.AddressFamily:
    """The address family of a socket descriptor."""
    probe = socket.socket(fileno=fd)
    try:
        return probe.family
    finally:
        probe.detach()


def tls_wrapped(reactor: Any, factory: IProtocolFactory, description: str) -> Factory:
    """For C{ssl:} endpoints, wrap the factory in TLS like the endpoint would."""
    if not description.startswith("ssl:"):
        return factory
    from twisted.internet.endpoints import serverFromString
    from twisted.protocols.tls import TLSMemoryBIOFactory

    endpoint = serverFromString(reactor, description)
    # SSL4ServerEndpoint keeps the context factory it parsed from the
    # description; it has no public accessor.
    return TLSMemoryBIOFactory(endpoint._sslContextFactory, False, factory)
