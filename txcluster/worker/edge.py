"""
The HTTP edge of a worker: what a request must look like, and how long a
client may take, before the app sees anything (README.rst, "Behind a
proxy").

 - The request line and headers must be complete C{header_timeout} seconds
   after the connection opened (or, on a kept-alive connection, after the
   request's first byte), however slowly the bytes trickle in; else 408 and
   the connection is closed (also when nothing came at all).  That is what
   ends slowloris.
 - An idle kept-alive connection is closed after C{keep_alive} seconds.
 - A request line over its limit gets 414, too many or too long header
   fields 431, a body over its limit 413 (read no further), junk 400.

Each error is a complete response with C{Connection: close}, then the
connection closes; the worker goes on.
"""

from __future__ import annotations

from typing import Any, Optional

import attr
from twisted.internet.interfaces import IDelayedCall
from twisted.web import http

#: Any line longer than this is refused even with the limits off (0).
LINE_CEILING = 1 << 20


@attr.s(frozen=True, auto_attribs=True)
class EdgeLimits:
    """The C{--keep-alive}, C{--header-timeout} and C{--limit-request-*}
    settings; a limit of 0 is no limit."""

    keep_alive: float = 5.0
    header_timeout: float = 10.0
    request_line: int = 8190
    fields: int = 100
    field_size: int = 8190
    body: int = 0

    @classmethod
    def from_settings(cls, settings: Any) -> "EdgeLimits":
        return cls(keep_alive=settings.keep_alive, header_timeout=settings.header_timeout,
                   request_line=settings.limit_request_line,
                   fields=settings.limit_request_fields,
                   field_size=settings.limit_request_field_size,
                   body=settings.limit_request_body)

    @property
    def longest_line(self) -> int:
        limits = [limit for limit in (self.request_line, self.field_size) if limit]
        return max(limits) if len(limits) == 2 else LINE_CEILING


#: Initials of the forwarded headers' names, as bytes of a header line.
_FORWARDED_INITIALS = frozenset(b"xXfF")

# Twisted parses a request's head line by line through
# HTTPChannel.lineReceived (the body goes to rawDataReceived): the limits
# below count lines there, then hand each on, unbound because it is the
# method super() would find (HTTPChannel is GuardedChannel's base) and this
# runs for every line.  tests/test_worker_edge.py (TwistedInternalsTests)
# fails if the head stops coming through it, and the limits would be
# skipped silently.
_lineReceived = http.HTTPChannel.lineReceived

#: status line of each error this module answers
STATUS = {
    400: b"400 Bad Request",
    408: b"408 Request Timeout",
    413: b"413 Content Too Large",
    414: b"414 URI Too Long",
    431: b"431 Request Header Fields Too Large",
}


