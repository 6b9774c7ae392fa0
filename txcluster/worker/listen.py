"""
How a worker gets its connections, in each C{--balance} mode:

- C{round-robin}: from the master, over its connection channel
  (L{txcluster.worker.receive.ConnectionReceiver});
- C{kernel}: it adopts the one listening socket every worker shares, and
  takes one connection per wakeup (L{accept_one_per_wakeup});
- C{reuseport} (and C{auto}): it accepts on a socket of its own, bound
  by the master, and keeps its fair share
  (L{txcluster.worker.accept.FairShareAcceptor}).

In the last two it also adopts what comes over its connection channel:
connections the master accepted for it (reuseport, on the socket of a
worker that is not there) or dealt to it (another worker's more than fair
share, or the idle connections of a worker that stopped)
(L{PortAndChannel}).

Either way an C{ssl:} endpoint's TLS is terminated here, in the worker, and
an C{haproxy:} endpoint's PROXY header is read here (L{wrapped}).
"""

from __future__ import annotations

import os
from typing import Any, List, Optional

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import Factory
from zope.interface import implementer

from ..ledger import LedgerSlot
from ..settings import KERNEL, REUSEPORT, ROUND_ROBIN, Settings
from ..wire import CONNECTIONS_FD, LISTEN_FD
from .accept import FairShareAcceptor
from .receive import ConnectionReceiver, address_family


def listen(reactor: Any, settings: Settings, factory: IProtocolFactory,
           slot: Optional[LedgerSlot] = None) -> IListeningPort:
    """Serve C{factory} on what the master passed this worker process
    (with reuseport, keeping the fair share C{slot} tells)."""
    serving = wrapped(reactor, factory, settings.listen)
    receiver = ConnectionReceiver(reactor, CONNECTIONS_FD, serving,
                                  on_received=slot.add_received if slot else lambda n: None)
    receiver.startListening()
    if settings.balance == ROUND_ROBIN:
        return receiver
    if settings.balance == REUSEPORT and slot is not None:  # else it adopts the port
        acceptor = FairShareAcceptor(reactor, LISTEN_FD, serving, slot,
                                     hand_on=receiver.hand_on)
        acceptor.startListening()
        return PortAndChannel(acceptor, receiver)
    try:
        port = adopt(reactor, LISTEN_FD, serving, accept_one=settings.balance == KERNEL)
    except BaseException:
        receiver.stopListening()
        raise
    finally:
        os.close(LISTEN_FD)  # adoptStreamPort made its own copy
    return PortAndChannel(port, receiver)


@implementer(IListeningPort)
class PortAndChannel:
    """A worker's listening port, and the receiver of its connection
    channel beside it: stopping stops both, and idle connections go back
    over the channel."""

    def __init__(self, port: IListeningPort, receiver: ConnectionReceiver) -> None:
        self.port = port
        self.receiver = receiver

    def startListening(self) -> None:
        """Both listen already."""

    def stopListening(self) -> Deferred:
        return gatherResults([maybeDeferred(self.port.stopListening),
                              self.receiver.stopListening()])

    def hand_back(self, fd: int) -> bool:
        return self.receiver.hand_back(fd)

    def getHost(self) -> Any:
        return self.port.getHost()


def adopt(reactor: Any, fd: int, factory: IProtocolFactory,
          accept_one: bool = False) -> IListeningPort:
    """Serve C{factory} (already L{wrapped}) on an inherited listening
    descriptor; with C{accept_one}, one connection per wakeup."""
    port = reactor.adoptStreamPort(fd, address_family(fd), factory)
    if accept_one:
        accept_one_per_wakeup(port)
    return port


def accept_one_per_wakeup(port: IListeningPort) -> None:
    """
    Make a Twisted TCP/Unix port accept one connection per reactor wakeup.

    When every worker accepts on one socket, the kernel wakes them all and
    the first to call C{accept()} wins; Twisted's port accepts up to 100+
    connections per wakeup, so one worker could drain a whole burst.
    Taking one per wakeup spreads them, as tornado and libuv did for the
    same problem.

    C{tcp.Port.doRead} accepts up to C{numberAccepts} connections and
    raises that number after every full batch.  The attribute is public in
    name but undocumented, so C{tests/test_worker_listen.py} runs a real
    port and fails if a read ever takes more than one connection.
    """
    if not hasattr(port, "numberAccepts"):  # pragma: no cover - not a tcp.Port
        return
    read = port.doRead

    def read_one() -> Any:
        port.numberAccepts = 1
        return read()

    port.doRead = read_one


class _ContextFactoryOf:
    """A reactor stand-in that an C{ssl:} endpoint listens on: it only
    keeps the TLS context factory the endpoint parsed from its description."""

    def __init__(self) -> None:
        self.found: List[Any] = []

    def listenSSL(self, port: int, factory: Any, contextFactory: Any,
                  backlog: int = 50, interface: str = "") -> None:
        self.found.append(contextFactory)


def wrapped(reactor: Any, factory: IProtocolFactory, description: str) -> Factory:
    """Wrap C{factory} as the endpoint would: C{haproxy:} in Twisted's PROXY
    protocol parser (v1 and v2; the peer is then the address the proxy
    sent), C{ssl:} in TLS."""
    if description.startswith("haproxy:"):
        from twisted.protocols.haproxy import proxyEndpoint

        inner = wrapped(reactor, factory, description[len("haproxy:"):])
        # The endpoint's public way to its wrapping factory: listen().
        recorder = _FactoryOf()
        proxyEndpoint(recorder).listen(inner)
        return recorder.found[0]
    return tls_wrapped(reactor, factory, description)


class _FactoryOf:
    """An endpoint stand-in that keeps the factory it is asked to listen with."""

    def __init__(self) -> None:
        self.found: List[Any] = []

    def listen(self, factory: Any) -> None:
        self.found.append(factory)


def tls_wrapped(reactor: Any, factory: IProtocolFactory, description: str) -> Factory:
    """For C{ssl:} endpoints, wrap the factory in TLS as the endpoint would."""
    if not description.startswith("ssl:"):
        return factory
    from twisted.internet.endpoints import serverFromString
    from twisted.protocols.tls import TLSMemoryBIOFactory

    # The endpoint's public way to its context factory: listenSSL.
    recorder = _ContextFactoryOf()
    serverFromString(recorder, description).listen(factory)
    [context_factory] = recorder.found
    return TLSMemoryBIOFactory(context_factory, False, factory)
