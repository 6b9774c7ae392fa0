"""Round-robin, both ends: the master's dispatcher and dealer, and the
worker's receiver, over real socket pairs with a fake reactor."""

import os
import socket

from twisted.internet.task import Clock
from twisted.trial import unittest

from txcluster.cpus import cpu_for
from txcluster.master import dispatch
from txcluster.ledger import MAX_SERVED_SLACK, Ledger
from txcluster.master.dispatch import (
    PAUSE_SECONDS, RETRY_SECONDS, Accepted, ConnectionDispatcher, Dealer, Descriptor, StandIns,
    WorkerChannel,
)
from txcluster.master.fairshare import LedgerDealer
from txcluster.worker.receive import ConnectionReceiver


class RecordingReactor(Clock):
    def __init__(self):
        super().__init__()
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


class WorkerChannels(unittest.TestCase):
    """A listening socket, and three workers' channels (real socket pairs)."""

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
        self.serving = [WorkerChannel(ours) for ours, _ in self.channels]

    def connect(self, n):
        clients = [socket.create_connection(self.listener.getsockname()) for _ in range(n)]
        for client in clients:
            self.addCleanup(client.close)
        return clients

    def messages(self, index):
        """Descriptors in each message the worker at index was sent."""
        theirs = self.channels[index][1]
        theirs.setblocking(False)
        messages = []
        try:
            while True:
                _, got, _, _ = socket.recv_fds(theirs, 64, 64)
                messages.append(len(got))
                for fd in got:
                    os.close(fd)
        except BlockingIOError:
            pass
        return messages

    def received(self, index):
        return sum(self.messages(index))

    def fill(self, index):
        """Make the channel to the worker at index refuse more (EAGAIN)."""
        ours = self.channels[index][0]
        try:
            while True:
                ours.send(b"x" * 65536)
        except BlockingIOError:
            pass

    def empty(self, index):
        theirs = self.channels[index][1]
        theirs.setblocking(False)
        try:
            while theirs.recv(1 << 20):
                pass
        except BlockingIOError:
            pass


