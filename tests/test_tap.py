"""The plugin's entry point builds the right service without starting it."""

import os
import socket
from contextlib import closing

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from txcluster.balancing import SO_INCOMING_CPU, cpu_for
from txcluster.master import MasterService, SingleProcessService, policy_from
from txcluster.reuseport import kernel_steers_by_cpu
from txcluster.tap import Options, build_service


def settings(*argv):
    options = Options(environ={}, cpu_count=lambda: 2)
    options.parseOptions(list(argv))
    return options.settings


class BuildServiceTests(unittest.TestCase):
    def test_cluster(self):
        reactor = MemoryReactorClock()
        service = build_service(settings("--workers", "3"), reactor)
        self.assertIsInstance(service, MasterService)
        self.assertIsNone(service.listening)  # nothing bound until started
        self.assertEqual(reactor.tcpServers, [])

    def test_reuseport_binds_a_socket_per_worker_before_privileges_drop(self):
        service = build_service(settings("--workers", "3", "--balance", "reuseport",
                                         "--listen", "tcp:0:interface=127.0.0.1"),
                                MemoryReactorClock())
        service.privilegedStartService()
        self.addCleanup(service.sockets.close)
        fds = {service._listening_fd(worker_id) for worker_id in (1, 2, 3)}
        self.assertEqual(len(fds), 3)
        self.assertIs(service.listening, service.sockets.first)

    def test_reuseport_with_cpu_affinity_marks_each_socket_with_its_workers_cpu(self):
        cpus = sorted(os.sched_getaffinity(0))
        for args, steered in ((["--cpu-affinity"], kernel_steers_by_cpu()), ([], False)):
            service = build_service(settings("--workers", "3", "--balance", "reuseport",
                                             "--listen", "tcp:0:interface=127.0.0.1", *args),
                                    MemoryReactorClock())
            service.privilegedStartService()
            self.addCleanup(service.sockets.close)
            for worker_id in (1, 2, 3):
                with closing(socket.socket(fileno=os.dup(service._listening_fd(worker_id)))) as s:
                    marked = s.getsockopt(socket.SOL_SOCKET, SO_INCOMING_CPU)
                self.assertEqual(marked, cpu_for(worker_id, cpus) if steered else -1, args)
                self.assertEqual(service._steered(worker_id), steered, args)

    def test_single(self):
        service = build_service(settings("--single"), MemoryReactorClock())
        self.assertIsInstance(service, SingleProcessService)

    def test_policy_follows_the_options(self):
        policy = policy_from(settings("--timeout", "7", "--shutdown-timeout", "9",
                                      "--ready-timeout", "11", "--respawn-delay", "3"))
        self.assertEqual((policy.silence_timeout, policy.shutdown_timeout,
                          policy.ready_timeout, policy.max_delay), (7, 9, 11, 3))


class UsageErrorTests(unittest.TestCase):
    def test_a_bad_value_is_one_line_naming_it(self):
        for argv, named in [(["--workers", "abc"], "--workers 'abc'"),
                            (["--wrokers", "3"], "wrokers")]:
            error = self.assertRaises(SystemExit, settings, *argv)
            self.assertIsInstance(error.code, str)
            self.assertEqual(len(error.code.splitlines()), 1)
            self.assertIn(named, error.code)

    def test_help_still_exits_0(self):
        error = self.assertRaises(SystemExit, settings, "--help")
        self.assertEqual(error.code, 0)
