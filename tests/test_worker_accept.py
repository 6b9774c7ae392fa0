"""
A worker's own socket in reuseport mode (L{FairShareAcceptor}): real
connections waiting on a real listening socket, the reactor a
L{MemoryReactorClock}, and the ledger a real one.
"""

import os
import socket

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from txcluster.ledger import BURST, RATE_WINDOW, Ledger, LedgerSlot, Load
from txcluster.worker.accept import PAUSE_SECONDS, FairShareAcceptor


class AcceptorTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.ledger = Ledger.create()
        self.addCleanup(os.close, self.ledger.fileno())
        self.addCleanup(self.ledger.close)
        self.ledger.set_serving([1, 2])
        self.handed = []
        #: what the ledger and the reactor said of worker 1 at each hand-on
        self.seen_at_hand_on = []
        self.master_takes = True
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(64)
        self.address = listening.getsockname()
        self.factory = Factory.forProtocol(Protocol)
        self.acceptor = FairShareAcceptor(self.reactor, listening.detach(), self.factory,
                                          LedgerSlot(self.ledger, 1), hand_on=self.hand_on)
        self.acceptor.startListening()
        self.addCleanup(self.acceptor.stopListening)

    def hand_on(self, fds):
        self.seen_at_hand_on.append(
            (self.ledger.load(1).served, len(self.reactor.adoptedStreamConnections)))
        if not self.master_takes:
            return False
        # The master deals them to worker 2, which takes them.
        self.ledger.add_dealt(2, len(fds))
        self.ledger.add_received(2, len(fds))
        self.handed.extend(os.dup(fd) for fd in fds)  # the acceptor closes its copies
        for fd in self.handed[-len(fds):]:
            self.addCleanup(os.close, fd)
        return True

    def connect(self, n):
        for _ in range(n):
            client = socket.create_connection(self.address, timeout=5)
            self.addCleanup(client.close)

    def test_listens(self):
        self.assertIn(self.acceptor, self.reactor.getReaders())
        self.assertEqual(self.acceptor.getHost(), IPv4Address("TCP", *self.address))

    def test_idle_keeps_one_in_two(self):
        """One client at a time: exactly round-robin: worker 1 keeps one
        connection in two and hands the other to the master, and the
        ledger counts what it kept."""
        for _ in range(6):
            self.connect(1)
            self.acceptor.doRead()
        self.assertEqual(len(self.reactor.adoptedStreamConnections), 3)
        self.assertEqual(len(self.handed), 3)
        self.assertEqual(self.ledger.load(1).served, 3)
        family = self.reactor.adoptedStreamConnections[0][1]
        self.assertEqual(family, socket.AF_INET)

    def test_kept_are_counted_before_the_rest_is_handed_on(self):
        """Six at once: worker 1 keeps four, and has counted and adopted
        them before it hands the other two on; else the master, reading
        the ledger, would see it idle and could deal them straight back."""
        self.connect(6)
        self.acceptor.doRead()
        self.assertEqual(len(self.handed), 2)
        self.assertEqual(self.seen_at_hand_on, [(4, 4)])

    def accept_in_one_window(self, n):
        """Worker 1 accepts n connections, in one window that then ends."""
        for batch in (n // 2, n - n // 2):
            self.connect(batch)
            self.acceptor.doRead()
        self.reactor.advance(RATE_WINDOW)
        self.assertEqual(self.acceptor.accepted_last_window(), n)
        self.handed.clear()

    def busier_and_ahead_by(self, served):
        """Worker 1 has twice worker 2's open connections (beyond half
        again), and has served C{served} more."""
        self.ledger.set_open(1, 20)
        self.ledger.set_open(2, 10)
        behind = self.ledger.load(1).served - served - self.ledger.load(2).served
        self.ledger.lift(2, behind)
        self.assertEqual(self.ledger.load(1).served - self.ledger.load(2).served, served)

    def test_under_load_keeps_what_the_kernel_gave(self):
        """A busy last window (a burst and 40 more: a slack of 10): a
        worker a little ahead keeps every new connection."""
        self.accept_in_one_window(BURST + 40)
        self.busier_and_ahead_by(5)
        self.connect(1)
        self.acceptor.doRead()
        self.assertEqual(self.handed, [])

    def test_no_slack_after_a_burst(self):
        """The same, but only a burst in the last window: no slack, so the
        worker ahead hands the new connection on."""
        self.accept_in_one_window(BURST)
        self.busier_and_ahead_by(5)
        self.connect(1)
        self.acceptor.doRead()
        self.assertEqual(len(self.handed), 1)

    def test_the_window_empties_when_quiet(self):
        self.connect(4)
        self.acceptor.doRead()
        self.reactor.advance(RATE_WINDOW * 3)
        self.assertEqual(self.acceptor.accepted_last_window(), 0)

    def test_busier_worker_hands_on(self):
        """Worker 1 has far more open and served than worker 2: every new
        connection goes on to the master."""
        self.ledger.set_open(1, 30)
        self.ledger.add_kept(1, 1000)
        self.connect(3)
        self.acceptor.doRead()
        self.assertEqual(len(self.handed), 3)
        self.assertEqual(self.reactor.adoptedStreamConnections, [])
        self.assertEqual(self.ledger.load(1), Load(30, 1000))

    def test_kept_when_the_master_cannot_take_them(self):
        """A full or closed channel to the master: better served here than
        not at all."""
        self.master_takes = False
        self.ledger.add_kept(1, 1000)
        self.connect(2)
        self.acceptor.doRead()
        self.assertEqual(len(self.reactor.adoptedStreamConnections), 2)
        self.assertEqual(self.ledger.load(1).served, 1002)

    def test_stop_closes_our_copy(self):
        fd = self.acceptor.fileno()
        self.acceptor.stopListening()
        self.assertNotIn(self.acceptor, self.reactor.getReaders())
        self.assertRaises(OSError, os.fstat, fd)
        self.acceptor.stopListening()  # again: nothing

    def test_a_failing_socket_pauses_accepting_instead_of_spinning(self):
        with socket.socket(fileno=os.dup(self.acceptor.fileno())) as same:
            same.shutdown(socket.SHUT_RDWR)
        self.acceptor.doRead()  # accept() fails every time: returns
        self.assertNotIn(self.acceptor, self.reactor.getReaders())
        self.reactor.advance(PAUSE_SECONDS)
        self.assertIn(self.acceptor, self.reactor.getReaders())
