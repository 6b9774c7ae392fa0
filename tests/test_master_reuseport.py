"""
--balance reuseport's sockets (L{ReusePortGroup}): real sockets on
loopback, bound through a memory reactor (the master never accepts on them).
"""

import os
import socket
from contextlib import closing

from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest

from txcluster.cpus import SO_INCOMING_CPU
from txcluster.master import reuseport
from txcluster.master.reuseport import ReusePortGroup, kernel_steers_by_cpu
from txcluster.master.sockets import StartupError


def pending_on(fd):
    """How many connections wait on the listening socket C{fd}; accepts (and
    closes) them."""
    listener = socket.socket(fileno=os.dup(fd))
    listener.setblocking(False)
    count = 0
    with closing(listener):
        while True:
            try:
                client, _ = listener.accept()
            except BlockingIOError:
                return count
            client.close()
            count += 1


def option(fd, name):
    probe = socket.socket(fileno=fd)
    try:
        return probe.getsockopt(socket.SOL_SOCKET, name)
    finally:
        probe.detach()


class ReusePortGroupTests(unittest.TestCase):
    def group(self, count=2, description="tcp:0:interface=127.0.0.1", **kwargs):
        group = ReusePortGroup(MemoryReactor(), description, count, **kwargs)
        self.addCleanup(group.close)
        return group

    def connect(self, group):
        client = socket.create_connection(("127.0.0.1", group.listening.getHost().port), timeout=5)
        self.addCleanup(client.close)
        return client

    def test_one_socket_per_worker_on_one_port(self):
        group = self.group(count=3)
        fds = [group.fileno(i) for i in (1, 2, 3)]
        self.assertEqual(len(set(fds)), 3)
        port = group.listening.getHost().port
        self.assertNotEqual(port, 0)
        for fd in fds:
            with closing(socket.socket(fileno=os.dup(fd))) as s:
                self.assertEqual(s.getsockname(), ("127.0.0.1", port))
            self.assertEqual(option(fd, socket.SO_REUSEPORT), 1)
        self.assertEqual(group.fileno(2), fds[1])  # the same socket each time

    def test_the_kernel_spreads_connections_over_them(self):
        group = self.group(count=2)
        for _ in range(64):
            self.connect(group)
        counts = [pending_on(group.fileno(i)) for i in (1, 2)]
        self.assertEqual(sum(counts), 64)
        self.assertTrue(all(counts), counts)  # each got some: 2**-63 odds otherwise

    def test_an_added_worker_gets_a_socket_and_a_removed_one_leaves_it_to_the_master(self):
        group = self.group(count=2)
        fd = group.fileno(3)
        self.assertNotIn(fd, (group.fileno(1), group.fileno(2)))
        self.assertEqual(group.unserved({1, 2}), [fd])  # worker 3 is starting
        self.assertEqual(group.unserved({1, 2, 3}), [])
        group.release(3)
        os.fstat(fd)  # still open, still in the group: nothing queued on it is reset
        self.assertEqual(group.unserved({1, 2}), [fd])
        self.assertEqual(group.fileno(3), fd)  # the id that comes back takes it
        self.assertEqual(group.unserved({1, 2, 3}), [])

    def test_close_closes_the_sockets_left_behind_too(self):
        group = self.group(count=2)
        fd = group.fileno(3)
        group.release(3)
        group.close()
        self.assertRaises(OSError, os.fstat, fd)
        self.assertEqual(group.unserved(set()), [])

    def test_a_worker_shares_a_socket_when_no_more_can_be_bound(self):
        group = self.group(count=2)

        def cannot_bind(port, factory):
            raise CannotListenError("127.0.0.1", port, OSError(13, "Permission denied"))

        group._binder.listen_more = cannot_bind
        self.assertEqual(group.fileno(3), group.fileno(1))
        self.assertEqual(group.fileno(4), group.fileno(2))
        group.release(3)  # not its own: the shared one stays open
        os.fstat(group.fileno(1))

    def test_not_a_tcp_endpoint(self):
        error = self.assertRaises(StartupError, ReusePortGroup, MemoryReactor(),
                                  "unix:/tmp/txcluster-test.sock", 2)
        self.assertIn("--balance reuseport needs a tcp:", str(error))

    def test_address_in_use_is_a_startup_error_that_leaves_nothing_bound(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            error = self.assertRaises(StartupError, ReusePortGroup, MemoryReactor(),
                                      f"tcp:{port}:interface=127.0.0.1", 2)
        self.assertIn(f"--listen tcp:{port}", str(error))
        group = self.group(description=f"tcp:{port}:interface=127.0.0.1")  # free again
        self.assertEqual(group.listening.getHost().port, port)

    def test_a_port_another_reuseport_group_holds_is_in_use(self):
        # Joining it would silently take part of that group's connections.
        with socket.socket() as taken:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            error = self.assertRaises(StartupError, ReusePortGroup, MemoryReactor(),
                                      f"tcp:{port}:interface=127.0.0.1", 2)
        self.assertIn("in use", str(error))

    def test_a_later_socket_that_cannot_be_bound_is_a_startup_error(self):
        bound = []
        listen_more = reuseport._ReusePortReactor.listen_more

        def only_once(binder, port, factory):
            if bound:
                raise CannotListenError("127.0.0.1", port, OSError(24, "Too many open files"))
            bound.append(listen_more(binder, port, factory))
            return bound[-1]

        self.patch(reuseport._ReusePortReactor, "listen_more", only_once)
        error = self.assertRaises(StartupError, ReusePortGroup, MemoryReactor(),
                                  "tcp:0:interface=127.0.0.1", 3)
        self.assertEqual(str(error), "Too many open files binding socket 2 of 3 "
                                     "(--listen tcp:0:interface=127.0.0.1)")
        self.assertEqual(bound[0].socket.fileno(), -1)  # the first was closed

    def test_sockets_are_marked_with_their_workers_cpu(self):
        group = self.group(count=3, cpu_of=lambda worker_id: 10 + worker_id, kernel_steers=True)
        for worker_id in (1, 2, 3, 4):
            self.assertEqual(option(group.fileno(worker_id), SO_INCOMING_CPU),
                             10 + worker_id)
            self.assertTrue(group.steers(worker_id))

    def test_a_socket_left_behind_is_unmarked_and_marked_again_when_taken(self):
        # Still marked, it would take every connection of its CPU to the master.
        group = self.group(count=3, cpu_of=lambda worker_id: worker_id % 2, kernel_steers=True)
        fd = group.fileno(3)
        group.release(3)
        self.assertEqual(option(fd, SO_INCOMING_CPU), -1)
        self.assertEqual(group.fileno(3), fd)
        self.assertEqual(option(fd, SO_INCOMING_CPU), 1)

    def test_steering_off_clears_the_marks_and_on_restores_them(self):
        """(The steering guard's switch.)  A socket bound meanwhile is not
        marked until steering is back."""
        group = self.group(count=2, cpu_of=lambda worker_id: 10 + worker_id, kernel_steers=True)
        group.steer(False)
        self.assertEqual([option(group.fileno(i), SO_INCOMING_CPU) for i in (1, 2, 3)],
                         [-1, -1, -1])
        group.steer(True)
        self.assertEqual([option(group.fileno(i), SO_INCOMING_CPU) for i in (1, 2, 3)],
                         [11, 12, 13])
        unsteered = self.group(count=1, cpu_of=lambda worker_id: 0, kernel_steers=False)
        unsteered.steer(True)
        self.assertEqual(option(unsteered.fileno(1), SO_INCOMING_CPU), -1)

    def test_no_marks_where_the_kernel_would_not_steer(self):
        # Workers would send back clients that moved, and the kernel would
        # hash the new connections anywhere: churn for nothing.
        group = self.group(count=2, cpu_of=lambda worker_id: worker_id, kernel_steers=False)
        self.assertEqual(option(group.fileno(1), SO_INCOMING_CPU), -1)
        self.assertFalse(group.steers(1))
        self.assertFalse(self.group(count=1).steers(1))

    def test_a_worker_sharing_a_socket_is_not_steered(self):
        group = self.group(count=2, cpu_of=lambda worker_id: worker_id, kernel_steers=True)

        def cannot_bind(port, factory):
            raise CannotListenError("127.0.0.1", port, OSError(13, "Permission denied"))

        group._binder.listen_more = cannot_bind
        group.fileno(3)
        self.assertFalse(group.steers(3))
        self.assertTrue(group.steers(2))

    def test_which_kernels_steer(self):
        self.assertTrue(kernel_steers_by_cpu("6.18.5-cloud-amd64"))
        self.assertTrue(kernel_steers_by_cpu("6.2.0"))
        self.assertFalse(kernel_steers_by_cpu("6.1.0-28-amd64"))
        self.assertFalse(kernel_steers_by_cpu("5.15.0"))
        self.assertFalse(kernel_steers_by_cpu("unknown"))

    def test_the_kernel_hands_a_connection_to_the_socket_of_its_cpu(self):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2 or not kernel_steers_by_cpu():
            # One CPU, or a kernel before 6.2: the group knows it does not
            # steer, and every connection still reaches one of its sockets.
            group = self.group(count=2, cpu_of=lambda worker_id: cpus[0])
            self.assertEqual(group.steering, kernel_steers_by_cpu())
            for _ in range(8):
                self.connect(group)
            self.assertEqual(pending_on(group.fileno(1)) + pending_on(group.fileno(2)), 8)
            return
        group = self.group(count=2, cpu_of=lambda worker_id: cpus[worker_id - 1])
        self.addCleanup(os.sched_setaffinity, 0, cpus)
        for worker_id in (1, 2, 1, 2):
            os.sched_setaffinity(0, {cpus[worker_id - 1]})  # this thread only
            for _ in range(8):
                self.connect(group)
            self.assertEqual(pending_on(group.fileno(worker_id)), 8, worker_id)
            self.assertEqual(pending_on(group.fileno(3 - worker_id)), 0, worker_id)
