"""The plugin's entry point builds the right service without starting it."""

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from txcluster.master import MasterService, SingleProcessService, policy_from
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

    def test_single(self):
        service = build_service(settings("--single"), MemoryReactorClock())
        self.assertIsInstance(service, SingleProcessService)

    def test_policy_follows_the_options(self):
        policy = policy_from(settings("--timeout", "7", "--shutdown-timeout", "9",
                                      "--ready-timeout", "11", "--respawn-delay", "3"))
        self.assertEqual((policy.silence_timeout, policy.shutdown_timeout,
                          policy.ready_timeout, policy.max_delay), (7, 9, 11, 3))