class RoundRobinTests(WorkerChannels):
    def setUp(self):
        super().setUp()
        self.dispatcher = ConnectionDispatcher(self.reactor)
        self.acceptor = self.dispatcher.accept_on(self.listener.fileno())
        self.dispatcher.serve(self.serving)
        self.addCleanup(self.dispatcher.close)

    def test_connections_go_round_robin(self):
        self.connect(7)
        self.acceptor.doRead()
        self.assertEqual(self.dispatcher.dispatched, 7)
        self.assertEqual([self.received(i) for i in range(3)], [3, 2, 2])

    def test_one_message_per_worker_per_wakeup(self):
        self.connect(6)
        self.acceptor.doRead()
        self.assertEqual([self.messages(i) for i in range(3)], [[2], [2], [2]])

    def test_round_robin_continues_across_wakeups(self):
        self.connect(2)
        self.acceptor.doRead()
        self.connect(2)
        self.acceptor.doRead()
        self.assertEqual([self.received(i) for i in range(3)], [2, 1, 1])

    def test_a_full_channel_passes_its_share_on(self):
        self.fill(0)
        self.connect(3)
        self.acceptor.doRead()
        self.assertEqual(self.dispatcher.dispatched, 3)
        self.assertEqual(self.received(1) + self.received(2), 3)

    def test_connections_no_worker_can_take_are_held_not_dropped(self):
        for i in range(3):
            self.fill(i)
        clients = self.connect(2)
        self.acceptor.doRead()
        self.assertEqual((self.dispatcher.held, self.dispatcher.dispatched), (2, 0))
        self.assertNotIn(self.acceptor, self.reactor.readers)  # the backlog takes the rest
        self.reactor.advance(RETRY_SECONDS)
        self.assertEqual(self.dispatcher.held, 2)  # still full: still held
        clients[0].setblocking(False)
        self.assertRaises(BlockingIOError, clients[0].recv, 1)  # open, not reset
        self.empty(1)
        self.reactor.advance(RETRY_SECONDS)
        self.assertEqual((self.dispatcher.held, self.dispatcher.dispatched), (0, 2))
        self.assertIn(self.acceptor, self.reactor.readers)
        self.assertEqual(self.received(1), 2)

    def test_close_closes_held_connections(self):
        for i in range(3):
            self.fill(i)
        clients = self.connect(1)
        self.acceptor.doRead()
        self.dispatcher.close()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        clients[0].settimeout(5)
        self.assertEqual(clients[0].recv(1), b"")

    def test_pinned_workers_get_connections_from_their_cpu(self):
        self.patch(dispatch, "incoming_cpu", lambda client: 1)
        self.dispatcher.serve([WorkerChannel(ours, cpu) for (ours, _), cpu
                               in zip(self.channels, (0, 1, 0))])
        self.connect(3)
        self.acceptor.doRead()
        self.assertEqual([self.received(i) for i in range(3)], [1, 2, 0])

    def test_while_no_worker_is_ready_held_connections_wait_without_polling(self):
        for i in range(3):
            self.fill(i)
        self.connect(1)
        self.acceptor.doRead()
        self.dispatcher.serve([])  # every worker gone
        self.reactor.advance(RETRY_SECONDS)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.dispatcher.held, 1)
        self.empty(0)
        self.dispatcher.serve([WorkerChannel(self.channels[0][0])])  # send first, then accept
        self.assertNotIn(self.acceptor, self.reactor.readers)
        self.reactor.advance(RETRY_SECONDS)
        self.assertEqual(self.dispatcher.held, 0)
        self.assertIn(self.acceptor, self.reactor.readers)
        self.assertEqual(self.received(0), 1)

    def test_an_unexpected_error_while_sending_loses_no_connection(self):
        send_fds = socket.send_fds

        def broken(*args):
            raise RuntimeError("unexpected")

        self.patch(socket, "send_fds", broken)
        self.connect(2)
        self.assertRaises(RuntimeError, self.acceptor.doRead)
        self.assertEqual(self.dispatcher.held, 2)
        self.assertNotIn(self.acceptor, self.reactor.readers)
        self.patch(socket, "send_fds", send_fds)
        self.reactor.advance(RETRY_SECONDS)
        self.assertEqual((self.dispatcher.held, self.dispatcher.dispatched), (0, 2))
        self.assertIn(self.acceptor, self.reactor.readers)

    def test_cpython_private_accept_still_returns_a_descriptor_and_an_address(self):
        """The dispatcher accepts with socket.socket._accept (no socket object
        per connection): if CPython changes it, this fails first."""
        client = self.connect(1)[0]
        fd, address = self.listener._accept()
        try:
            self.assertIsInstance(fd, int)
            self.assertEqual(address, client.getsockname())
        finally:
            os.close(fd)

    def test_a_failing_listening_socket_pauses_accepting_instead_of_spinning(self):
        self.listener.shutdown(socket.SHUT_RDWR)  # accept() now fails every time
        self.acceptor.doRead()  # returns
        self.assertNotIn(self.acceptor, self.reactor.readers)
        self.reactor.advance(PAUSE_SECONDS)
        self.assertIn(self.acceptor, self.reactor.readers)

    def test_a_stopped_receiver_refuses_what_comes_later(self):
        receiver = ConnectionReceiver(self.reactor, os.dup(self.channels[0][1].fileno()),
                                      Factory())
        receiver.startListening()
        self.successResultOf(receiver.stopListening())
        self.connect(2)
        self.acceptor.doRead()  # the master did not know worker 0 was stopping
        self.assertEqual(self.dispatcher.dispatched, 2)
        self.assertEqual(self.received(1) + self.received(2), 2)

    def test_close_finishes_even_if_sending_fails(self):
        def broken(*args):
            raise RuntimeError("unexpected")

        self.patch(socket, "send_fds", broken)
        clients = self.connect(1)
        self.assertRaises(RuntimeError, self.acceptor.doRead)
        self.dispatcher.close()
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual((self.dispatcher.held, self.reactor.getDelayedCalls()), (0, []))
        self.dispatcher.serve(self.serving)  # a worker reporting ready during shutdown
        self.assertNotIn(self.acceptor, self.reactor.readers)
        clients[0].settimeout(5)
        self.assertEqual(clients[0].recv(1), b"")

    def test_close_sends_held_connections_to_a_worker_that_can_take_them(self):
        for i in range(3):
            self.fill(i)
        self.connect(1)
        self.acceptor.doRead()
        self.empty(2)
        self.dispatcher.close()
        self.assertEqual(self.received(2), 1)

    def test_no_ready_worker_leaves_connections_in_the_backlog(self):
        self.dispatcher.serve([])
        self.connect(2)
        self.assertEqual(self.dispatcher.dispatched, 0)
        self.assertNotIn(self.acceptor, self.reactor.readers)  # not reading
        self.dispatcher.serve([WorkerChannel(self.channels[0][0])])
        self.assertIn(self.acceptor, self.reactor.readers)
        self.acceptor.doRead()
        self.assertEqual(self.received(0), 2)

    def test_a_gone_worker_is_skipped(self):
        self.channels[1][1].close()
        self.connect(4)
        self.acceptor.doRead()
        self.assertEqual(self.received(0) + self.received(2), 4)

    def test_a_connection_handed_back_goes_to_another_worker(self):
        stopping = WorkerChannel(self.channels[0][0])
        self.dispatcher.watch(stopping)
        self.dispatcher.serve(self.serving[1:])  # worker 0 is leaving
        client = self.connect(1)[0]
        self.dispatcher.serve(self.serving[:1])
        self.acceptor.doRead()  # worker 0 still got it, say
        [fd] = socket.recv_fds(self.channels[0][1], 64, 64)[1]
        self.dispatcher.serve(self.serving[1:])
        socket.send_fds(self.channels[0][1], [b"c"], [fd])  # ... and hands it back
        os.close(fd)
        readers = [r for r in self.reactor.readers if r is not self.acceptor]
        readers[0].doRead()
        self.assertEqual(self.dispatcher.handed_back, 1)
        self.assertEqual(self.received(1) + self.received(2), 1)
        client.sendall(b"still open")  # never closed on the client
        self.dispatcher.unwatch(stopping)
        self.assertEqual([r for r in self.reactor.readers if r is not self.acceptor], [])

    def test_receiver_adopts_and_drains_on_stop(self):
        clients = self.connect(3)
        self.acceptor.doRead()
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


