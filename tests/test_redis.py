"""
txcluster.redis against a real redis-server: URL parsing, connecting
(also while Redis is down), disconnecting, and the cron lease.
"""

import time
from typing import Any, Callable, List

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import (
    CancelledError, Deferred, DeferredList, ensureDeferred, maybeDeferred, succeed,
)
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from txcluster.app import CronSpec
from txcluster.testing import eventually as _eventually
from txcluster.cron import CronService
from txcluster.redis import (
    RedisConfig, RedisLease, RedisSetupError, connect, connected, disconnect,
    fenced_set, lease_seconds, parse_redis_url,
)

from .redis_server import start_redis


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


def eventually(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    return _eventually(condition, timeout, what)


class RedisTestCase(unittest.TestCase):
    """A fresh server per test, and the txcluster.redis log lines."""

    start_server = True

    def setUp(self) -> None:
        self.server = start_redis(self, start=self.start_server)
        self.logged: List[tuple] = []

        def observe(event: dict) -> None:
            if event.get("log_namespace") == "txcluster.redis":
                self.logged.append((event["log_level"], formatEvent(event)))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def lines(self, level: LogLevel) -> List[str]:
        return [text for lvl, text in self.logged if lvl == level]

    async def connect(self, url: str = "", **kwargs: Any) -> txredisapi.ConnectionHandler:
        """Connect (to this test's server by default); disconnected after the test."""
        connection = await connect(parse_redis_url(url or self.server.url), reactor, **kwargs)
        self.addCleanup(lambda: ensureDeferred(disconnect(connection)))
        return connection


# URLs ----------------------------------------------------------------------


class ParseURLTests(unittest.TestCase):
    def test_everything(self):
        config = parse_redis_url("redis://:s3cret@redis.example:6380/2?pool_size=4")
        self.assertEqual(config, RedisConfig(host="redis.example", port=6380, db=2,
                                             password="s3cret", pool_size=4))

    def test_defaults(self):
        self.assertEqual(parse_redis_url("redis://localhost"),
                         RedisConfig(host="localhost", port=6379, db=0, pool_size=1))
        self.assertEqual(parse_redis_url("redis://localhost:6379/"),
                         RedisConfig(host="localhost"))

    def test_user_and_percent_encoded_password(self):
        config = parse_redis_url("redis://app:p%40ss%3Aw@10.0.0.1:6379/0")
        self.assertEqual((config.username, config.password), ("app", "p@ss:w"))

    def test_ipv6(self):
        config = parse_redis_url("redis://[::1]:7000")
        self.assertEqual((config.host, config.port), ("::1", 7000))
        self.assertEqual(config.where, "[::1]:7000 db 0")

    def test_db_as_query_parameter(self):
        self.assertEqual(parse_redis_url("redis://h?db=5").db, 5)

    def test_unix(self):
        self.assertEqual(parse_redis_url("unix:///run/redis/redis.sock?db=3&pool_size=2"),
                         RedisConfig(path="/run/redis/redis.sock", db=3, pool_size=2))
        config = parse_redis_url("unix://:pw@/run/redis.sock")
        self.assertEqual((config.path, config.password, config.db), ("/run/redis.sock", "pw", 0))
        self.assertEqual(config.where, "unix:/run/redis.sock db 0")

    def test_password_never_shown(self):
        config = parse_redis_url("redis://u:hunter2@h:1/1")
        self.assertNotIn("hunter2", repr(config))
        self.assertNotIn("hunter2", config.where)

    def test_bad_urls(self):
        bad = [
            ("http://localhost", "expected redis://"),
            ("localhost:6379", "expected redis://"),
            ("rediss://localhost", "expected redis://"),
            ("redis://", "no host"),
            ("redis://:pw@", "no host"),
            ("redis://h:abc", "bad port"),
            ("redis://h:70000", "bad port"),
            ("redis://h:0", "port 0"),
            ("redis://h/abc", "database must be a whole number"),
            ("redis://h/-1", "database must be a whole number"),
            ("redis://h/1/2", "database must be a whole number"),
            ("redis://h/1?db=2", "both"),
            ("redis://h?db=x", "db must be a whole number"),
            ("redis://h?pool_size=0", "pool_size must be a whole number >= 1"),
            ("redis://h?pool_size=two", "pool_size must be a whole number"),
            ("redis://h?pool_size=1&pool_size=2", "given twice"),
            ("redis://h?timeout=3", "unknown parameter 'timeout'"),
            ("redis://h?pool_size", "cannot parse the query"),
            ("redis://user@h", "needs a password"),
            ("redis://user:@h", "needs a password"),
            ("unix://", "without a socket path"),
            ("unix://relative/redis.sock", "have no host"),
            ("unix://host/tmp/redis.sock", "have no host"),
        ]
        for url, expected in bad:
            with self.assertRaises(ValueError, msg=url) as caught:
                parse_redis_url(url)
            message = str(caught.exception)
            self.assertIn(expected, message, url)
            self.assertNotIn("\n", message, url)

    def test_bad_url_message_hides_password(self):
        with self.assertRaises(ValueError) as caught:
            parse_redis_url("redis://:hunter2@h:port/0")
        self.assertNotIn("hunter2", str(caught.exception))


# Connecting ----------------------------------------------------------------


class ConnectTests(RedisTestCase):
    async def test_the_pool_behind_a_connection_is_ours(self):
        from txcluster.redis import _PoolFactory, pool_of

        redis = await self.connect()
        pool = pool_of(redis)
        self.assertIsInstance(pool, _PoolFactory)
        self.assertEqual((pool.size, pool.disconnectCalled), (1, False))
        self.assertTrue(callable(pool.waitForEmptyPool))

    async def test_set_get_tcp(self):
        redis = await self.connect()
        self.assertTrue(connected(redis))
        await redis.set("greeting", "hello")
        self.assertEqual(await redis.get("greeting"), "hello")
        self.assertEqual(self.server.command("GET", "greeting"), b"hello")
        self.assertEqual(self.logged, [])

    async def test_set_get_unix_socket(self):
        redis = await self.connect(self.server.unix_url)
        await redis.set("over", "unix")
        self.assertEqual(self.server.command("GET", "over"), b"unix")

    async def test_database_selected(self):
        redis = await self.connect(self.server.url + "/3")
        await redis.set("k", "v")
        self.assertIn(b"db3:keys=1", self.server.command("INFO", "keyspace"))
        self.assertIsNone(self.server.command("GET", "k"))  # not in db 0

    async def test_pool_size_connections(self):
        redis = await self.connect(self.server.url + "?pool_size=3")
        await eventually(lambda: self.server.client_count() == 3, "3 clients")
        await DeferredList([redis.incr("n") for _ in range(9)], fireOnOneErrback=True)
        self.assertEqual(await redis.get("n"), 9)
        self.assertEqual(self.server.client_count(), 3)

    async def test_disconnect_closes_all_and_does_not_reconnect(self):
        redis = await connect(parse_redis_url(self.server.url + "?pool_size=3"), reactor)
        await eventually(lambda: self.server.client_count() == 3, "3 clients")
        await disconnect(redis)
        self.assertFalse(connected(redis))
        await eventually(lambda: self.server.client_count() == 0, "no clients")
        await sleep(1.5)  # txredisapi's first reconnection would come after ~1 s
        self.assertEqual(self.server.client_count(), 0)
        with self.assertRaises(txredisapi.ConnectionError):
            await redis.get("k")
        await disconnect(redis)  # twice is harmless

    async def test_disconnect_fails_commands_in_flight(self):
        redis = await self.connect()
        pending = redis.blpop(["nothing"], timeout=5)
        await sleep(0.05)
        self.assertNoResult(pending)
        await disconnect(redis)
        error = self.failureResultOf(pending, txredisapi.ConnectionError)
        self.assertIn("Lost connection", str(error.value))
        await disconnect(redis)  # at once again (from txredisapi's call stack)

    async def test_wrong_password_is_a_setup_error(self):
        url = f"redis://:hunter2@127.0.0.1:{self.server.port}"
        started = time.monotonic()
        with self.assertRaises(RedisSetupError) as caught:
            await connect(parse_redis_url(url), reactor)
        self.assertLess(time.monotonic() - started, 4)
        self.assertIn("refused the connection", str(caught.exception))
        self.assertNotIn("hunter2", str(caught.exception))
        await eventually(lambda: self.server.client_count() == 0, "no clients")

    async def test_bad_database_is_a_setup_error(self):
        with self.assertRaises(RedisSetupError) as caught:
            await connect(parse_redis_url(self.server.url + "/99"), reactor)
        self.assertIn("DB index is out of range", str(caught.exception))
        await eventually(lambda: self.server.client_count() == 0, "no clients")

    async def test_commands_wait_while_down_and_run_once_back(self):
        redis = await self.connect()
        self.server.kill()
        await eventually(lambda: not connected(redis), "the connection to drop")
        self.assertEqual(len(self.lines(LogLevel.warn)), 1)
        self.assertIn("lost the connection", self.lines(LogLevel.warn)[0])
        pending = redis.set("k", "later")
        await sleep(0.2)
        self.assertNoResult(pending)
        self.server.start()
        await pending.addTimeout(15, reactor)
        self.assertEqual(self.server.command("GET", "k"), b"later")
        self.assertIn("reachable again", self.lines(LogLevel.info)[0])


class DownAtStartTests(RedisTestCase):
    start_server = False

    async def test_connect_while_down_returns_and_connects_later(self):
        started = time.monotonic()
        redis = await self.connect(wait=0.3)
        self.assertLess(time.monotonic() - started, 2)
        self.assertFalse(connected(redis))
        [warning] = self.lines(LogLevel.warn)
        self.assertIn("unreachable after 0.3s", warning)
        self.assertIn(f"127.0.0.1:{self.server.port}", warning)

        self.server.start()
        await eventually(lambda: connected(redis), "the background connection", 15)
        await redis.set("k", "v")
        self.assertEqual(await redis.get("k"), "v")
        self.assertIn("reachable again", self.lines(LogLevel.info)[0])

    async def test_cancelled_connect_stops_trying(self):
        connecting = ensureDeferred(connect(parse_redis_url(self.server.url), reactor, wait=10))
        await sleep(0.1)
        connecting.cancel()
        self.failureResultOf(connecting, CancelledError)
        self.server.start()
        await sleep(1.5)  # the first retry would have come after ~1 s
        self.assertEqual(self.server.client_count(), 0)

    async def test_disconnect_while_down_stops_trying(self):
        redis = await connect(parse_redis_url(self.server.url), reactor, wait=0.1)
        await ensureDeferred(disconnect(redis)).addTimeout(5, reactor)
        self.server.start()
        await sleep(1.5)  # the first retry would have come after ~1 s
        self.assertEqual(self.server.client_count(), 0)


# The cron lease ------------------------------------------------------------


class LeaseTests(RedisTestCase):
    INTERVAL = 0.3

    async def setUp(self):
        super().setUp()
        self.a = RedisLease(await self.connect(), reactor)
        self.b = RedisLease(await self.connect(), reactor)
        self.runs: List[tuple] = []

        def job(lease):
            pass

        self.spec = CronSpec(job, self.INTERVAL, lock=True)

    def run_as(self, name: str, seconds: float = 0) -> Callable[[Any], Deferred]:
        """A run that records who ran it, with which lease, and takes C{seconds}."""
        def run(lease) -> Deferred:
            self.runs.append((name, time.monotonic(), lease))
            return succeed(None) if not seconds else sleep(seconds)
        return run

    def who(self) -> List[str]:
        return [name for name, _, _ in self.runs]

    def value(self) -> str:
        return self.server.command("GET", self.a.key(self.spec)).decode()

    def test_lease_lasts_interval_and_a_half_at_most_plus_a_minute(self):
        self.assertEqual(lease_seconds(0.3), 0.3 + 0.15)
        self.assertEqual(lease_seconds(60), 90)
        self.assertEqual(lease_seconds(3600), 3660)

    def test_key_and_holders(self):
        self.assertEqual(self.a.key(self.spec), "txcluster:cron:" + self.spec.name)
        self.assertNotEqual(self.a.holder, self.b.holder)
        self.assertEqual(RedisLease(None, reactor, holder_factory=lambda: "me").holder, "me")

    async def test_one_guard_runs_per_tick(self):
        for tick in range(4):
            results = await DeferredList([self.a(self.spec, self.run_as("a")),
                                          self.b(self.spec, self.run_as("b"))],
                                         fireOnOneErrback=True)
            self.assertEqual(len(self.runs), tick + 1)
            self.assertEqual(sum(r is None for _, r in results), 1)  # the holder's
            await sleep(self.INTERVAL)
        token, holder = self.value().split(" ")
        self.assertIn(holder, (self.a.holder, self.b.holder))
        self.assertLessEqual(self.server.command("PTTL", self.a.key(self.spec)), 450)

    async def test_the_holder_keeps_its_token_from_tick_to_tick(self):
        await self.a(self.spec, self.run_as("a"))
        await self.a(self.spec, self.run_as("a"))
        first, second = (lease for _, _, lease in self.runs)
        self.assertIs(first, second)
        self.assertEqual(self.value(), f"{first.token} {self.a.holder}")
        self.assertEqual(first.job, self.spec.name)

    async def test_every_acquisition_has_a_higher_token_across_jobs(self):
        def other(lease):
            pass

        other_spec = CronSpec(other, self.INTERVAL, lock=True)
        await self.a(self.spec, self.run_as("a"))
        await self.b(other_spec, self.run_as("b"))
        await self.a.release()
        await self.b(self.spec, self.run_as("b"))
        tokens = [lease.token for _, _, lease in self.runs]
        self.assertEqual(tokens, sorted(set(tokens)))
        self.assertEqual(int(self.server.command("GET", "txcluster:fencing-token")), tokens[-1])

    async def test_a_guard_that_finds_it_held_tries_again_after_the_holders_next_tick(self):
        await self.a(self.spec, self.run_as("a"))
        retry_in = await self.b(self.spec, self.run_as("b"))
        # the holder's next tick is one interval after its run; a little later
        self.assertLess(abs(retry_in - (self.INTERVAL + self.INTERVAL / 20)), 0.05, retry_in)
        self.assertEqual(self.who(), ["a"])

    def test_next_attempt(self):
        # held for more than the grace: just after the holder's next tick
        self.assertAlmostEqual(self.a._next_attempt(CronSpec(None, 60), 80), 50.1)
        # no more than the grace: the holder is late; as the lease expires
        self.assertAlmostEqual(self.a._next_attempt(CronSpec(None, 60), 20), 20.1)
        self.assertAlmostEqual(self.a._next_attempt(CronSpec(None, 1), 0.2), 0.25)

    async def test_another_guard_takes_over_once_the_lease_expires(self):
        before = time.monotonic()
        await self.a(self.spec, self.run_as("a"))
        deadline = time.monotonic() + 5
        while "b" not in self.who() and time.monotonic() < deadline:
            await sleep(0.05)
            await self.b(self.spec, self.run_as("b"))
        self.assertEqual(self.who(), ["a", "b"])
        taken_over_after = self.runs[1][1] - before
        self.assertGreaterEqual(taken_over_after, lease_seconds(self.INTERVAL) - 0.02)
        await self.a(self.spec, self.run_as("a"))  # now a skips
        self.assertEqual(self.who(), ["a", "b"])
        self.assertGreater(self.runs[1][2].token, self.runs[0][2].token)

    async def test_a_released_lease_ends_when_the_holders_next_tick_was_due(self):
        await self.a(self.spec, self.run_as("a"))
        await self.a.release()
        self.assertLessEqual(self.server.command("PTTL", self.a.key(self.spec)),
                             self.INTERVAL * 1000)
        self.assertIsNotNone(await self.b(self.spec, self.run_as("b")))  # not this tick
        await sleep(self.INTERVAL)
        self.assertIsNone(await self.b(self.spec, self.run_as("b")))  # the next one
        self.assertEqual(self.who(), ["a", "b"])
        await self.a.release()  # holds nothing now: harmless
        self.assertEqual(self.value().split(" ")[1], self.b.holder)

    async def test_a_lease_released_after_its_next_tick_was_due_is_deleted(self):
        await self.a(self.spec, self.run_as("a", seconds=1.2 * self.INTERVAL))
        await self.a.release()
        self.assertEqual(self.server.command("EXISTS", self.a.key(self.spec)), 0)

    async def test_release_leaves_a_lease_taken_meanwhile_alone(self):
        await self.a(self.spec, self.run_as("a"))
        self.server.command("SET", self.a.key(self.spec), "99 someone-else")
        await self.a.release()
        self.assertEqual(self.value(), "99 someone-else")

    async def test_long_run_renews_its_lease(self):
        long_run = self.a(self.spec, self.run_as("a", seconds=4 * self.INTERVAL))
        while not long_run.called:
            await self.b(self.spec, self.run_as("b"))
            await sleep(0.1)
        self.assertEqual(self.who(), ["a"])
        self.assertFalse(self.runs[0][2].lost)
        deadline = time.monotonic() + 5
        while "b" not in self.who() and time.monotonic() < deadline:
            await sleep(0.05)
            await self.b(self.spec, self.run_as("b"))
        self.assertEqual(self.who(), ["a", "b"])  # and it is free once the run ends

    async def test_a_renewal_never_takes_a_lost_lease_back(self):
        long_run = self.a(self.spec, self.run_as("a", seconds=2 * self.INTERVAL))
        await eventually(lambda: self.runs, "the run to start")
        self.server.command("SET", self.a.key(self.spec), "99 someone-else", "PX", 5000)
        await long_run
        lease = self.runs[0][2]
        self.assertTrue(lease.lost)
        self.assertEqual(self.value(), "99 someone-else")
        [error] = self.lines(LogLevel.error)
        self.assertIn(f"cron job {self.spec.name}: could not renew its Redis lease", error)
        self.assertIn("another host took it", error)
        self.assertIn(str(lease.token), error)
        self.assertEqual(self.a.held, {})

    async def test_failing_run_fails_the_guard_and_keeps_the_lease(self):
        def run(lease):
            raise ZeroDivisionError()

        await self.assertFailure(self.a(self.spec, lambda lease: maybeDeferred(run, lease)),
                                 ZeroDivisionError)
        self.assertTrue(self.value().endswith(" " + self.a.holder))

    async def test_unlocked_job_runs_unguarded(self):
        spec = CronSpec(self.spec.job, self.INTERVAL, lock=False)
        await self.a(spec, self.run_as("a"))
        await self.b(spec, self.run_as("b"))
        self.assertEqual(self.who(), ["a", "b"])
        self.assertEqual([lease for _, _, lease in self.runs], [None, None])
        self.assertEqual(self.server.command("EXISTS", self.a.key(spec)), 0)

    async def test_skipped_without_error_while_redis_is_down(self):
        self.server.kill()
        await eventually(lambda: not connected(self.a.redis), "the connection to drop")
        for _ in range(3):
            self.assertIsNone(await self.a(self.spec, self.run_as("a")))
        self.assertEqual(self.runs, [])
        skipped = [line for line in self.lines(LogLevel.warn) if "skipped" in line]
        self.assertEqual(len(skipped), 1)  # once per outage, not per tick
        self.assertIn("Redis unreachable (not connected)", skipped[0])

    async def test_skipped_when_redis_does_not_answer_in_time(self):
        guard = RedisLease(self.a.redis, reactor, timeout=0.2)
        self.server.pause()
        self.addCleanup(self.server.resume)
        started = time.monotonic()
        self.assertIsNone(await guard(self.spec, self.run_as("a")))
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual(self.runs, [])
        [skipped] = [line for line in self.lines(LogLevel.warn) if "skipped" in line]
        self.assertIn("no reply in 0.2s", skipped)
        self.server.resume()
        # the late reply did not shift the connection's replies: it works
        await guard(self.spec, self.run_as("a"))
        self.assertEqual(self.who(), ["a"])

    async def test_two_cron_services_run_each_tick_once(self):
        services = [CronService([self.spec], reactor, guard=guard)
                    for guard in (self.a, self.b)]
        started = time.monotonic()
        for service in services:
            service.start()
        await sleep(5.5 * self.INTERVAL)
        await DeferredList([service.stop() for service in services])
        ticks = int((time.monotonic() - started) / self.INTERVAL)
        runs = [service.jobs[0].runs for service in services]
        self.assertGreaterEqual(sum(runs), 3, runs)
        self.assertLessEqual(sum(runs), ticks, runs)
        self.assertEqual([service.jobs[0].failures for service in services], [0, 0])
        # released: it lasts no longer than to the holder's next tick
        self.assertLessEqual(self.server.command("PTTL", self.a.key(self.spec)),
                             self.INTERVAL * 1000)

    async def test_a_job_in_a_thread_keeps_its_lease_while_it_blocks(self):
        def blocking(lease):
            time.sleep(4 * self.INTERVAL)  # the reactor goes on: renewals too
            blocked.append(lease)

        blocked: List[Any] = []
        spec = CronSpec(blocking, self.INTERVAL, lock=True, thread=True)
        service = CronService([spec], reactor, guard=self.a)
        service.start()
        await eventually(lambda: blocked, "the blocking run to end")
        await service.stop()
        self.assertFalse(blocked[0].lost)
        self.assertEqual(self.lines(LogLevel.error), [])


class FencedSetTests(RedisTestCase):
    async def test_a_write_with_an_older_token_is_refused(self):
        redis = await self.connect()
        self.assertTrue(await fenced_set(redis, "report", "from 5", 5))
        self.assertTrue(await fenced_set(redis, "report", "from 7", 7))
        self.assertFalse(await fenced_set(redis, "report", "late from 5", 5))
        self.assertTrue(await fenced_set(redis, "report", "again from 7", 7))
        self.assertEqual(await redis.get("report"), "again from 7")
        self.assertEqual(await redis.get("report:fence"), 7)  # txredisapi reads numbers
