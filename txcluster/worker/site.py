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

from typing import Any, Optional, Set

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from .access_log import AccessLog
from .locality import Locality
from .stats import RequestStats


#: How long a connection that has sent nothing yet may take to send its
#: first request once draining has begun.
FRESH_CONNECTION_GRACE = 1.0


class DrainableChannel(http.HTTPChannel):
    """An HTTP/1.1 channel that stops keeping alive once its site drains,
    or once its client has moved to another worker's CPU."""

    site: "ClusterSite"
    requests_started = 0

    def checkPersistence(self, request, version) -> bool:
        # Called once per request, when its headers are in.
        self.requests_started += 1
        if self.site.draining or self._client_moved():
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
        connection that has sent nothing yet, after its first request)."""
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

    def _close_if_still_silent(self) -> None:
        if not self.requests and not self.requests_started and self.transport.connected:
            self.transport.loseConnection()


class TimedRequest(Request):
    """A request that knows when its first line arrived."""

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.received_at: float = channel.site.reactor.seconds()


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
        stats: Optional[RequestStats] = None,
    ) -> None:
        super().__init__(resource, reactor=reactor)
        self.locality = locality
        self.draining = False
        self.channels: Set[DrainableChannel] = set()
        self._drained: Optional[Deferred] = None
        self.access_log = access_log
        self.stats = RequestStats() if stats is None else stats

    def buildProtocol(self, addr) -> DrainableChannel:
        channel = super().buildProtocol(addr)
        self.channels.add(channel)
        return channel

    def channel_closed(self, channel: DrainableChannel) -> None:
        self.channels.discard(channel)
        if self._drained is not None and not self.channels:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def drain(self) -> Deferred:
        """Stop keeping alive; fires when the last connection has closed."""
        self.draining = True
        if not self.channels:
            return succeed(None)
        self._drained = Deferred()
        for channel in list(self.channels):
            channel.close_when_idle()
        return self._drained

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
