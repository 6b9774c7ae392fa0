"""
HTTP/2 on C{ssl:} endpoints, when Twisted's C{http2} extra (h2, priority)
is installed: ALPN offers C{h2}, and a connection that chose it is served
by Twisted's H2Connection instead of the HTTP/1.1 channel.

Twisted's own switch (C{http._GenericHTTPChannelProtocol}, what a plain
C{Site} uses) does the choosing; L{NegotiatingChannel} adds what the
worker's site needs to drain: it tells the site when a connection became
HTTP/2, and the site then drains it through L{H2Drain} (a GOAWAY, then
closing once its streams are done).  Both lean on names Twisted keeps
private (the switch, C{H2Connection.conn} and C{.streams}), and on h2's
C{highest_inbound_stream_id};
C{tests/test_http_edge.py} serves HTTP/2 through a real client and drains
it, and fails if they change.  The HTTP/1.1 limits of L{txcluster.worker.edge}
do not apply to HTTP/2, whose own frame and header limits (the h2
library's) do.
"""

from __future__ import annotations

from typing import Any

from twisted.web import http

#: While draining, how often an HTTP/2 connection is looked at again.
DRAIN_POLL_SECONDS = 0.05


def http2_available() -> bool:
    return bool(http.H2_ENABLED)


class NegotiatingChannel(http._GenericHTTPChannelProtocol):  # type: ignore[misc]
    """HTTP/1.1 (the worker's own channel) or HTTP/2, as ALPN chose."""

    def __init__(self, channel: Any, site: Any) -> None:
        super().__init__(channel)
        self._drain: Any = None
        # The switch builds its H2Connection from what was set through it.
        self.requestFactory = channel.requestFactory
        self.site = site
        self.factory = site
        self.timeOut = channel.timeOut
        self.callLater = channel.callLater

    def dataReceived(self, data: bytes) -> None:
        first = self._channel
        super().dataReceived(data)
        if self._channel is not first:  # it became HTTP/2
            first.forget()  # its timers; the site no longer drains it
            self._drain = H2Drain(self._channel)
            self.site.became_http2(first, self._drain)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        if self._drain is not None:
            self.site.channel_closed(self._drain)


class H2Drain:
    """What the site needs of an HTTP/2 connection to drain it."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    @property
    def transport(self) -> Any:
        return self.connection.transport

    @property
    def answering(self) -> bool:
        return bool(self.connection.streams)

    def close_when_idle(self) -> None:
        """GOAWAY: the client opens no new stream here; close once the
        streams in flight are answered.

        The frame is written here rather than through h2's
        C{close_connection()}, which would also close h2's side at once
        and fail the streams still being answered (the graceful shutdown
        of RFC 9113, 6.8, which h2 does not offer)."""
        from hyperframe.frame import GoAwayFrame

        connection = self.connection
        goaway = GoAwayFrame(0, last_stream_id=connection.conn.highest_inbound_stream_id,
                             error_code=0)
        connection.transport.write(goaway.serialize())
        self._close_when_done()

    def _close_when_done(self) -> None:
        if not self.connection.transport.connected:
            return
        if self.connection.streams:
            self.connection.callLater(DRAIN_POLL_SECONDS, self._close_when_done)
        else:
            self.connection.transport.loseConnection()
