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
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Set

import attr
import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .redis_url import RedisConfig, parse_redis_url

if TYPE_CHECKING:  # the master imports nothing of the app's side
    from .app import CronSpec

__all__ = [
    "Lease", "RedisConfig", "RedisConnection", "RedisLease", "RedisSetupError",
    "connect", "connected", "disconnect", "fenced_set", "parse_redis_url",
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

#: Take the lease KEYS[1] for holder ARGV[1], for ARGV[2] milliseconds: if it
#: is free, with a new fencing token from the counter KEYS[2]; if it is
#: already ours, keeping its token.  Returns the token, or minus the
#: milliseconds the other holder's lease still lasts.  The value is
#: "TOKEN HOLDER", readable with GET.
_ACQUIRE = """
local value = redis.call('get', KEYS[1])
if value then
    local token, holder = string.match(value, '^(%d+) (.+)$')
    if holder == ARGV[1] then
        redis.call('pexpire', KEYS[1], ARGV[2])
        return tonumber(token)
    end
    return -math.max(redis.call('pttl', KEYS[1]), 1)
end
local token = redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], token .. ' ' .. ARGV[1], 'PX', ARGV[2])
return token
"""

#: Extend the lease KEYS[1] by ARGV[2] ms if it still is ARGV[1]: 1, else 0.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

#: Release the lease KEYS[1] if it still is ARGV[1]: let it expire in ARGV[2]
#: ms, when its holder would have run next, or at once: 1, else 0.
_RELEASE = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then
    return 0
end
if tonumber(ARGV[2]) > 0 then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return redis.call('del', KEYS[1])
"""

#: Set KEYS[1] to ARGV[1] unless a write with a higher token came first:
#: the token of the last write is kept in KEYS[1] .. ':fence'.
_FENCED_SET = """
local last = tonumber(redis.call('get', KEYS[1] .. ':fence') or '0')
if tonumber(ARGV[2]) < last then
    return 0
end
redis.call('set', KEYS[1] .. ':fence', ARGV[2])
redis.call('set', KEYS[1], ARGV[1])
return 1
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


def random_holder() -> str:
    """Who holds a lease, readable with C{GET}: host, pid, and random bits."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"


@attr.s(auto_attribs=True)
class Lease:
    """
    What a locked cron job is passed (if it takes one argument): the lease
    this run holds.

    @ivar token: the fencing token, from a counter that only grows across
        the whole Redis: a later holder always has a higher one.  Fence
        writes with it (L{fenced_set}, or C{UPDATE ... WHERE token <= ?}),
        so that a holder that lost its lease unknowingly cannot overwrite a
        later holder's work.
    @ivar lost: set once a renewal found the lease gone or taken.
    @ivar next_tick: when, on the guard's clock, the holder runs the job
        next; a released lease lasts until then.
    """

    job: str
    token: int
    holder: str
    lost: bool = False
    next_tick: float = attr.ib(default=0.0, repr=False, eq=False)

    @property
    def value(self) -> str:
        return f"{self.token} {self.holder}"


async def fenced_set(redis: RedisConnection, key: str, value: Any, token: int) -> bool:
    """
    Set C{key} to C{value} unless a write fenced by a higher token came
    first; False if it was refused.  The write's token is kept in
    C{key:fence}.
    """
    return await redis.eval(_FENCED_SET, [key], [value, token]) == 1


class _Unreachable(Exception):
    """Redis cannot be asked now: no connection is up, or no reply in time."""


class RedisLease:
    """
    A cron L{RunGuard<txcluster.cron.RunGuard>}: a job declared with
    C{lock=True} runs on one host only among all hosts sharing one Redis.
    Jobs without C{lock} run unguarded.

    Before each run, the guard takes the key C{txcluster:cron:<job
    qualname>} for L{lease_seconds} of the interval, in one Lua script: if
    it is free, with a new fencing token (C{INCR txcluster:fencing-token});
    if it is already this guard's (one per worker process), keeping it.
    While the run lasts, the lease is renewed every third of its length
    (a renewal never takes a lease back: one that was lost stays lost, and
    is logged).  The holder keeps the lease from tick to tick, and gives it
    up when its worker stops gracefully: the lease then ends when the
    holder's next tick was due.

    A guard that finds the lease held elsewhere tries again just after the
    holder's next tick is due (or, if that tick is late, as the lease
    expires) rather than at its own next tick: so a released lease is taken
    on time, and a dead holder's within one lease period.

    Guarantees, while Redis keeps its keys:
     - over all hosts, at most one run of a job starts per interval;
     - runs do not overlap while the holder can reach Redis to renew and
       its reactor is not blocked (run blocking jobs with C{thread=True});
     - when they do overlap, the later run has the higher fencing token.
    Not guaranteed: a Redis restart without persistence, or a failover to a
    replica that missed the write, forgets the lease (the counter too:
    persist it, or fence with a token of your own).  Hosts' wall clocks do
    not matter: only the Redis server's time is used.

    If Redis is unreachable, or does not answer within C{timeout} seconds,
    the run is skipped and logged (a warning the first time, until Redis
    answers again); the guard itself never fails.  A failing run fails the
    returned Deferred as it would unguarded.
    """

    def __init__(
        self, redis: RedisConnection, clock: IReactorTime,
        holder_factory: Callable[[], str] = random_holder,
        prefix: str = "txcluster:cron:", fence_key: str = "txcluster:fencing-token",
        timeout: float = 5.0,
    ) -> None:
        self.redis = redis
        self.clock = clock
        self.holder = holder_factory()
        self.prefix = prefix
        self.fence_key = fence_key
        self.timeout = timeout
        self.held: Dict[str, Lease] = {}
        self._unreachable: Set[str] = set()

    def key(self, spec: "CronSpec") -> str:
        return self.prefix + spec.name

    def __call__(self, spec: "CronSpec", run: Callable[[Any], Deferred]) -> Deferred:
        if not spec.lock:
            return run(None).addCallback(lambda _: None)
        return ensureDeferred(self._guarded(spec, run))

    async def _guarded(self, spec: "CronSpec",
                       run: Callable[[Any], Deferred]) -> Optional[float]:
        try:
            answer = await self._ask(_ACQUIRE, [self.key(spec), self.fence_key],
                                     self.holder, self._milliseconds(spec))
        except _Unreachable as e:
            if spec.name not in self._unreachable:
                self._unreachable.add(spec.name)
                log.warn("cron job {job} skipped: Redis unreachable ({why}); "
                         "skipping its runs until Redis answers", job=spec.name, why=e)
            return None
        except Exception:
            log.failure("cron job {job} skipped: taking its Redis lease failed",
                        job=spec.name)
            return None
        if spec.name in self._unreachable:
            self._unreachable.discard(spec.name)
            log.info("cron job {job}: Redis answers again", job=spec.name)
        if answer <= 0:  # held elsewhere, for -answer ms more
            self.held.pop(spec.name, None)
            return self._next_attempt(spec, -answer / 1000)
        lease = self.held.get(spec.name)
        if lease is None or lease.token != answer:
            lease = self.held[spec.name] = Lease(spec.name, answer, self.holder)
        lease.next_tick = self.clock.seconds() + spec.seconds
        renewal = LoopingCall(self._renew, spec, lease)
        renewal.clock = self.clock
        renewal.start(lease_seconds(spec.seconds) / 3, now=False)
        try:
            await run(lease)
        finally:
            renewal.stop()
            if lease.lost:
                self.held.pop(spec.name, None)
        return None

    @staticmethod
    def _milliseconds(spec: "CronSpec") -> int:
        return max(1, round(lease_seconds(spec.seconds) * 1000))

    def _next_attempt(self, spec: "CronSpec", lasts: float) -> float:
        """Seconds until another try: just after the holder's next tick is
        due (its lease then lasts no more than the grace), else just after
        the lease expires."""
        grace = lease_seconds(spec.seconds) - spec.seconds
        slack = min(spec.seconds / 20, 0.1)
        return (lasts - grace if lasts > grace else lasts) + slack

    async def _renew(self, spec: "CronSpec", lease: Lease) -> None:
        if lease.lost:
            return
        try:
            still_ours = await self._ask(_RENEW, [self.key(spec)], lease.value,
                                         self._milliseconds(spec)) == 1
            why = "it expired or another host took it"
        except Exception as e:
            still_ours, why = False, str(e) if isinstance(e, _Unreachable) else repr(e)
        if not still_ours:
            lease.lost = True
            log.error("cron job {job}: could not renew its Redis lease ({why}); this run "
                      "goes on without it and another host may run the job too (fence "
                      "writes with lease.token, {token})",
                      job=spec.name, why=why, token=lease.token)

    def release(self) -> Deferred:
        """Give up every lease this guard holds: each now expires when its
        holder would have run next, so that another host runs the next tick
        on time, and not this one again.  Errors are logged, never raised."""
        return ensureDeferred(self._release())

    async def _release(self) -> None:
        held, self.held = self.held, {}
        for lease in held.values():
            remaining = lease.next_tick - self.clock.seconds()
            try:
                await self._ask(_RELEASE, [self.prefix + lease.job], lease.value,
                                max(0, round(remaining * 1000)))
            except Exception as e:
                log.info("cron job {job}: its lease was not released ({why}); it expires "
                         "on its own", job=lease.job, why=e)

    async def _ask(self, script: str, keys: List[str], value: str, milliseconds: int) -> int:
        """
        Run one of the lease scripts with its ARGV: the holder (to acquire)
        or the lease's value (to renew or release), and milliseconds.

        @raise _Unreachable: Redis cannot be asked now.
        """
        if not connected(self.redis):
            raise _Unreachable("not connected")
        reply = self.redis.eval(script, keys, [value, milliseconds])
        try:
            return await reply.addTimeout(self.timeout, self.clock)
        except defer.TimeoutError:
            raise _Unreachable(f"no reply in {self.timeout}s") from None
        except txredisapi.ConnectionError as e:
            raise _Unreachable(str(e) or "connection lost") from None
