"""Draining: idle connections close, in-flight ones finish with Connection: close."""

import json
import os
import shutil
import tempfile

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from txcluster.worker.access_log import AccessLog
from txcluster.worker.locality import RECONNECT_AFTER_REQUESTS, Locality
from txcluster.worker.site import FRESH_CONNECTION_GRACE, ClusterSite


class Slow(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []

    def render_GET(self, request):
        self.requests.append(request)
        return NOT_DONE_YET


class Delayed(Resource):
    """Answers "done" after 0.25 s on C{clock}."""

    isLeaf = True

    def __init__(self, clock):
        super().__init__()
        self.clock = clock

    def render_GET(self, request):
        def finish():
            request.write(b"done")
            request.finish()

        self.clock.callLater(0.25, finish)
        return NOT_DONE_YET


class Fast(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"ok"


def connect(site):
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class DrainTests(unittest.TestCase):
    def test_idle_keep_alive_closes_at_once(self):
        site = ClusterSite(Fast(), Clock())
        channel, transport = connect(site)
        channel.dataReceived(REQUEST)
        self.assertIn(b"ok", transport.value())
        self.assertFalse(transport.disconnecting)  # kept alive
        drained = site.drain()
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(drained)
        channel.connectionLost(None)
        self.successResultOf(drained)

    def test_in_flight_request_finishes_with_connection_close(self):
        resource = Slow()
        site = ClusterSite(resource, Clock())
        channel, transport = connect(site)
        channel.dataReceived(REQUEST)
        drained = site.drain()
        self.assertFalse(transport.disconnecting)
        resource.requests[0].write(b"late")
        resource.requests[0].finish()
        response = transport.value().lower()
        self.assertIn(b"connection: close", response)
        self.assertIn(b"late", response)
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(None)
        self.successResultOf(drained)

    def test_request_arriving_while_draining_gets_connection_close(self):
        site = ClusterSite(Fast(), Clock())
        site.drain()
        channel, transport = connect(site)
        channel.dataReceived(REQUEST)
        self.assertIn(b"connection: close", transport.value().lower())
        self.assertTrue(transport.disconnecting)

    def test_fresh_connection_gets_its_first_request_answered(self):
        clock = Clock()
        site = ClusterSite(Fast(), clock)
        channel, transport = connect(site)  # accepted; request not read yet
        drained = site.drain()
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(REQUEST)
        response = transport.value().lower()
        self.assertIn(b"ok", response)
        self.assertIn(b"connection: close", response)
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(None)
        self.successResultOf(drained)

    def test_fresh_connection_that_stays_silent_is_closed_after_grace(self):
        clock = Clock()
        site = ClusterSite(Fast(), clock)
        channel, transport = connect(site)
        site.drain()
        clock.advance(FRESH_CONNECTION_GRACE - 0.125)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.125)
        self.assertTrue(transport.disconnecting)

    def test_drain_with_no_connections(self):
        self.successResultOf(ClusterSite(Fast(), Clock()).drain())

    def test_abort(self):
        site = ClusterSite(Slow(), Clock())
        channel, transport = connect(site)
        channel.dataReceived(REQUEST)
        site.abort()
        self.assertTrue(transport.disconnecting)


class SocketTransport(StringTransport):
    """A transport whose handle reports the CPU its packets arrive on."""

    incoming_cpu = 0

    def getHandle(self):
        return self

    def getsockopt(self, level, option):
        return self.incoming_cpu


class LocalityTests(unittest.TestCase):
    """--cpu-affinity: a client that moved to another worker's CPU is told to
    reconnect (Connection: close) once it has had enough requests."""

    def serve(self, cpu, requests):
        site = ClusterSite(Fast(), Clock(), locality=Locality(home=1, cpus=(0, 1), workers=2))
        channel = site.buildProtocol(None)
        transport = SocketTransport()
        transport.incoming_cpu = cpu
        channel.makeConnection(transport)
        for _ in range(requests):
            transport.clear()
            channel.dataReceived(REQUEST)
        return transport

    def test_moved_client_reconnects_after_enough_requests(self):
        transport = self.serve(cpu=0, requests=RECONNECT_AFTER_REQUESTS - 1)
        self.assertNotIn(b"connection: close", transport.value().lower())
        self.assertFalse(transport.disconnecting)
        transport = self.serve(cpu=0, requests=RECONNECT_AFTER_REQUESTS)
        self.assertIn(b"ok", transport.value())
        self.assertIn(b"connection: close", transport.value().lower())
        self.assertTrue(transport.disconnecting)

    def test_client_on_this_cpu_stays(self):
        transport = self.serve(cpu=1, requests=RECONNECT_AFTER_REQUESTS + 5)
        self.assertNotIn(b"connection: close", transport.value().lower())
        self.assertFalse(transport.disconnecting)


class AccessLogTests(unittest.TestCase):
    def test_off_by_default(self):
        site = ClusterSite(Fast(), Clock())
        site.startFactory()
        channel, transport = connect(site)
        channel.dataReceived(REQUEST)
        site.stopFactory()  # nothing to assert beyond: no file, no error

    def test_file(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "access.log")
        site = ClusterSite(Fast(), Clock(), access_log=AccessLog(path))
        site.startFactory()
        channel, transport = connect(site)
        channel.dataReceived(REQUEST)
        channel.dataReceived(REQUEST)
        site.stopFactory()
        with open(path) as f:
            lines = f.readlines()
        self.assertEqual(len(lines), 2)
        self.assertIn('"GET / HTTP/1.1" 200', lines[0])

    def test_reopen_after_logrotate_moved_the_file(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "access.log")
        site = ClusterSite(Fast(), Clock(), access_log=AccessLog(path))
        site.startFactory()
        self.addCleanup(site.stopFactory)
        channel, transport = connect(site)
        channel.dataReceived(REQUEST)
        os.rename(path, path + ".1")
        channel.dataReceived(REQUEST)  # still into the moved file
        site.reopen_access_log()
        channel.dataReceived(REQUEST)
        with open(path + ".1") as old, open(path) as new:
            self.assertEqual((len(old.readlines()), len(new.readlines())), (2, 1))

    def test_json_lines(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "access.log")
        clock = Clock()
        clock.advance(100)
        site = ClusterSite(Delayed(clock), clock, access_log=AccessLog(
            path, "json", worker=3, now=lambda: 1764639904.25))
        site.startFactory()
        channel, transport = connect(site)
        channel.dataReceived(b"GET /slow?x=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: probe/1\r\n"
                             b"Referer: http://r/\r\n\r\n")
        clock.advance(0.25)
        site.stopFactory()
        with open(path) as f:
            [entry] = [json.loads(line) for line in f]
        self.assertEqual(entry, {
            "time": "2025-12-02T01:45:04.250Z", "worker": 3, "client": "192.168.1.1",
            "method": "GET", "path": "/slow?x=1", "status": 200, "bytes": 4,
            "duration_ms": 250.0, "referer": "http://r/", "user_agent": "probe/1"})


class UnsentBytesTests(unittest.TestCase):
    """unsent_bytes reads Twisted's write buffers, which have no public
    accessor: this fails if they are renamed."""

    def test_a_written_response_counts_until_it_is_flushed(self):
        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.testing import MemoryReactor

        from txcluster.worker.site import unsent_bytes

        descriptor = FileDescriptor(reactor=MemoryReactor())
        descriptor.connected = True
        self.assertEqual(unsent_bytes(descriptor), 0)
        descriptor.write(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(unsent_bytes(descriptor), 19)
        self.assertEqual(unsent_bytes(object()), 1)  # unknown: never handed back


class HealthTests(unittest.TestCase):
    def ask(self, site, path=b"/health"):
        channel, transport = connect(site)
        channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        return transport.value()

    def test_in_front_of_the_app_then_503_once_leaving(self):
        site = ClusterSite(Fast(), Clock(), health="/health", worker_id=2)
        response = self.ask(site)
        self.assertTrue(response.startswith(b"HTTP/1.1 200"))
        self.assertIn(b'{"status": "ok", "worker": 2}', response)
        site.leaving = True
        response = self.ask(site)
        self.assertTrue(response.startswith(b"HTTP/1.1 503"))
        self.assertIn(b'{"status": "draining", "worker": 2}', response)
        self.assertIn(b"ok", self.ask(site, b"/other"))  # the app still serves

    def test_off(self):
        site = ClusterSite(Fast(), Clock(), health="")
        self.assertIn(b"\r\n\r\nok", self.ask(site))  # the app's own /health

