"""
The HTTP edge on a fake clock and transport: header and keep-alive
timeouts, request limits, and forwarded headers from trusted proxies.
"""

import re

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from txcluster.forwarded import Hop, TrustedProxies, forwarded_client
from txcluster.worker.edge import EdgeLimits, GuardedChannel, error_response
from txcluster.worker.site import ClusterSite


class Echo(Resource):
    """Answers with what it saw: client address, scheme, and body size."""

    isLeaf = True

    def render(self, request):
        client = request.getClientAddress()
        body = request.content.read()
        return (f"{client.host} {'https' if request.isSecure() else 'http'} "
                f"{len(body)}").encode()


def site(clock=None, trusted="127.0.0.1", **limits):
    return ClusterSite(Echo(), clock or Clock(), limits=EdgeLimits(**limits),
                       trusted_proxies=TrustedProxies.parse(trusted))


def connect(site, peer=("127.0.0.1", 40000)):
    channel = site.buildProtocol(None)
    address = (IPv6Address if ":" in peer[0] else IPv4Address)("TCP", *peer)
    transport = StringTransport(peerAddress=address)
    channel.makeConnection(transport)
    return channel, transport


def statuses(transport):
    return [int(code) for code in re.findall(rb"HTTP/1.1 (\d{3}) ", transport.value())]


def status(transport):
    """The status of the last response."""
    return (statuses(transport) or [None])[-1]


REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class TimeoutTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.site = site(self.clock, keep_alive=5, header_timeout=10)

    def test_headers_trickling_in_are_cut_off_from_the_connections_start(self):
        channel, transport = connect(self.site)
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\n":  # a byte a second
            channel.dataReceived(bytes([byte]))
            self.clock.advance(1)
            if transport.disconnecting:
                break
        self.assertEqual(self.clock.seconds(), 10)
        self.assertEqual(status(transport), 408)
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_a_connection_that_says_nothing_gets_408_too(self):
        channel, transport = connect(self.site)
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(status(transport), 408)

    def test_an_idle_kept_alive_connection_closes_after_keep_alive(self):
        channel, transport = connect(self.site)
        channel.dataReceived(REQUEST)
        self.assertEqual(status(transport), 200)
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(statuses(transport), [200])  # closed without a word

    def test_the_next_request_gets_the_header_timeout_from_its_first_byte(self):
        channel, transport = connect(self.site)
        channel.dataReceived(REQUEST)
        self.clock.advance(3)
        channel.dataReceived(b"GET / HT")
        self.clock.advance(9)  # past keep-alive, not yet the header timeout
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"TP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value().count(b"200 OK"), 2)
        self.clock.advance(1)
        self.assertFalse(transport.disconnecting)

    def test_keep_alive_0_closes_after_each_response(self):
        channel, transport = connect(site(self.clock, keep_alive=0))
        channel.dataReceived(REQUEST)
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_a_body_that_stops_coming_gets_408(self):
        channel, transport = connect(self.site)
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        self.clock.advance(11)
        self.assertEqual(status(transport), 408)


