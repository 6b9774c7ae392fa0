"""
The HTTP side of a worker: a L{Site} that can drain.

Draining means: close idle keep-alive connections now, answer every request
already in flight with C{Connection: close}, and report when the last
connection is gone.  The listening port is stopped separately (before the
drain) by the worker.

A connection accepted but not yet read from is not idle: its client has
most likely sent a request that is still in the socket buffer.  It gets
L{FRESH_CONNECTION_GRACE} seconds to show it, and is answered with
C{Connection: close}; closing it at once would fail that request.

With C{--cpu-affinity}, a keep-alive connection whose client has moved to
another worker's CPU is also answered with C{Connection: close}, so that it
reconnects there (L{txcluster.worker.locality.Locality}).
"""

from __future__ import annotations

import json
import os
import resource
import socket
from typing import Any, Callable, Dict, List, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from twisted.logger import Logger

from ..forwarded import SCHEMES, TrustedProxies, forwarded_by_trusted
from .access_log import AccessLog
from .edge import EdgeLimits, GuardedChannel
from .h2 import NegotiatingChannel
from .locality import Locality
from .stats import RequestStats


#: How long a connection that has sent nothing yet may take to send its
#: first request once draining has begun.
FRESH_CONNECTION_GRACE = 1.0

#: While draining, how often a connection whose response is still being
#: written is looked at again, to hand it back once it is out.
FLUSH_POLL_SECONDS = 0.005


#: Descriptors kept for everything but connections: files, Redis, the
#: channel to the master, the app's own.
SPARE_DESCRIPTORS = 64

log = Logger(namespace="txcluster.worker")


def connection_limit() -> int:
    """How many connections a worker keeps open at most: its open-files
    limit (which the master raised to the hard one) less a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(soft - SPARE_DESCRIPTORS, 16)

#: hand_back(fd) gives a connection to the master: True if it took it.
HandBack = Callable[[int], bool]


def unsent_bytes(transport: Any) -> int:
    """How many bytes Twisted still has to write on C{transport}.  Read from
    C{abstract.FileDescriptor}'s buffers, which have no public accessor;
    C{tests/test_worker_site.py} fails if they change, and an unknown
    transport counts as having some (so it is never handed back)."""
    try:
        return (len(transport.dataBuffer) - transport.offset) + transport._tempDataLen
    except AttributeError:
        return 1


class DrainableChannel(GuardedChannel):
    """An HTTP/1.1 channel that stops keeping alive once its site drains,
    or once its client has moved to another worker's CPU (and keeps to the
    site's limits, L{GuardedChannel})."""

    site: "ClusterSite"
    requests_started = 0

    def checkPersistence(self, request, version) -> bool:
        # Called once per request, when its headers are in.
        self.requests_started += 1
        draining = self.site.draining and self.site.hand_back is None
        if draining or self._client_moved():
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return super().checkPersistence(request, version)

    def _client_moved(self) -> bool:
        locality = self.site.locality
        return locality is not None and locality.should_reconnect(
            self.transport.getHandle(), self.requests_started)

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self.site.channel_closed(self)

    def close_when_idle(self) -> None:
        """Close now if idle, else after the response in flight (or, for a
        connection that has sent nothing yet, after its first request).

        With the site's C{hand_back} (plain TCP, any balance mode), a connection
        between two requests is handed back to the master instead, which
        passes it on to another worker: the client's next request is
        answered there, and never meets a connection closed under it."""
        if self.site.hand_back is not None:
            if not self.requests:  # idle, or its last response is being written
                self._leave()
            return  # else handed back once its response is out (requestDone)
        if not self.requests:
            if self.requests_started:
                self.transport.loseConnection()
            else:
                self.callLater(FRESH_CONNECTION_GRACE, self._close_if_still_silent)
            return
        self.persistent = False
        for request in self.requests:
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def _partial_request(self) -> bool:
        """Has part of a next request been read already?  (Put back as it was.)"""
        pending = self.clearLineBuffer()
        if pending:
            self.dataReceived(pending)
        return bool(pending)

    def _hand_back(self, hand_back: HandBack) -> bool:
        """Give this idle, flushed connection's socket to the master, and
        forget it here without closing it for the client; False if the
        master cannot take it."""
        transport = self.transport
        fd = transport.fileno()
        transport.stopReading()
        transport.stopWriting()
        if not hand_back(fd):
            return False
        # The master has its own copy now.  Twisted closes a connection
        # with shutdown(), which would end it for the client too, so the
        # descriptor number is pointed at a socket of no consequence first;
        # then the transport is told it is gone.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as placeholder:
            os.dup2(placeholder.fileno(), fd)
        self.site.handed_back += 1
        transport.connectionLost(Failure(ConnectionDone("handed back to the master")))
        return True

    def requestDone(self, request) -> None:
        super().requestDone(request)
        if self.site.draining and self.site.hand_back is not None and not self.requests:
            self._leave()

    def _leave(self) -> None:
        """Draining, between two requests: read nothing more here (the
        client's next request stays in the socket, and goes with it to the
        worker it is handed to), and hand the connection back once the
        last response is written."""
        self.transport.pauseProducing()
        self._leave_when_flushed()

    def _leave_when_flushed(self) -> None:
        if self.requests or not self.transport.connected:
            return  # a pipelined request started, or the client left
        if unsent_bytes(self.transport):
            self.callLater(FLUSH_POLL_SECONDS, self._leave_when_flushed)
            return
        if self._partial_request():  # finish reading it here: handed back after it
            self.transport.resumeProducing()
            return
        hand_back = self.site.hand_back
        if hand_back is None or not self._hand_back(hand_back):
            self.transport.loseConnection()  # the master cannot take it

    def _close_if_still_silent(self) -> None:
        if not self.requests and not self.requests_started and self.transport.connected:
            self.transport.loseConnection()


