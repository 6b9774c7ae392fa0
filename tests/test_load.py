"""
Concurrent load against a real cluster on loopback, with keep-alive and
with a new connection per request: no request fails, and every worker
takes its share.  The load is L{txcluster.testing.Load}, plain Python
threads, so this runs wherever the test extra is installed; throughput is
measured with wrk in bench/, not here.
"""

from txcluster.testing import Load

from .integration import ClusterTestCase

#: Enough clients that the split says something, few enough for 2 cores.
CLIENTS = 24
REQUESTS_EACH = 20


class LoadTests(ClusterTestCase):
    """The default mode (C{auto}: here, on 2 CPUs or more, reuseport with
    the workers pinned): the ledger keeps the split even."""

    workers = 2
    #: no worker may get less than this fraction of an even share (or as
    #: much more)
    fairness = 0.5

    def assertSpread(self, load):
        self.assertEqual((load.failed, load.errors[:3]), (0, []))
        self.assertEqual(load.sent, CLIENTS * REQUESTS_EACH)
        answers = load.answers
        shares = [answers[i] / load.sent for i in range(1, self.workers + 1)]
        # Even would be 1/N each; no worker may be left idle or take it all.
        for share in shares:
            self.assertGreater(share, self.fairness / self.workers, shares)
            self.assertLess(share, (2 - self.fairness) / self.workers, shares)

    def run_load(self, keepalive):
        cluster = self.start(app=None, workers=self.workers)
        clients = dict(close_clients=0, keepalive_clients=CLIENTS) if keepalive else \
            dict(close_clients=CLIENTS, keepalive_clients=0)
        with Load(cluster.url, max_requests=REQUESTS_EACH, max_seconds=60, **clients) as load:
            load.wait(timeout=60)
        return load

    def test_keep_alive(self):
        self.assertSpread(self.run_load(keepalive=True))

    def test_new_connection_per_request(self):
        self.assertSpread(self.run_load(keepalive=False))


class RoundRobinLoadTests(LoadTests):
    """The master deals every connection: round-robin's dealer keeps the
    split even."""

    cluster_args = ("--balance", "round-robin")


class KernelBalanceLoadTests(LoadTests):
    """The workers race for each connection on the shared socket: even on
    average (0.39-0.50 of 24 connections to the lesser in isolation), less
    so on a loaded machine, but no worker is left out."""

    cluster_args = ("--balance", "kernel")
    fairness = 0.2


class CpuAffinityLoadTests(LoadTests):
    """More workers than CPUs, pinned two to a CPU: 24 keep-alive clients
    starting at once are a burst, which earns no slack
    (L{txcluster.ledger.served_slack}), so however the kernel steered
    them no worker keeps more than half again the least loaded's open
    connections, plus one a worker on the other CPU may decide at the
    same moment: 9 of 24 at worst (7 in 30 runs)."""

    workers = 4
    cluster_args = ("--cpu-affinity",)
    fairness = 0.4


class ReusePortLoadTests(LoadTests):
    """The kernel hashes each connection to a worker's socket: as even as
    the hash of 24 connections (5 of 24 happens), but every worker serves."""

    cluster_args = ("--balance", "reuseport")
    fairness = 0.0