class StandInTests(WorkerChannels):
    """Reuseport: the master accepts on the sockets no worker accepts on
    and deals to the workers that serve."""

    def setUp(self):
        super().setUp()
        self.main = ConnectionDispatcher(self.reactor)  # takes back; accepts nothing
        self.addCleanup(self.main.close)
        self.stand_ins = StandIns(self.main)
        self.addCleanup(self.stand_ins.close)

    def serve(self, unserved, channels):
        self.main.serve(channels)
        self.stand_ins.serve(unserved)

    def read_all(self):
        for reader in list(self.reactor.readers):
            reader.doRead()

    def test_its_connections_go_to_the_workers_that_serve(self):
        self.serve([self.listener.fileno()], self.serving[:2])
        self.connect(4)
        self.read_all()
        self.assertEqual([self.received(i) for i in range(3)], [2, 2, 0])

    def test_while_no_worker_serves_they_wait_in_the_backlog(self):
        self.serve([self.listener.fileno()], [])
        self.assertEqual(self.reactor.readers, set())

    def test_a_socket_served_again_is_left_to_its_worker_and_stays_open(self):
        self.serve([self.listener.fileno()], self.serving)
        self.serve([], self.serving)
        self.assertEqual((self.reactor.readers, self.stand_ins.sockets), (set(), []))
        client = self.connect(1)[0]
        accepted, _ = self.listener.accept()  # queued for its worker, not reset
        accepted.close()
        client.close()

    def test_what_it_holds_when_its_worker_comes_back_is_dealt_not_closed(self):
        self.fill(0)
        self.serve([self.listener.fileno()], self.serving[:1])
        clients = self.connect(3)
        self.read_all()  # worker 0 cannot take them: held
        self.serve([], self.serving[1:2])  # worker 1 is back and serves alone
        self.reactor.advance(RETRY_SECONDS)
        for client in clients:  # not closed by the master
            client.settimeout(0.2)
            self.assertRaises(socket.timeout, client.recv, 1)
        self.assertEqual(self.received(1), 3)

    def test_what_one_socket_holds_stops_every_socket(self):
        """Two sockets, one dispatcher: a connection held from one stops
        accepting on both (the backlogs take the pressure), and once it is
        sent both accept again."""
        other = socket.socket()
        other.bind(("127.0.0.1", 0))
        other.listen(4)
        self.addCleanup(other.close)
        for i in range(3):
            self.fill(i)
        self.serve([self.listener.fileno(), other.fileno()], self.serving)
        acceptors = set(self.reactor.readers)
        self.assertEqual(len(acceptors), 2)
        self.connect(1)
        self.read_all()
        self.assertEqual((self.main.held, self.reactor.readers), (1, set()))
        for i in range(3):
            self.empty(i)
        self.reactor.advance(RETRY_SECONDS)
        self.assertEqual((self.main.held, self.reactor.readers), (0, acceptors))
        self.assertEqual(sum(self.received(i) for i in range(3)), 1)

    def test_an_acceptor_stopped_during_a_wakeup_accepts_nothing(self):
        """The reactor may still call an acceptor another one's wakeup just
        stopped: it takes nothing from its backlog."""
        for i in range(3):
            self.fill(i)
        self.serve([self.listener.fileno()], self.serving)
        (acceptor,) = self.reactor.readers
        self.connect(2)
        self.main.hold([Accepted(Descriptor(os.dup(self.listener.fileno())))])
        acceptor.doRead()
        self.assertEqual(self.main.held, 1)
        accepted = [self.listener.accept()[0] for _ in range(2)]  # still in the backlog
        for connection in accepted:
            connection.close()

    def test_without_a_socket_a_dispatcher_deals_only_what_is_handed_back(self):
        dispatcher = ConnectionDispatcher(self.reactor)
        dispatcher.serve(self.serving)
        self.assertEqual((dispatcher.sockets, self.reactor.readers), ([], set()))
        client = self.connect(1)[0]
        handed, _ = self.listener.accept()
        dispatcher.take_back([handed.detach()])
        self.assertEqual(sum(self.received(i) for i in range(3)), 1)
        dispatcher.close()
        client.close()