class TimedRequest(Request):
    """A request that knows when its first line arrived, believes the
    forwarded headers of a trusted proxy, and keeps its body to the limit."""

    _forwarded_secure: Optional[bool] = None
    _body_length = 0

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.received_at: float = channel.site.reactor.seconds()

    def handleContentChunk(self, data: bytes) -> None:
        self._body_length += len(data)
        limit = getattr(self.channel, "body_received", None)  # not on HTTP/2 streams
        if limit is not None:
            limit(self._body_length)
            if self.channel.transport.disconnecting:
                return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if getattr(self.channel, "maybe_forwarded", True):
            self._believe_the_proxy()
        super().requestReceived(command, path, version)

    def _believe_the_proxy(self) -> None:
        """C{--forwarded-allow-ips}: the client and scheme a trusted proxy
        forwarded become this request's (getClientAddress, isSecure, the
        access log)."""
        trusted = self.channel.site.trusted_proxies
        host = (self.channel.trusted_peer if hasattr(self.channel, "trusted_peer")
                else trusted.believed(self.client))  # (an HTTP/2 stream's channel)
        if host is None:
            return
        headers = self.requestHeaders

        def values(name: str) -> List[str]:
            raw = headers.getRawHeaders(name.encode())
            return [value.decode("latin-1") for value in raw] if raw else []

        hop = forwarded_by_trusted(host, values, trusted)
        if hop is None:
            return
        if hop.host != host:
            kind = IPv6Address if ":" in hop.host else IPv4Address
            self.client = kind("TCP", hop.host, 0)
        if hop.scheme is not None:
            self._forwarded_secure = SCHEMES[hop.scheme]

    def isSecure(self) -> bool:
        if self._forwarded_secure is not None:
            return self._forwarded_secure
        return super().isSecure()


class HealthCheck(Resource):
    """C{--health}: 200 C{{"status": "ok", "worker": ID}}, or 503 with
    C{"draining"} once the worker is on its way out, so that a load
    balancer stops sending it new clients first."""

    isLeaf = True

    def __init__(self, site: "ClusterSite", worker_id: int) -> None:
        super().__init__()
        self._site = site
        self._worker_id = worker_id

    def render(self, request: Any) -> bytes:
        leaving = self._site.leaving or self._site.draining
        request.setResponseCode(503 if leaving else 200)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps({"status": "draining" if leaving else "ok",
                           "worker": self._worker_id}).encode()


