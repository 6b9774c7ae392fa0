"""Balancing: one accept per wakeup, and round-robin descriptor passing."""

import os
import socket

from twisted.trial import unittest

from txcluster.balancing import ConnectionDispatcher, ConnectionReceiver, accept_one_per_wakeup


class FakePort:
    def __init__(self):
        self.numberAccepts = 100
        self.seen = []

    def doRead(self):
        self.seen.append(self.numberAccepts)
        self.numberAccepts += 20  # what tcp.Port does after a full batch


class RecordingReactor:
    def __init__(self):
        self.readers = set()
        self.adopted = []

    def addReader(self, reader):
        self.readers.add(reader)

    def removeReader(self, reader):
        self.readers.discard(reader)

    def adoptStreamConnection(self, fd, family, factory):
        self.adopted.append((os.fstat(fd).st_ino, family, factory))


class Factory:
    def doStart(self):
        pass

    def doStop(self):
        pass


class AcceptOneTests(unittest.TestCase):
    def test_every_read_accepts_one(self):
        port = FakePort()
        accept_one_per_wakeup(port)
        port.doRead()
        port.doRead()
        self.assertEqual(port.seen, [1, 1])


class RoundRobinTests(unittest.TestCase):
    def setUp(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.addCleanup(self.listener.close)
        self.channels = [socket.socketpair() for _ in range(3)]
        for ours, theirs in self.channels:
            ours.setblocking(False)
            self.addCleanup(ours.close)
            self.addCleanup(theirs.close)
        self.reactor = RecordingReactor()
        self.serving = [ours for ours, _ in self.channels]
        self.dispatcher = ConnectionDispatcher(
            self.reactor, self.listener.fileno(), lambda: list(self.serving))
        self.addCleanup(self.dispatcher.close)

    def connect(self, n):
        clients = [socket.create_connection(self.listener.getsockname()) for _ in range(n)]
        for client in clients:
            self.addCleanup(client.close)
        return clients

    def received(self, index):
        theirs = self.channels[index][1]
        theirs.setblocking(False)
        fds = []
        try:
            while True:
                _, got, _, _ = socket.recv_fds(theirs, 64, 64)
                fds += got
        except BlockingIOError:
            pass
        for fd in fds:
            os.close(fd)
        return len(fds)

    def test_connections_go_round_robin(self):
        self.connect(7)
        self.dispatcher.doRead()
        self.assertEqual(self.dispatcher.dispatched, 7)
        self.assertEqual([self.received(i) for i in range(3)], [3, 2, 2])

    def test_no_ready_worker_leaves_connections_in_the_backlog(self):
        self.dispatcher.start()
        self.serving.clear()
        self.connect(2)
        self.dispatcher.doRead()
        self.assertEqual(self.dispatcher.dispatched, 0)
        self.assertNotIn(self.dispatcher, self.reactor.readers)  # stopped reading
        self.serving.append(self.channels[0][0])
        self.dispatcher.start()
        self.dispatcher.doRead()
        self.assertEqual(self.received(0), 2)

    def test_a_gone_worker_is_skipped(self):
        self.channels[1][1].close()
        self.connect(4)
        self.dispatcher.doRead()
        self.assertEqual(self.received(0) + self.received(2), 4)

    def test_receiver_adopts_and_drains_on_stop(self):
        clients = self.connect(3)
        self.dispatcher.doRead()
        theirs = self.channels[0][1]
        receiver = ConnectionReceiver(self.reactor, os.dup(theirs.fileno()), Factory())
        receiver.startListening()
        self.assertIn(receiver, self.reactor.readers)
        self.successResultOf(receiver.stopListening())  # adopts what was sent, then stops
        self.assertEqual(receiver.adopted, 1)
        self.assertNotIn(receiver, self.reactor.readers)
        family = self.reactor.adopted[0][1]
        self.assertEqual(family, socket.AF_INET)
        self.assertEqual(len(clients), 3)