class DealerTests(unittest.TestCase):
    """Who takes each connection, as pure bookkeeping."""

    def deal(self, dealer, targets, cpus, takers=None):
        """Deal one connection per entry of cpus (its incoming CPU); record
        them as taken (by takers, if given: as if the others were full);
        return how many each target was dealt."""
        shares = dealer.deal([Accepted(object(), cpu) for cpu in cpus], targets)
        for target, share in zip(targets, shares):
            if takers is None:
                dealer.record(target, len(share))
        if takers is not None:
            dealer.record(takers, len(cpus))
        return [len(share) for share in shares]

    def test_unpinned_workers_take_turns(self):
        targets = [WorkerChannel(object()) for _ in range(3)]
        dealer = Dealer()
        self.assertEqual(self.deal(dealer, targets, [None] * 7), [3, 2, 2])
        self.assertEqual(self.deal(dealer, targets, [None] * 2), [0, 1, 1])

    def test_pinned_workers_take_connections_received_on_their_cpu(self):
        targets = [WorkerChannel(object(), cpu) for cpu in (0, 1, 0, 1)]
        dealer = Dealer()
        shares = dealer.deal([Accepted(i, i % 2) for i in range(8)], targets)
        self.assertEqual([[a.cpu for a in share] for share in shares],
                         [[0, 0], [1, 1], [0, 0], [1, 1]])

    def test_the_split_stays_even_when_every_connection_arrives_on_one_cpu(self):
        targets = [WorkerChannel(object(), cpu) for cpu in (0, 1)]
        dealer = Dealer()
        self.assertEqual(self.deal(dealer, targets, [0] * 32), [17, 15])
        # Long after start, a burst from one CPU is split evenly too.
        self.deal(dealer, targets, [0, 1] * 80_000)
        self.assertEqual(self.deal(dealer, targets, [0] * 64), [33, 31])

    def test_a_new_worker_is_not_flooded(self):
        old = [WorkerChannel(object()) for _ in range(2)]
        dealer = Dealer()
        self.deal(dealer, old, [None] * 100)  # 50 each
        replacement = WorkerChannel(object())
        targets = [old[0], replacement]
        dealer.keep_only(targets)
        # It starts SLACK + 1 behind the most served, and catches up by that.
        self.assertEqual(self.deal(dealer, targets, [None] * 10), [4, 6])

    def test_a_worker_that_could_not_take_its_share_is_not_flooded_later(self):
        busy, other = targets = [WorkerChannel(object()) for _ in range(2)]
        dealer = Dealer()
        for _ in range(50):  # the busy worker's channel is full: the other takes all
            self.deal(dealer, targets, [None] * 10, takers=other)
        self.assertEqual(self.deal(dealer, targets, [None] * 64), [33, 31])

    def test_cpu_for_takes_usable_cpus_in_turn(self):
        self.assertEqual([cpu_for(i, [5, 3]) for i in range(1, 6)], [3, 5, 3, 5, 3])

    def test_the_dispatcher_forgets_workers_that_no_longer_serve(self):
        reactor = RecordingReactor()
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        dispatcher = ConnectionDispatcher(reactor)
        self.addCleanup(dispatcher.close)
        acceptor = dispatcher.accept_on(listener.fileno())
        dispatcher.serve([WorkerChannel(object())])
        self.assertIn(acceptor, reactor.readers)
        dispatcher.serve([])
        self.assertNotIn(acceptor, reactor.readers)


