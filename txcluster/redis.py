"""
Redis for a worker: its own txredisapi connection pool, and a lease that
makes a cron job run on one host only when several hosts share one Redis.

L{connect} never fails because Redis is down: it waits a few seconds for
the first connection, logs one warning line if there is none, and returns a
connection that txredisapi keeps reconnecting in the background.  Commands
sent while Redis is down wait until it is back, however long that takes
(bound them with C{Deferred.addTimeout} where that matters).

Built on txredisapi 1.6's C{RedisFactory.startConnecting} (one Twisted
C{ClientService} per pool connection); the endpoints use the injected
reactor, but txredisapi schedules its retries on the global one.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import TYPE_CHECKING, Any, Callable, Set

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .redis_url import RedisConfig, parse_redis_url

if TYPE_CHECKING:  # the master imports nothing of the app's side
    from .app import CronSpec

__all__ = [
    "RedisConfig", "RedisConnection", "RedisLease", "RedisSetupError",
    "connect", "connected", "disconnect", "parse_redis_url",
]

log = Logger(namespace="txcluster.redis")

#: What L{connect} returns: txredisapi's handler, with every Redis command.
RedisConnection = txredisapi.ConnectionHandler

#: Seconds L{connect} waits for the first connection before going on without.
CONNECT_WAIT = 5.0

#: Seconds one connection attempt may take (a host that drops packets).
CONNECT_TIMEOUT = 5.0


# Connecting ----------------------------------------------------------------


class RedisSetupError(Exception):
    """Redis answered but refused the password or the database number."""


class _PoolFactory(txredisapi.RedisFactory):
    """
    txredisapi's pool of C{pool_size} connections, which reconnects each
    one with a back-off (1 s growing to 10 s), plus one log line when the
    pool empties and one when it has a connection again (by overriding
    its C{addConnection} and C{delConnection}).
    """

    def __init__(self, config: RedisConfig) -> None:
        handler = (txredisapi.UnixConnectionHandler if config.path is not None
                   else txredisapi.ConnectionHandler)
        super().__init__(config.where, config.db or None, config.pool_size,
                         isLazy=True, handler=handler, password=config.password,
                         username=config.username)
        self.reconnect = True
        self.where = config.where
        self.unreachable = False

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if self.unreachable and conn in self.pool:
            self.unreachable = False
            log.info("Redis at {where} is reachable again", where=self.where)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        if not self.size and not self.disconnectCalled and not self.unreachable:
            self.unreachable = True
            log.warn("lost the connection to Redis at {where}; "
                     "reconnecting in the background", where=self.where)


def _endpoint(config: RedisConfig, reactor: Any) -> IStreamClientEndpoint:
    if config.path is not None:
        return UNIXClientEndpoint(reactor, config.path, timeout=CONNECT_TIMEOUT)
    return HostnameEndpoint(reactor, config.host, config.port, timeout=CONNECT_TIMEOUT)


def pool_of(connection: RedisConnection) -> "_PoolFactory":
    """
    The pool behind a connection that L{connect} returned.

    txredisapi's handler has no public way to its factory, and only the
    factory knows how many connections are up and whether disconnecting
    has begun; C{_factory} is where every txredisapi release keeps it.
    C{tests/test_redis.py} checks that it is still our pool, with the
    attributes used here, so an upgrade that changes it fails there.
    """
    return connection._factory


def connected(connection: RedisConnection) -> bool:
    """True while at least one connection of the pool is up."""
    return pool_of(connection).size > 0


async def connect(
    config: RedisConfig, reactor: Any, wait: float = CONNECT_WAIT,
) -> RedisConnection:
    """
    Open C{config.pool_size} connections and wait up to C{wait} seconds
    for them.  If Redis is unreachable, log a warning and return the
    connection anyway: txredisapi connects in the background, and commands
    wait for it.

    @raise RedisSetupError: Redis refused the password or the database;
        nothing is left connecting.
    """
    factory = _PoolFactory(config)
    ready: Deferred = factory.deferred  # fires when the pool is complete
    first: Deferred = Deferred()

    def complete(handler: Any) -> None:
        if not first.called:
            first.callback(True)

    def refused(failure: Any) -> None:
        if not first.called:
            first.errback(failure)
        else:  # came up after we stopped waiting, and said no
            log.error("Redis at {where} refused the connection: {why}; giving up",
                      where=config.where, why=_reason(failure.value))

    ready.addCallbacks(complete, refused)
    factory.startConnecting(_endpoint(config, reactor))
    timer = reactor.callLater(wait, lambda: first.called or first.callback(False))
    try:
        complete_in_time = await first
    except ValueError as e:  # txredisapi's connectionError(): auth or SELECT failed
        await factory.disconnect()
        raise RedisSetupError(f"Redis at {config.where} refused the connection: "
                              f"{_reason(e)}") from None
    except BaseException:  # cancelled: leave nothing connecting
        await factory.disconnect()
        raise
    finally:
        if timer.active():
            timer.cancel()
    if not complete_in_time and not factory.size:
        factory.unreachable = True
        log.warn("Redis at {where} is unreachable after {wait}s; going on without "
                 "it and reconnecting in the background", where=config.where, wait=wait)
    return factory.handler


def _reason(error: BaseException) -> str:
    return str(error).replace("Redis error: ", "", 1)


async def disconnect(connection: RedisConnection) -> None:
    """
    Close every connection of the pool and stop reconnecting for good;
    returns once all are closed.  Commands still waiting for a reply fail
    with C{txredisapi.ConnectionError}.  Calling it again is harmless.
    """
    factory = pool_of(connection)
    if factory.disconnectCalled:
        # txredisapi's disconnect() fires from inside a ClientService state
        # transition; calling it again from there raises RuntimeError
        await factory.waitForEmptyPool()
    else:
        await connection.disconnect()


# Cron lease ----------------------------------------------------------------

#: Take the lease if it is free or already ours, for ARGV[2] milliseconds.
_ACQUIRE = """
local holder = redis.call('get', KEYS[1])
if holder == false or holder == ARGV[1] then
    redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""