class ClusterSite(Site):
    """
    A L{Site} that tracks its connections so it can drain them, times its
    requests, and writes an access log only when asked to.

    @param access_log: where each request is logged, if anywhere.
    @param locality: with C{--cpu-affinity}, this worker's CPUs.
    """

    protocol = DrainableChannel
    requestFactory = TimedRequest
    noisy = False

    def __init__(
        self, resource: IResource, reactor: IReactorTime,
        access_log: Optional[AccessLog] = None, locality: Optional[Locality] = None,
        stats: Optional[RequestStats] = None, health: str = "", worker_id: int = 1,
        limits: EdgeLimits = EdgeLimits(),
        trusted_proxies: TrustedProxies = TrustedProxies.parse("127.0.0.1"),
        max_connections: Optional[int] = None, http2: bool = False,
        on_connections: Callable[[int], None] = lambda open: None,
    ) -> None:
        # Twisted's idle timer (reset by every byte) ends a body that stops
        # coming; the edge's own timers end the rest, and come first.
        super().__init__(resource, reactor=reactor,
                         timeout=max(limits.header_timeout, limits.keep_alive) + 1)
        self.limits = limits
        self.trusted_proxies = trusted_proxies
        #: offer HTTP/2 through ALPN (C{ssl:} endpoints, h2 installed)
        self.http2 = http2
        #: answered in front of the app (C{--health}); b"": off
        self.health_path = health.encode()
        self._health = HealthCheck(self, worker_id)
        #: on its way out (C{--shutdown-delay}): health checks answer 503,
        #: requests are still served
        self.leaving = False
        self.locality = locality
        self.draining = False
        #: open connections, oldest first
        self.channels: Dict[DrainableChannel, None] = {}
        #: at most this many, then the oldest idle ones make room
        self.max_connections = connection_limit() if max_connections is None else max_connections
        self.shed = 0
        self._drained: Optional[Deferred] = None
        self.access_log = access_log
        #: while draining, how idle connections go back to the master
        self.hand_back: Optional[HandBack] = None
        self.handed_back = 0
        self.stats = RequestStats() if stats is None else stats
        #: told how many connections are open, whenever that changes
        #: (reuseport: the worker's load in L{txcluster.ledger})
        self._on_connections = on_connections

    def getResourceFor(self, request: Any) -> IResource:
        if self.health_path and request.path == self.health_path:
            return self._health
        return super().getResourceFor(request)

    def buildProtocol(self, addr) -> Any:
        if len(self.channels) >= self.max_connections:
            self._make_room()
        channel = super().buildProtocol(addr)
        self.channels[channel] = None
        self._on_connections(len(self.channels))
        if self.http2:
            return NegotiatingChannel(channel, self)
        return channel

    def became_http2(self, channel: DrainableChannel, drain: Any) -> None:
        """A connection chose HTTP/2: drain it as such from now on (it is
        L{channel_closed} with C{drain} when it ends)."""
        self.channels.pop(channel, None)
        self.channels[drain] = None

    def _make_room(self) -> None:
        """Out of descriptors soon: drop the oldest connection that is not
        being answered (idle, or still sending its headers), rather than
        fail the new client.  Slowloris connections are the oldest."""
        for channel in self.channels:
            if not channel.answering:
                channel.transport.abortConnection()
                self.channels.pop(channel, None)
                self.shed += 1
                if self.shed == 1 or self.shed % 1000 == 0:
                    log.warn("{shed} idle connections dropped so far to make room for new "
                             "ones: {limit} open (the open-files limit, less a reserve)",
                             shed=self.shed, limit=self.max_connections)
                return

    def channel_closed(self, channel: DrainableChannel) -> None:
        self.channels.pop(channel, None)
        self._on_connections(len(self.channels))
        if self._drained is not None and not self.channels:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def drain(self, hand_back: Optional[HandBack] = None) -> Deferred:
        """Stop keeping alive; fires when the last connection has closed
        (or, with C{hand_back}, been handed back to the master)."""
        self.draining = True
        if not self.channels:
            return succeed(None)
        self._drained = drained = Deferred()  # fired as the last one closes,
        self.hand_back = hand_back  # which may be within this loop
        if hand_back is not None:
            drained.addCallback(self._report_handed_back, len(self.channels))
        for channel in list(self.channels):
            channel.close_when_idle()
        return drained

    def _report_handed_back(self, result: Any, open: int) -> Any:
        log.info("drained: {handed} of {open} connections handed back to the master",
                 handed=self.handed_back, open=open)
        return result

    def abort(self) -> None:
        """Drop every connection still open (the drain took too long)."""
        for channel in list(self.channels):
            channel.transport.abortConnection()

    # Access log -------------------------------------------------------------
    # HTTPFactory's startFactory/stopFactory only open and close its own
    # log file, and its log() writes to the legacy log unless given a path;
    # this class has its own access log instead, so it does not call them.

    def startFactory(self) -> None:
        if self.access_log is not None:
            self.access_log.open()

    def stopFactory(self) -> None:
        if self.access_log is not None:
            self.access_log.close()

    def reopen_access_log(self) -> None:
        if self.access_log is not None:
            self.access_log.reopen()

    def log(self, request: TimedRequest) -> None:
        """Called by Twisted when a request has been answered."""
        duration = self.reactor.seconds() - request.received_at
        self.stats.record(request.code, duration)
        if self.access_log is not None:
            self.access_log.write(request, duration)
