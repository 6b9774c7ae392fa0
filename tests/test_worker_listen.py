"""
How a worker takes its connections: one per wakeup on a shared socket (on a
real Twisted port, so a change in Twisted fails here), and TLS for ssl:
endpoints (through the endpoint's public listenSSL).
"""

import os
import socket

from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from txcluster.worker.listen import accept_one_per_wakeup, tls_wrapped
from txcluster.worker.receive import address_family


class Counting(Factory):
    protocol = Protocol

    def __init__(self):
        self.built = 0

    def buildProtocol(self, addr):
        self.built += 1
        return super().buildProtocol(addr)


class AcceptOneTests(unittest.TestCase):
    def port_with_waiting_clients(self, clients):
        factory = Counting()
        port = tcp.Port(0, factory, interface="127.0.0.1", reactor=MemoryReactorClock())
        port.startListening()
        self.addCleanup(port.socket.close)
        for _ in range(clients):
            client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
            self.addCleanup(client.close)
        return port, factory

    def test_twisted_takes_many_per_read_by_default(self):
        port, factory = self.port_with_waiting_clients(3)
        port.doRead()
        self.assertEqual(factory.built, 3)  # why accept_one_per_wakeup exists

    def test_every_read_accepts_one(self):
        port, factory = self.port_with_waiting_clients(3)
        accept_one_per_wakeup(port)
        port.doRead()
        self.assertEqual(factory.built, 1)
        port.doRead()
        port.doRead()
        self.assertEqual(factory.built, 3)


class TLSTests(unittest.TestCase):
    def test_plain_endpoints_are_not_wrapped(self):
        factory = Factory()
        self.assertIs(tls_wrapped(None, factory, "tcp:8080"), factory)

    def test_ssl_endpoints_are_wrapped_with_their_certificate(self):
        from twisted.test import __file__ as twisted_tests

        key = os.path.join(os.path.dirname(twisted_tests), "server.pem")
        factory = Factory()
        wrapped = tls_wrapped(None, factory, f"ssl:0:privateKey={key}")
        self.assertIsInstance(wrapped, TLSMemoryBIOFactory)
        self.assertIs(wrapped.wrappedFactory, factory)


class AddressFamilyTests(unittest.TestCase):
    def test_family_of_a_descriptor(self):
        for family in (socket.AF_INET, socket.AF_UNIX):
            with socket.socket(family) as s:
                self.assertEqual(address_family(s.fileno()), family)
                self.assertGreaterEqual(s.fileno(), 0)  # still open