class LedgerDealerTests(WorkerChannels):
    """Reuseport: what a worker hands on goes to the least loaded worker by
    the ledger the workers share, and is counted there."""

    def setUp(self):
        super().setUp()
        self.ledger = Ledger.create()
        self.addCleanup(os.close, self.ledger.fileno())
        self.addCleanup(self.ledger.close)
        self.dealer = LedgerDealer(self.ledger)
        self.serving = [WorkerChannel(ours, None, i, self.dealer.allocate())
                        for i, (ours, _) in enumerate(self.channels, start=1)]
        self.dispatcher = ConnectionDispatcher(self.reactor, self.dealer)
        self.addCleanup(self.dispatcher.close)
        self.dispatcher.serve(self.serving)

    def hand_on(self, n):
        """Worker 1 hands n connections on, as its acceptor does."""
        self.dispatcher.watch(self.serving[0])
        clients = self.connect(n)
        accepted = [self.listener.accept()[0] for _ in clients]
        socket.send_fds(self.channels[0][1], [b"c"], [a.fileno() for a in accepted])
        for a in accepted:
            a.close()
        readers = [r for r in self.reactor.readers if r is not self.dispatcher]
        readers[0].doRead()
        return clients

    def test_serving_ids_are_marked(self):
        self.assertEqual(set(self.ledger.loads()), {1, 2, 3})
        self.assertEqual(self.dealer.serving(), 3)
        self.dispatcher.serve(self.serving[1:])
        self.assertEqual(set(self.ledger.loads()), {2, 3})
        self.assertEqual(self.dealer.serving(), 2)

    def test_handed_on_goes_to_the_least_loaded(self):
        self.ledger.set_open(1, 9)
        self.ledger.set_open(2, 5)
        self.ledger.set_open(3, 2)
        self.hand_on(4)
        # Worker 3 first (2 open), then 3 and 2 in turn as their loads grow.
        self.assertEqual([self.received(i) for i in range(3)], [0, 1, 3])
        self.assertEqual([self.ledger.load(i).served for i in (1, 2, 3)], [0, 1, 3])

    def test_a_worker_that_joins_is_lifted_not_flooded(self):
        """Ids 1 and 2 have served many; id 3 joins: it starts just within
        the slack of the most served, so the others go on keeping theirs."""
        self.dispatcher.serve(self.serving[:2])
        self.ledger.add_kept(1, 5000)
        self.ledger.add_kept(2, 4990)
        self.dispatcher.serve(self.serving)
        self.assertEqual(self.ledger.load(3).served, 5000 - MAX_SERVED_SLACK)
        self.assertEqual(self.ledger.load(2).served, 4990)  # within the slack: as it was

    def test_rows_are_given_and_taken_back(self):
        self.assertEqual([t.row for t in self.serving], [1, 2, 3])
        self.dispatcher.release(self.serving[1])
        self.assertEqual(self.dealer.allocate(), 2)
        self.assertEqual(self.dealer.allocate(), 4)

    def test_kept_until_taken_then_closed(self):
        """The master's copy of a connection it sent stays open until the
        worker's row says it took it."""
        self.ledger.set_open(1, 9)
        self.ledger.set_open(2, 9)
        [client] = self.hand_on(1)
        self.assertEqual(self.received(2), 1)
        self.assertTrue(self.dealer.waiting())
        self.assertEqual(self.reactor.getDelayedCalls()[0].getTime(), dispatch.SWEEP_SECONDS)
        self.reactor.advance(dispatch.SWEEP_SECONDS)
        self.assertTrue(self.dealer.waiting())  # not taken yet: still kept
        self.ledger.add_received(3, 1)
        self.reactor.advance(dispatch.SWEEP_SECONDS)
        self.assertFalse(self.dealer.waiting())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_what_a_dead_worker_never_took_is_dealt_again(self):
        """kill -9 of a hung worker: what the master sent it and it never
        took goes to another worker, still open."""
        self.ledger.set_open(1, 9)
        self.ledger.set_open(2, 9)
        [client] = self.hand_on(1)
        _, fds, _, _ = socket.recv_fds(self.channels[2][1], 64, 64)
        for fd in fds:
            os.close(fd)  # lost with the process...
        self.channels[2][1].close()
        self.dispatcher.release(self.serving[2])
        self.dispatcher.serve(self.serving[:2])
        self.assertEqual(self.received(0) + self.received(1), 1)  # ...but dealt again
        client.sendall(b"still open")
