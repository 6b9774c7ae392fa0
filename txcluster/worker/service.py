"""
Serving the app: load it, connect, run startup hooks, listen, serve; and on
shutdown stop cron, stop listening, drain, run shutdown hooks, disconnect.

L{WorkerService} is that sequence, with the reactor and the port injected,
so C{--single} runs it in the master's own process, and a worker process
(L{txcluster.worker.main}) in its own.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..app import Cluster, WorkerInfo, call_job, load_app
from ..cron import CronService, RunGuard, Unguarded
from ..forwarded import TrustedProxies
from ..settings import Settings, endpoint_kind
from ..wire import WORKERS_VARIABLE, ExitStatus, WorkerStats
from .access_log import AccessLog
from .edge import EdgeLimits
from .h2 import http2_available
from .locality import Locality
from .site import ClusterSite
from .stats import RequestStats

log = Logger(namespace="txcluster.worker")

#: How the worker gets its listening port: given the site, return the port.
Listen = Callable[[IProtocolFactory], IListeningPort]

#: on_failed(status, summary, failure): the app could not be loaded or
#: the worker could not boot; it exits with C{status} next.
OnFailed = Callable[[ExitStatus, str, Failure], None]


def log_failure(status: ExitStatus, summary: str, failure: Failure) -> None:
    """By default a start failure is logged here, traceback and all."""
    log.failure("{summary}", failure, summary=summary)


class WorkerService(Service):
    """Serve the app in this process, start to finish."""

    def __init__(
        self,
        reactor: Any,
        settings: Settings,
        info: WorkerInfo,
        listen: Listen,
        on_ready: Callable[[], None] = lambda: None,
        load: Callable[[str], Cluster] = load_app,
        locality: Optional[Locality] = None,
        on_failed: OnFailed = log_failure,
        on_connections: Callable[[int], None] = lambda open: None,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.info = info
        self.locality = locality
        self._on_connections = on_connections
        self._listen = listen
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._load = load
        self.cluster: Optional[Cluster] = None
        self.site: Optional[ClusterSite] = None
        self.port: Optional[IListeningPort] = None
        self.cron: Optional[CronService] = None
        self.redis: Optional[Any] = None
        self.drain_seconds = settings.shutdown_timeout
        self._cut_drain: Optional[Callable[[], None]] = None
        #: the master takes idle connections back (a rolling restart, not
        #: its own shutdown): hand them back rather than close them
        self.may_hand_back = False
        self.exit_status = ExitStatus.OK
        self.started: Deferred = Deferred()

    # Start -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        ensureDeferred(self._start()).chainDeferred(self.started)

    async def _start(self) -> None:
        try:
            self.cluster = self._load(self.settings.app)
        except BaseException:
            self._failed(ExitStatus.APP_LOAD_ERROR, f"cannot load app {self.settings.app}")
            raise
        try:
            await self._boot(self.cluster)
        except BaseException:
            self._failed(ExitStatus.BOOT_ERROR, f"worker {self.info.id} failed to start")
            raise
        log.info("worker {id} (pid {pid}) serving {app}", id=self.info.id,
                 pid=self.info.pid, app=self.settings.app)
        self._on_ready()

    def _failed(self, status: ExitStatus, what: str) -> None:
        """Called in an C{except} block."""
        self.exit_status = status
        failure = Failure()
        self._on_failed(status, f"{what}: {failure.type.__name__}: {failure.value}", failure)

    async def _boot(self, cluster: Cluster) -> None:
        cluster.worker = self.info
        cluster.settings = self.settings
        if self.settings.redis:
            cluster.redis = self.redis = await self._connect_redis(self.settings.redis)
        for hook in cluster.startup_hooks:
            await call_job(hook)
        # After the hooks, so that a hook may add cron jobs.
        self.cron = CronService(cluster.cron_jobs, self.reactor, self._cron_guard(cluster))
        access_log = None
        if self.settings.access_log:
            access_log = AccessLog(self.settings.access_log, self.settings.access_log_format,
                                   worker=self.info.id)
        self.site = ClusterSite(cluster.resource(), self.reactor, access_log,
                                locality=self.locality,
                                stats=RequestStats(detailed=bool(self.settings.metrics)),
                                health=self.settings.health, worker_id=self.info.id,
                                limits=EdgeLimits.from_settings(self.settings),
                                trusted_proxies=TrustedProxies.parse(
                                    self.settings.forwarded_allow_ips),
                                http2=endpoint_kind(self.settings.listen) == "ssl"
                                and http2_available(),
                                on_connections=self._on_connections)
        self.port = self._listen(self.site)

    async def _connect_redis(self, url: str) -> Any:
        from ..redis import connect, parse_redis_url

        return await connect(parse_redis_url(url), self.reactor)

    def _cron_guard(self, cluster: Cluster) -> RunGuard:
        """Jobs with C{lock=True} take a Redis lease: once across hosts."""
        locked = [spec.name for spec in cluster.cron_jobs if spec.lock]
        if self.redis is not None:
            from ..redis import RedisLease

            return RedisLease(self.redis, self.reactor)
        if locked:
            log.warn("cron jobs {jobs} ask for lock=True but there is no --redis: "
                     "they run in worker 1 of this host only", jobs=", ".join(locked))
        return Unguarded()

    def stats(self) -> Optional[WorkerStats]:
        """What the site has served so far (None before it exists)."""
        if self.site is None:
            return None
        return self.site.stats.snapshot(len(self.site.channels))

    def set_count(self, count: int) -> None:
        """The cluster was scaled: C{cluster.worker.count}, the environment
        and the CPUs that have a worker follow."""
        self.info = attr.evolve(self.info, count=count)
        os.environ[WORKERS_VARIABLE] = str(count)
        if self.cluster is not None:
            self.cluster.worker = self.info
        if self.locality is not None:
            self.locality = self.locality.with_workers(count)
            if self.site is not None:
                self.site.locality = self.locality

    def start_cron(self) -> None:
        """Run this app's cron jobs here (worker 1, or the single process)."""
        if self.cron is not None and self.running:
            self.cron.start()

    # Stop --------------------------------------------------------------------

    def stopService(self) -> Deferred:
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        """Stop accepting at once; then, within C{drain_seconds}, let the
        requests in flight and a cron run in progress finish; then hooks."""
        if self.port is not None:
            await self.port.stopListening()
        finishing = [self.site.drain(self._hand_back())] if self.site is not None else []
        if self.cron is not None:
            finishing.append(self.cron.stop())
        in_time = await self._within_drain_deadline(DeferredList(finishing))
        if not in_time and self.site is not None:
            if self.site.channels:
                log.warn("closing {count} connections still open after {seconds}s",
                         count=len(self.site.channels), seconds=self.drain_seconds)
            self.site.abort()
        if self.cluster is not None and self.started.called:
            for hook in self.cluster.shutdown_hooks:
                try:
                    await call_job(hook)
                except Exception:
                    log.failure("shutdown hook {hook} failed", hook=hook)
        if self.redis is not None:
            from ..redis import disconnect

            await disconnect(self.redis)

    async def _within_drain_deadline(self, finishing: Deferred) -> bool:
        """Wait for C{finishing}, no longer than C{drain_seconds}: True if
        it finished in time."""
        outcome: Deferred = Deferred()

        def settle(in_time: bool) -> None:
            if not outcome.called:
                outcome.callback(in_time)

        finishing.addBoth(lambda _: settle(True))
        deadline = self.reactor.callLater(self.drain_seconds, settle, False)
        self._cut_drain = lambda: settle(False)
        try:
            return await outcome
        finally:
            self._cut_drain = None
            if deadline.active():
                deadline.cancel()

    def leaving(self) -> None:
        """C{--shutdown-delay}: from now on health checks answer 503; the
        stop itself comes later."""
        if self.site is not None:
            self.site.leaving = True

    def _hand_back(self) -> Optional[Callable[[int], bool]]:
        """Plain TCP, any balance mode: idle connections go back to the master
        (a TLS connection's state lives in this process, and a PROXY
        protocol connection's header was read here; they are closed)."""
        if not self.may_hand_back or self.settings.listen.startswith(("ssl:", "haproxy:")):
            return None
        return getattr(self.port, "hand_back", None)

    def hurry(self) -> None:
        """SIGQUIT: do not wait for the requests in flight, even if the
        drain has begun."""
        self.drain_seconds = 0
        if self._cut_drain is not None:
            self._cut_drain()