class LimitTests(unittest.TestCase):
    """Each bad request, and the status it gets; the worker goes on."""

    CASES = [
        # (what, request, status)
        ("a good request", REQUEST, (200,)),
        ("a malformed request line", b"GET\r\nHost: x\r\n\r\n", 400),
        ("a request line over the limit", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        ("a long line without its end", b"GET /" + b"a" * 9000, 414),
        ("a 1 MB header", b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 2 ** 20 + b"\r\n\r\n", 431),
        ("10,000 header fields",
         b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(10000)) + b"\r\n",
         431),
        ("a body over the limit",
         b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + b"a" * 2000, 413),
        ("a chunked body over the limit",
         b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         + b"400\r\n" + b"a" * 1024 + b"\r\n" + b"400\r\n" + b"a" * 1024 + b"\r\n0\r\n\r\n", 413),
        ("a body longer than its Content-Length (the rest is no request)",
         b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcdef\r\n\r\n", (200, 400)),
        ("a bad Content-Length", b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        ("8 KB of binary junk", bytes(range(256)) * 32, 400),
    ]

    def test_each_bad_request_gets_its_status(self):
        for what, request, expected in self.CASES:
            channel, transport = connect(site(body=1024))
            channel.dataReceived(request)
            expected = expected if isinstance(expected, tuple) else (expected,)
            self.assertEqual(tuple(statuses(transport)), expected, what)
            self.assertEqual(transport.disconnecting, expected[-1] != 200, what)

    def test_limits_off(self):
        channel, transport = connect(site(request_line=0, fields=0, field_size=0))
        channel.dataReceived(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n"
                             + b"".join(b"X-%d: 1\r\n" % i for i in range(600)) + b"\r\n")
        self.assertEqual(status(transport), 200)

    def test_a_body_at_the_limit_is_read(self):
        channel, transport = connect(site(body=5))
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde")
        self.assertTrue(transport.value().endswith(b"127.0.0.1 http 5"))


class RecordingChannel(http.HTTPChannel):
    """Twisted's own channel, noting what the edge relies on of it."""

    def __init__(self):
        super().__init__()
        self.lines, self.lengths, self.bad_requests = [], [], 0

    def lineReceived(self, line):
        self.lines.append(line)
        super().lineReceived(line)

    def allHeadersReceived(self):
        super().allHeadersReceived()
        self.lengths.append(self.length)

    def _respondToBadRequestAndDisconnect(self):
        self.bad_requests += 1
        super()._respondToBadRequestAndDisconnect()


class Pending(Resource):
    """Answers nothing until the test finishes the request."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        return NOT_DONE_YET


class TwistedInternalsTests(unittest.TestCase):
    """The private and undocumented names of Twisted's HTTPChannel that
    txcluster.worker.edge uses, with the meaning it relies on: a Twisted
    that changes one fails here."""

    def connect_twisted(self):
        channel = RecordingChannel()
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_the_names_are_there(self):
        for name in ("_respondToBadRequestAndDisconnect", "lineReceived", "allHeadersReceived"):
            self.assertTrue(callable(getattr(http.HTTPChannel, name, None)), name)
        channel, _ = self.connect_twisted()
        self.assertIs(channel._handlingRequest, False)
        # the unbound lineReceived that GuardedChannel calls is super()'s
        self.assertEqual(GuardedChannel.__bases__, (http.HTTPChannel,))

    def test_respondToBadRequestAndDisconnect_answers_a_malformed_request(self):
        channel, transport = self.connect_twisted()
        channel.dataReceived(b"GET\r\nHost: x\r\n\r\n")
        self.assertEqual(channel.bad_requests, 1)
        self.assertTrue(transport.disconnecting)
        ours, transport = connect(site())
        ours.dataReceived(b"GET\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value(), error_response(400))  # with Connection: close
        self.assertTrue(transport.disconnecting)

    def test_the_head_comes_line_by_line_through_lineReceived(self):
        channel, _ = self.connect_twisted()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        self.assertEqual(channel.lines,
                         [b"POST / HTTP/1.1", b"Host: x", b"Content-Length: 3", b""])

    def test_length_is_the_declared_body_length_once_the_headers_are_in(self):
        channel, _ = self.connect_twisted()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        channel.requests[-1].finish()
        channel.dataReceived(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(channel.lengths, [3, None])
        # so a body declared over the limit is refused before a byte of it
        ours, transport = connect(site(body=1024))
        ours.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n")
        self.assertEqual(status(transport), 413)

    def test_handlingRequest_is_true_while_a_request_is_answered(self):
        channel, _ = self.connect_twisted()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x")
        self.assertIs(channel._handlingRequest, False)  # not all in yet
        channel.dataReceived(b"\r\n\r\n")
        self.assertIs(channel._handlingRequest, True)
        channel.requests[-1].finish()
        self.assertIs(channel._handlingRequest, False)
        # and so is our channel's answering
        pending = Pending()
        ours, transport = connect(ClusterSite(pending, Clock()))
        self.assertFalse(ours.answering)
        ours.dataReceived(REQUEST)
        self.assertTrue(ours.answering)
        pending.requests[0].finish()
        self.assertEqual(status(transport), 200)
        self.assertFalse(ours.answering)


class ForwardedTests(unittest.TestCase):
    def answer(self, headers, peer="127.0.0.1", trusted="127.0.0.1"):
        channel, transport = connect(site(trusted=trusted), (peer, 40000))
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n"
                             + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode())
                                        for k, v in headers) + b"\r\n")
        return transport.value().rsplit(b"\r\n", 1)[1].decode()

    def test_a_trusted_proxy_sets_the_client_and_the_scheme(self):
        self.assertEqual(self.answer([("X-Forwarded-For", "203.0.113.7"),
                                      ("X-Forwarded-Proto", "https")]), "203.0.113.7 https 0")

    def test_what_a_client_wrote_on_the_left_is_not_believed(self):
        self.assertEqual(self.answer([("X-Forwarded-For", "1.1.1.1, 203.0.113.7")]),
                         "203.0.113.7 http 0")

    def test_an_untrusted_peer_changes_nothing(self):
        self.assertEqual(self.answer([("X-Forwarded-For", "203.0.113.7"),
                                      ("X-Forwarded-Proto", "https")], peer="198.51.100.1"),
                         "198.51.100.1 http 0")

    def test_rfc_7239_forwarded_with_ipv6(self):
        self.assertEqual(self.answer([("Forwarded", 'for="[2001:db8::17]:4711";proto=https')]),
                         "2001:db8::17 https 0")

    def test_networks_and_everyone(self):
        headers = [("X-Forwarded-For", "203.0.113.7")]
        self.assertEqual(self.answer(headers, peer="10.1.2.3", trusted="10.0.0.0/8"),
                         "203.0.113.7 http 0")
        self.assertEqual(self.answer(headers, peer="192.0.2.9", trusted="*"),
                         "203.0.113.7 http 0")
        self.assertEqual(self.answer(headers, peer="::1", trusted="::1"), "203.0.113.7 http 0")


class ForwardedChainTests(unittest.TestCase):
    """L{forwarded_client}'s edge cases, as uvicorn and gunicorn have them."""

    trusted = TrustedProxies.parse("127.0.0.1, 10.0.0.0/8, fd00::/8")

    def client(self, peer="127.0.0.1", **headers):
        def values(name):
            value = headers.get(name.replace("-", "_"))
            return [value] if value is not None else []
        return forwarded_client(peer, values, self.trusted)

    def test_several_hops_the_rightmost_untrusted_is_the_client(self):
        # a client-supplied 1.1.1.1 on the left is not believed
        self.assertEqual(self.client(x_forwarded_for="1.1.1.1, 203.0.113.7, 10.0.0.2"),
                         Hop("203.0.113.7"))

    def test_every_hop_trusted_the_leftmost_is_the_client(self):
        self.assertEqual(self.client(x_forwarded_for="10.0.0.5, 10.0.0.2"), Hop("10.0.0.5"))

    def test_ports_brackets_and_unknown(self):
        self.assertEqual(self.client(x_forwarded_for="[2001:db8::1]:443"), Hop("2001:db8::1"))
        self.assertEqual(self.client(x_forwarded_for="203.0.113.7:5555"), Hop("203.0.113.7"))
        self.assertEqual(self.client(forwarded="for=unknown"), Hop("unknown"))

    def test_ipv4_mapped_peer_and_trusted_ipv6_network(self):
        self.assertEqual(self.client(peer="::ffff:10.0.0.1", x_forwarded_for="203.0.113.7"),
                         Hop("203.0.113.7"))
        self.assertEqual(self.client(peer="fd00::1", x_forwarded_for="203.0.113.7"),
                         Hop("203.0.113.7"))

    def test_proto_per_hop_or_the_nearest_proxys(self):
        self.assertEqual(self.client(x_forwarded_for="203.0.113.7, 10.0.0.2",
                                     x_forwarded_proto="https, http"), Hop("203.0.113.7", "https"))
        self.assertEqual(self.client(x_forwarded_for="203.0.113.7, 10.0.0.2",
                                     x_forwarded_proto="https"), Hop("203.0.113.7", "https"))
        self.assertEqual(self.client(x_forwarded_proto="https"), Hop("127.0.0.1", "https"))
        self.assertEqual(self.client(x_forwarded_proto="gopher"), Hop("127.0.0.1", None))

    def test_forwarded_wins_and_is_parsed_with_quotes(self):
        self.assertEqual(self.client(forwarded='for=203.0.113.7;proto=https, for="10.0.0.2"',
                                     x_forwarded_for="198.51.100.1"),
                         Hop("203.0.113.7", "https"))
        self.assertEqual(self.client(forwarded='For="[2001:db8:cafe::17]:4711"'),
                         Hop("2001:db8:cafe::17"))

    def test_untrusted_peer_or_no_header(self):
        self.assertIsNone(self.client(peer="203.0.113.9", x_forwarded_for="1.1.1.1"))
        self.assertIsNone(self.client())

    def test_the_list_is_checked(self):
        self.assertEqual(str(TrustedProxies.parse(" 10.0.0.1/8 , ::1")), "10.0.0.0/8,::1/128")
        with self.assertRaises(ValueError) as raised:
            TrustedProxies.parse("10.0.0.0/8,proxy.local")
        self.assertIn("'proxy.local' is not an IP address or network", str(raised.exception))


class SheddingTests(unittest.TestCase):
    def test_the_oldest_connection_not_being_answered_makes_room(self):
        s = ClusterSite(Echo(), Clock(), max_connections=3)
        busy_channel, busy = connect(s)
        busy_channel._handlingRequest = True  # a request with the app
        quiet = [connect(s)[1] for _ in range(2)]
        connect(s)  # a fourth: the oldest quiet one goes
        self.assertFalse(busy.disconnecting)
        self.assertEqual([t.disconnecting for t in quiet], [True, False])
        self.assertEqual((len(s.channels), s.shed), (3, 1))

    def test_the_limit_follows_the_open_files_limit(self):
        import resource

        from txcluster.worker.site import SPARE_DESCRIPTORS, connection_limit

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.assertEqual(connection_limit(), max(soft - SPARE_DESCRIPTORS, 16))


class ProxyProtocolTests(unittest.TestCase):
    """C{haproxy:} endpoints: the worker reads the PROXY header."""

    def test_v1_and_v2_give_the_proxied_client(self):
        from txcluster.worker.listen import wrapped

        s = site()
        factory = wrapped(None, s, "haproxy:tcp:8080")
        self.assertIs(factory.wrappedFactory, s)
        v1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 8080\r\n"
        v2 = (b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x0c"
              + bytes([203, 0, 113, 8]) + bytes([127, 0, 0, 1]) + b"\x15\xb3\x1f\x90")
        for header, client in ((v1, "203.0.113.7"), (v2, "203.0.113.8")):
            protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
            transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
            protocol.makeConnection(transport)
            protocol.dataReceived(header + REQUEST)
            self.assertTrue(transport.value().endswith(f"{client} http 0".encode()),
                            transport.value())

    def test_tls_behind_the_proxy_header_and_plain_endpoints(self):
        from txcluster.worker.listen import wrapped

        s = site()
        self.assertIs(wrapped(None, s, "tcp:8080"), s)
        self.assertIs(wrapped(None, s, "haproxy:tcp:8080").wrappedFactory, s)
