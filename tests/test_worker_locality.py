"""--cpu-affinity in a worker: which keep-alive clients are sent back."""

import socket

from twisted.trial import unittest

from txcluster.settings import Settings
from txcluster.wire import WorkerEnvironment
from txcluster.worker.locality import RECONNECT_AFTER_REQUESTS, Locality


class FakeClientSocket:
    """A connected socket as far as SO_INCOMING_CPU goes."""

    def __init__(self, cpu):
        self.cpu = cpu

    def getsockopt(self, level, option):
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_INCOMING_CPU)
        return self.cpu


class LocalityTests(unittest.TestCase):
    """--cpu-affinity: a keep-alive connection whose client moved to another
    worker's CPU is sent back to be dealt again, after enough requests."""

    locality = Locality(home=1, cpus=(0, 1, 2), workers=3)
    enough = RECONNECT_AFTER_REQUESTS

    def test_client_on_another_workers_cpu_reconnects(self):
        self.assertTrue(self.locality.should_reconnect(FakeClientSocket(0), self.enough))
        self.assertTrue(self.locality.should_reconnect(FakeClientSocket(2), self.enough + 7))

    def test_not_while_the_kernel_spreads_by_hash(self):
        """The master's steering guard turned steering off: a client sent
        back would just be hashed again."""
        steered = [True]
        locality = Locality(home=1, cpus=(0, 1, 2), workers=3, steered=lambda: steered[0])
        self.assertTrue(locality.should_reconnect(FakeClientSocket(0), self.enough))
        steered[0] = False
        self.assertFalse(locality.should_reconnect(FakeClientSocket(0), self.enough))
        self.assertFalse(locality.with_workers(2).should_reconnect(FakeClientSocket(0),
                                                                   self.enough))

    def test_not_before_enough_requests(self):
        self.assertFalse(self.locality.should_reconnect(FakeClientSocket(0), self.enough - 1))

    def test_client_on_this_cpu_stays(self):
        self.assertFalse(self.locality.should_reconnect(FakeClientSocket(1), self.enough))

    def test_client_on_a_cpu_without_worker_stays(self):
        # Reconnecting could not bring it closer to any worker.
        self.assertFalse(self.locality.should_reconnect(FakeClientSocket(3), self.enough))

    def test_scaling_changes_which_cpus_have_a_worker(self):
        fewer = self.locality.with_workers(2)
        self.assertEqual(fewer.served, {0, 1})
        self.assertFalse(fewer.should_reconnect(FakeClientSocket(2), self.enough))
        self.assertTrue(fewer.should_reconnect(FakeClientSocket(0), self.enough))
        self.assertEqual(self.locality.with_workers(5).served, {0, 1, 2})

    def test_unknown_cpu_stays(self):
        self.assertFalse(self.locality.should_reconnect(FakeClientSocket(-1), self.enough))
        self.assertFalse(self.locality.should_reconnect(object(), self.enough))  # not a socket

    def environment(self, **changes):
        fields = dict(worker_id=2, count=3, master_pid=1, settings=Settings(),
                      home_cpu=1, cpus=(0, 1, 2))
        fields.update(changes)
        return WorkerEnvironment(**fields)

    def test_from_the_environment_when_pinned(self):
        self.assertEqual(Locality.of_worker(self.environment(), affinity=lambda: [1]),
                         self.locality)

    def test_through_the_process_environment(self):
        environ = self.environment().to_environ({})
        self.assertEqual(Locality.of_worker(WorkerEnvironment.from_environ(environ),
                                            affinity=lambda: [1]), self.locality)

    def test_none_when_not_pinned_to_home(self):
        self.assertIsNone(Locality.of_worker(self.environment(), affinity=lambda: [0, 1]))
        self.assertIsNone(Locality.of_worker(self.environment(), affinity=lambda: [0]))

    def test_none_when_not_asked(self):
        unasked = self.environment(home_cpu=None, cpus=())
        self.assertIsNone(Locality.of_worker(unasked, affinity=lambda: [1]))