def lease_seconds(interval: float) -> float:
    """
    How long a lease lasts: one interval plus a grace of half an interval,
    at most a minute.  The grace lets the holder's next tick, late by a busy
    reactor or a slow Redis, find its lease still there and keep it.  (A
    lease shorter than the interval would expire before the holder's next
    tick, so a host ticking in between would run the same interval again.)
    """
    return interval + min(interval / 2, 60.0)


def random_token() -> str:
    """Who holds a lease, readable with C{GET}: host, pid, and random bits."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"


class _Unreachable(Exception):
    """Redis cannot be asked now: no connection is up, or no reply in time."""


class RedisLease:
    """
    A cron L{RunGuard<txcluster.cron.RunGuard>}: a job declared with
    C{lock=True} runs on one host only among all hosts sharing one Redis.
    Jobs without C{lock} run unguarded.

    Before each run, the guard takes the key C{txcluster:cron:<job
    qualname>} with its own token (random per guard, i.e. per worker
    process) for L{lease_seconds} of the interval, in one Lua script: the
    key is set if it is free I{or already ours}.  The lease is never
    released: the holder keeps it tick after tick, and the other hosts skip
    their ticks while it lives.  While a run lasts longer than a third of
    the lease, the lease is renewed.

    Guarantees, while Redis keeps its keys:
     - over all hosts, at most one run of a job starts per interval: the
       holder runs on its own schedule, another host only once the lease
       has expired, more than one interval after the holder's last tick;
     - runs do not overlap while the holder can reach Redis to renew;
     - a holder that dies or loses Redis is replaced at another host's
       first tick after the lease expired: at most 2.5 intervals (two
       intervals plus a minute for long ones) after its last tick.

    Not guaranteed:
     - this is no fencing token: a holder whose renewal cannot reach Redis,
       or whose reactor stalls for longer than the lease, keeps running
       while another host starts the same job;
     - a Redis restart without persistence, or a failover to a replica that
       missed the write, forgets the lease, so one interval may run twice;
     - a tick whose Redis reply is late (C{timeout}) is skipped.
    Hosts' wall clocks do not matter: the lease lasts a relative time kept
    by the Redis server alone.

    If Redis is unreachable, or does not answer within C{timeout} seconds,
    the run is skipped and logged (a warning the first time, until Redis
    answers again); the guard itself never fails.  A failing run fails the
    returned Deferred as it would unguarded.
    """

    def __init__(
        self, redis: RedisConnection, clock: IReactorTime,
        token_factory: Callable[[], str] = random_token,
        prefix: str = "txcluster:cron:", timeout: float = 5.0,
    ) -> None:
        self.redis = redis
        self.clock = clock
        self.token = token_factory()
        self.prefix = prefix
        self.timeout = timeout
        self._unreachable: Set[str] = set()

    def key(self, spec: "CronSpec") -> str:
        return self.prefix + spec.name

    def __call__(self, spec: "CronSpec", run: Callable[[], Deferred]) -> Deferred:
        if not spec.lock:
            return run()
        return ensureDeferred(self._guarded(spec, run))

    async def _guarded(self, spec: "CronSpec", run: Callable[[], Deferred]) -> None:
        try:
            held = await self._take(spec)
        except _Unreachable as e:
            if spec.name not in self._unreachable:
                self._unreachable.add(spec.name)
                log.warn("cron job {job} skipped: Redis unreachable ({why}); "
                         "skipping its runs until Redis answers", job=spec.name, why=e)
            else:
                log.debug("cron job {job} skipped: Redis unreachable", job=spec.name)
            return
        except Exception:
            log.failure("cron job {job} skipped: taking its Redis lease failed",
                        job=spec.name)
            return
        self._unreachable.discard(spec.name)
        if not held:
            log.debug("cron job {job} skipped: its lease is held elsewhere",
                      job=spec.name)
            return
        warned = False

        async def renew() -> None:
            nonlocal warned
            try:
                problem = None if await self._take(spec) else "another host holds it"
            except Exception as e:
                problem = str(e) if isinstance(e, _Unreachable) else repr(e)
            if problem and not warned:
                warned = True
                log.warn("cron job {job}: cannot renew its Redis lease ({why}); "
                         "it may run on another host too", job=spec.name, why=problem)

        renewal = LoopingCall(renew)
        renewal.clock = self.clock
        renewal.start(lease_seconds(spec.seconds) / 3, now=False)
        try:
            await maybeDeferred(run)
        finally:
            renewal.stop()

    async def _take(self, spec: "CronSpec") -> bool:
        """
        Take or extend the lease: True if it is ours now, False if another
        guard holds it.

        @raise _Unreachable: Redis cannot be asked now.
        """
        if not connected(self.redis):
            raise _Unreachable("not connected")
        milliseconds = max(1, round(lease_seconds(spec.seconds) * 1000))
        reply = self.redis.eval(_ACQUIRE, [self.key(spec)], [self.token, milliseconds])
        try:
            return await reply.addTimeout(self.timeout, self.clock) == 1
        except defer.TimeoutError:
            raise _Unreachable(f"no reply in {self.timeout}s") from None
        except txredisapi.ConnectionError as e:
            raise _Unreachable(str(e) or "connection lost") from None
