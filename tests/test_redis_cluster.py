"""
Redis with real clusters and a real redis-server: a connection per worker,
closed at shutdown; serving on while Redis is away; locked cron jobs that
run once per tick across clusters; the demo's page views, flushed once.
"""

import signal
import sqlite3
import time

from txcluster.testing import wait_until

from .integration import ClusterTestCase
from .redis_server import start_redis


class ConnectionTests(ClusterTestCase):
    def test_one_connection_per_worker_all_gone_after_shutdown(self):
        redis = start_redis(self)
        cluster = self.start(workers=3, args=["--redis", redis.url])
        wait_until(lambda: redis.client_count() == 3, 10, "3 Redis clients")
        self.assertEqual(cluster.stop(), 0)
        wait_until(lambda: redis.client_count() == 0, 10, "no Redis clients")

    def test_shutdown_hooks_can_still_use_redis(self):
        redis = start_redis(self)
        cluster = self.start(workers=2, args=["--redis", redis.url])
        workers = cluster.ready_workers()
        self.assertEqual(cluster.stop(), 0)
        for worker_id, pid in workers.items():
            self.assertEqual(redis.command("GET", f"test:shutdown:{worker_id}"), str(pid).encode())

    def test_pool_size_and_unix_socket(self):
        redis = start_redis(self)
        self.start(workers=2, args=["--redis", redis.unix_url + "?pool_size=2"])
        wait_until(lambda: redis.client_count() == 4, 10, "4 Redis clients")

    def test_bad_url_is_a_usage_error(self):
        cluster = self.start(workers=1, ready=0, args=["--redis", "redis://host:notaport"])
        self.assertNotEqual(cluster.wait_exit(20), 0)
        self.assertIn("--redis 'redis://host:notaport'", cluster.output)


class RedisAwayTests(ClusterTestCase):
    def test_serves_while_redis_is_away_and_recovers(self):
        redis = start_redis(self)
        database = self.path("views.sqlite")
        cluster = self.start(app=None, workers=2, args=["--redis", redis.url],
                             env={"TXCLUSTER_DEMO_DB": database})
        self.assertEqual(cluster.get_json("/views/home")["views"], 1)
        redis.stop()
        cluster.wait_for_log(r"\[worker \d\] .*lost the connection to Redis")
        for _ in range(10):
            self.assertEqual(cluster.get("/health")[0], 200)
        self.assertEqual(cluster.get("/views/home")[0], 503)
        redis.start()
        wait_until(lambda: cluster.get("/views/home")[0] == 200, 30, "Redis-backed route back")
        cluster.wait_for_log(r"\[worker \d\] .*reachable again")

    def test_starts_when_redis_is_down(self):
        redis = start_redis(self, start=False)
        cluster = self.start(app=None, workers=1, args=["--redis", redis.url], timeout=30)
        self.assertIn("unreachable", cluster.output)
        self.assertEqual(cluster.get("/health")[0], 200)
        redis.start()
        wait_until(lambda: cluster.get("/views/a")[0] == 200, 30, "Redis-backed route")


class LockedCronTests(ClusterTestCase):
    interval = 0.5

    def runs(self, path):
        return [(int(pid), float(at)) for pid, at in (line.split() for line in self.lines(path))]

    def assertOncePerTick(self, runs):
        gaps = [b[1] - a[1] for a, b in zip(runs, runs[1:])]
        self.assertTrue(all(gap > self.interval * 0.6 for gap in gaps), gaps)

    def test_once_per_tick_across_two_clusters_and_takeover(self):
        redis = start_redis(self)
        cron = self.path("cron")
        env = {"TEST_CRON": cron, "TEST_CRON_SECONDS": str(self.interval)}
        first = self.start(app="tests.lock_app:cluster", workers=2, env=env,
                           args=["--redis", redis.url])
        second = self.start(app="tests.lock_app:cluster", workers=2, env=env,
                            args=["--redis", redis.url])
        wait_until(lambda: len(self.lines(cron)) >= 8, 20, "8 locked cron runs")
        runs = self.runs(cron)
        self.assertEqual(len({pid for pid, _ in runs}), 1)  # one holder
        self.assertOncePerTick(runs)
        elapsed = runs[-1][1] - runs[0][1]
        self.assertLessEqual(len(runs), elapsed / self.interval + 2)

        holder = runs[0][0]
        owner, other = (first, second) if holder in first.worker_pids() else (second, first)
        owner.signal(signal.SIGKILL)  # the whole holding cluster dies
        killed_at = time.time()
        before = len(runs)
        wait_until(lambda: len(self.lines(cron)) >= before + 5, 20, "runs after takeover")
        after = [run for run in self.runs(cron) if run[1] > killed_at]
        new_holders = {pid for pid, _ in after} - {holder}
        self.assertEqual(len(new_holders), 1)
        self.assertTrue(new_holders <= other.worker_pids())
        self.assertOncePerTick(self.runs(cron))
        self.assertLess(after[-5 if len(after) >= 5 else 0][1] - killed_at,
                        2.5 * self.interval + 2.5)


class DemoViewsTests(ClusterTestCase):
    def test_views_reach_sqlite_exactly_once(self):
        redis = start_redis(self)
        database = self.path("views.sqlite")
        cluster = self.start(app=None, workers=2, args=["--redis", redis.url],
                             env={"TXCLUSTER_DEMO_FLUSH_SECONDS": "0.3",
                                  "TXCLUSTER_DEMO_DB": database})
        for i in range(60):
            cluster.get_json("/views/home" if i % 3 else "/views/about")
        expected = {"home": 40, "about": 20}
        wait_until(lambda: cluster.get_json("/views") == expected, 20, "flushed views")
        flushes = redis.calls("KEYS")  # each flush starts with KEYS (leftover batches)
        wait_until(lambda: redis.calls("KEYS") >= flushes + 3, 10, "three more flushes")
        self.assertEqual(cluster.get_json("/views"), expected)
        self.assertEqual(cluster.get_json("/views/home")["views"], 41)
        self.assertEqual(cluster.stop(), 0)
        with sqlite3.connect(database) as db:
            rows = dict(db.execute("SELECT page, count FROM views"))
        self.assertEqual(rows["about"], 20)
        self.assertIn(rows["home"], (40, 41))  # the 41st may still be in Redis

    def test_without_redis_the_demo_is_as_before(self):
        cluster = self.start(app=None, workers=1)
        self.assertEqual(cluster.get("/views/home")[0], 404)
        self.assertEqual(set(cluster.get_json("/")), {"worker", "pid", "workers"})
