"""
wrk against a real cluster on loopback: no errors, and the load spread over
the workers, with keep-alive and with a new connection per request.
"""

from twisted.trial import unittest

from txcluster.testing import run_wrk, wrk_available

from .integration import ClusterTestCase


class WrkLoadTests(ClusterTestCase):
    workers = 2

    def setUp(self):
        if not wrk_available():
            raise unittest.SkipTest("wrk is not installed (apt-get install wrk)")

    def assertSpread(self, result):
        self.assertEqual((result.errors, result.non2xx), (0, 0))
        self.assertGreater(result.requests, 500)
        shares = [result.workers.get(i, 0) / result.requests for i in range(1, self.workers + 1)]
        # Even would be 1/N each; no worker may be left idle or take it all.
        for share in shares:
            self.assertGreater(share, 0.5 / self.workers, shares)
            self.assertLess(share, 1.5 / self.workers, shares)

    def test_keep_alive(self):
        cluster = self.start(app=None, workers=self.workers)
        self.assertSpread(run_wrk([cluster.url], connections=32, threads=2, seconds=2))

    def test_new_connection_per_request(self):
        cluster = self.start(app=None, workers=self.workers)
        self.assertSpread(run_wrk([cluster.url], connections=32, threads=2, seconds=2,
                                  close=True))


class KernelBalanceWrkLoadTests(WrkLoadTests):
    cluster_args = ("--balance", "kernel")


class CpuAffinityWrkLoadTests(WrkLoadTests):
    """With pinned workers and steering (unit-tested in test_balancing),
    the load is still spread over every worker."""

    workers = 4
    cluster_args = ("--cpu-affinity",)


class ReusePortWrkLoadTests(WrkLoadTests):
    """The kernel hashes each connection to a worker's socket."""

    cluster_args = ("--balance", "reuseport")
