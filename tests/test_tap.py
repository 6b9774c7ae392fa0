"""The plugin's entry point builds the right service, bound but not started."""

import os
import socket
from contextlib import closing

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from txcluster.cpus import SO_INCOMING_CPU, cpu_for, usable_cpus
from txcluster.master.dispatch import ConnectionDispatcher
from txcluster.master.reuseport import kernel_steers_by_cpu
from txcluster.master.service import MasterService, policy_from
from txcluster.single import SingleProcessService
from txcluster.tap import Options, build_service, makeService

LOOPBACK = "tcp:0:interface=127.0.0.1"


def settings(*argv):
    options = Options(environ={}, cpu_count=lambda: 2)
    options.parseOptions(list(argv))
    return options.settings


class BuildServiceTests(unittest.TestCase):
    def build(self, *argv, reactor=None):
        """Build with a real reactor's ports (bound, never started)."""
        if reactor is None:
            from twisted.internet import reactor
        service = build_service(settings(*argv), reactor)
        listening = getattr(service, "listeners", service).listening
        self.addCleanup(lambda: listening.socket.close())
        if getattr(service, "dispatcher", None) is not None:
            self.addCleanup(service.dispatcher.close)
        return service

    def test_cluster_binds_at_once_and_starts_no_worker(self):
        service = self.build("--workers", "3", "--listen", LOOPBACK)
        self.assertIsInstance(service, MasterService)
        self.assertNotEqual(service.listeners.listening.getHost().port, 0)
        self.assertIsInstance(service.dispatcher, ConnectionDispatcher)
        self.assertEqual(service.supervisor.processes, [])
        self.assertFalse(service.running)

    def test_in_kernel_mode_the_master_accepts_nothing_and_deals_what_is_handed_back(self):
        service = self.build("--balance", "kernel", "--listen", LOOPBACK)
        self.assertEqual(service.dispatcher.sockets, [])
        self.assertTrue(service.dispatcher.takes_back())

    def test_reuseport_binds_a_socket_per_worker_before_privileges_drop(self):
        service = self.build("--workers", "3", "--balance", "reuseport", "--listen", LOOPBACK,
                             reactor=MemoryReactorClock())
        self.addCleanup(service.listeners.close)
        fds = {service.listeners.fileno(worker_id) for worker_id in (1, 2, 3)}
        self.assertEqual(len(fds), 3)

    def test_reuseport_with_cpu_affinity_marks_each_socket_with_its_workers_cpu(self):
        cpus = usable_cpus()
        for args, steered in ((["--cpu-affinity"], kernel_steers_by_cpu()), ([], False)):
            service = self.build("--workers", "3", "--balance", "reuseport",
                                 "--listen", LOOPBACK, *args, reactor=MemoryReactorClock())
            self.addCleanup(service.listeners.close)
            for worker_id in (1, 2, 3):
                fd = os.dup(service.listeners.fileno(worker_id))
                with closing(socket.socket(fileno=fd)) as s:
                    marked = s.getsockopt(socket.SOL_SOCKET, SO_INCOMING_CPU)
                self.assertEqual(marked, cpu_for(worker_id, cpus) if steered else -1, args)
                self.assertEqual(service.listeners.steers(worker_id), steered, args)

    def test_single(self):
        service = self.build("--single", "--listen", LOOPBACK)
        self.assertIsInstance(service, SingleProcessService)

    def test_policy_follows_the_options(self):
        policy = policy_from(settings("--timeout", "7", "--shutdown-timeout", "9",
                                      "--ready-timeout", "11", "--respawn-delay", "3"))
        self.assertEqual((policy.silence_timeout, policy.shutdown_timeout,
                          policy.ready_timeout, policy.max_delay), (7, 9, 11, 3))

    def test_an_address_in_use_is_one_line_naming_it(self):
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        listen = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        for argv in (["--workers", "2"], ["--single"]):
            options = Options(environ={}, cpu_count=lambda: 2)
            options.parseOptions(["--listen", listen, *argv])
            error = self.assertRaises(SystemExit, makeService, options)
            self.assertEqual(len(error.code.splitlines()), 1)
            self.assertIn(f"--listen {listen}", error.code)


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


class OpenFilesLimitTests(unittest.TestCase):
    def test_the_soft_limit_is_raised_to_the_hard_one_which_stays(self):
        import json
        import subprocess
        import sys

        script = (
            "import json, resource\n"
            "from txcluster.tap import raise_open_files_limit\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
            "raised = raise_open_files_limit()\n"
            "print(json.dumps([hard, raised, resource.getrlimit(resource.RLIMIT_NOFILE),\n"
            "                  raise_open_files_limit()]))\n")
        hard, raised, now, again = json.loads(subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
        self.assertEqual(now[1], hard)  # the hard limit is left as it was
        self.assertEqual(raised, [256, now[0]])
        self.assertIsNone(again)  # nothing left to raise