def error_response(code: int) -> bytes:
    reason = STATUS[code]
    body = reason[4:] + b"\n"
    return (b"HTTP/1.1 " + reason + b"\r\nConnection: close\r\n"
            b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


class GuardedChannel(http.HTTPChannel):
    """An L{HTTPChannel} that applies its site's L{EdgeLimits}."""

    site: Any
    limits: EdgeLimits = EdgeLimits()
    _deadline: Optional[IDelayedCall] = None
    _deadline_at = 0.0
    _waiting_for = ""  # "headers", "next request", or nothing
    _in_head = False  # between a request line and the end of its headers
    _fields = 0
    _refused = False
    #: the request has a header starting with x or f (X-Forwarded-*, Forwarded)
    maybe_forwarded = False

    def connectionMade(self) -> None:
        self.limits = limits = self.site.limits
        self._request_line = limits.request_line or LINE_CEILING
        self._field_size = limits.field_size or LINE_CEILING
        self._max_fields = limits.fields or LINE_CEILING
        self.MAX_LENGTH = limits.longest_line
        self.maxHeaders = self._max_fields  # Twisted's own limits, out of the way
        self.totalHeadersSize = LINE_CEILING * 2
        super().connectionMade()
        self._expect("headers", self.limits.header_timeout)

    @property
    def trusted_peer(self) -> Optional[str]:
        """This connection's peer address, if its forwarded headers are
        believed (C{--forwarded-allow-ips}); worked out once."""
        try:
            return self._trusted_peer
        except AttributeError:
            self._trusted_peer: Optional[str] = self.site.trusted_proxies.believed(
                self.transport.getPeer())
            return self._trusted_peer

    @property
    def answering(self) -> bool:
        """Is a request of this connection with the app now?"""
        # HTTPChannel._handlingRequest: private, but a documented ivar, True
        # from a request's last byte until its response is finished.  Were it
        # wrong, shedding (ClusterSite) could abort a connection mid-answer;
        # TwistedInternalsTests fails if it changes meaning.
        return bool(self._handlingRequest)

    # Timers -------------------------------------------------------------------
    # One deadline per connection, kept as a number: moving it costs no
    # reactor call.  One timer chases it, re-armed when it fires early.

    def _expect(self, what: str, seconds: float) -> None:
        self._waiting_for = what
        self._deadline_at = self.site.reactor.seconds() + seconds
        timer = self._deadline
        if timer is None:
            self._deadline = self.callLater(seconds, self._check_deadline)
        elif timer.getTime() > self._deadline_at:
            timer.reset(seconds)

    def _cancel_deadline(self) -> None:
        self._waiting_for = ""  # the timer, if any, finds nothing to do

    def _check_deadline(self) -> None:
        self._deadline = None
        if not self._waiting_for:
            return
        remaining = self._deadline_at - self.site.reactor.seconds()
        if remaining > 0:
            self._deadline = self.callLater(remaining, self._check_deadline)
        else:
            self._too_late()

    def _too_late(self) -> None:
        if self._waiting_for == "headers":  # a new connection, or a request begun
            self.refuse(408)
        else:  # idle between two requests: closed without a word (RFC 9112, 9.6)
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._waiting_for == "next request":
            self._expect("headers", self.limits.header_timeout)
        super().dataReceived(data)

    def timeoutConnection(self) -> None:
        """Twisted's idle timer: here, a body that stopped coming."""
        # Not while answering (HTTPChannel._handlingRequest, see answering).
        if self.requests and not self._handlingRequest:
            self.refuse(408)
        else:
            self.transport.loseConnection()

    def requestDone(self, request: Any) -> None:
        # Before Twisted replays what came after this request (which may be
        # the next one's start), so that the replay restarts the clock.
        if self.limits.keep_alive:
            self._expect("next request", self.limits.keep_alive)
        super().requestDone(request)

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        if not self.limits.keep_alive:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return super().checkPersistence(request, version)

    def connectionLost(self, reason: Any) -> None:
        self.forget()
        super().connectionLost(reason)

    def forget(self) -> None:
        """Stop every timer: the connection is gone, or is another
        protocol's now (HTTP/2)."""
        self._cancel_deadline()
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    # Limits -------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        # Every line of every request comes here: kept lean.
        if self._in_head:
            if line:
                if len(line) > self._field_size:
                    return self.refuse(431)
                first = line[0]
                if first != 32 and first != 9:  # not a continuation line
                    self._fields += 1
                    if self._fields > self._max_fields:
                        return self.refuse(431)
                    if first in _FORWARDED_INITIALS:
                        self.maybe_forwarded = True
        elif line:  # (an empty line before a request is tolerated)
            if len(line) > self._request_line:
                return self.refuse(414)
            self._in_head, self._fields, self.maybe_forwarded = True, 0, False
        _lineReceived(self, line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._in_head:
            self.refuse(431)
        elif line.split(b" ", 1)[0].isalpha():  # a method, then a long target
            self.refuse(414)
        else:
            self.refuse(400)

    def allHeadersReceived(self) -> None:
        self._in_head = False
        self._cancel_deadline()
        super().allHeadersReceived()
        # HTTPChannel.length (undocumented): the Content-Length just read,
        # None if chunked.  Were it to mean something else, a body declared
        # over the limit would be read (up to the limit) before its 413
        # (body_received); TwistedInternalsTests fails then.
        if self.limits.body and self.length is not None and self.length > self.limits.body:
            self.refuse(413)

    def body_received(self, length: int) -> None:
        """A request has read C{length} bytes of its body so far."""
        if self.limits.body and length > self.limits.body:
            self.refuse(413)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # HTTPChannel's private hook, called for every malformed request; its
        # own answer is a bare 400 without Connection: close.  Were it renamed,
        # junk would get that one; TwistedInternalsTests fails then.
        self.refuse(400)

    def refuse(self, code: int) -> None:
        """Answer C{code} with C{Connection: close}, read nothing more, close."""
        self._cancel_deadline()
        self._in_head = False
        if self._refused or self.transport.disconnecting:
            return
        self._refused = True
        # A chunked body refused midway still ends: nothing is to run then.
        self.allContentReceived = lambda: None  # type: ignore[method-assign]
        self.transport.write(error_response(code))
        self.setRawMode()
        self.rawDataReceived = lambda data: None  # type: ignore[method-assign]
        self.lineReceived = lambda line: None  # type: ignore[method-assign]
        self.transport.loseConnection()
