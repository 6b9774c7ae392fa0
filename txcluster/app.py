"""
What a worker serves: the L{Cluster} bundle, and loading it from C{--app}.

Only workers (and the single process of C{--single}) import this module's
user-facing side; the master never imports the app.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Awaitable, Callable, List, Optional, Union

import attr
from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.web.resource import IResource

from .wire import WORKER_ID_VARIABLE, WORKERS_VARIABLE

#: A hook or job: a plain function, one returning a Deferred, or ``async def``.
#: A cron job may take one argument: its lease (see L{CronSpec.takes_lease}).
Job = Callable[..., Union[None, Deferred, Awaitable[Any]]]


def call_job(job: Job, *args: Any) -> Deferred:
    """Run a hook or cron job, whatever it returns, as a Deferred."""

    def call() -> Any:
        result = job(*args)
        if inspect.isawaitable(result) and not isinstance(result, Deferred):
            return ensureDeferred(result)
        return result

    return maybeDeferred(call)


@attr.s(frozen=True, auto_attribs=True)
class WorkerInfo:
    """Who this worker is: C{id} is 1..N and stable across respawns."""

    id: int
    count: int
    pid: int

    @classmethod
    def from_environment(cls) -> "WorkerInfo":
        return cls(
            id=int(os.environ.get(WORKER_ID_VARIABLE, "1")),
            count=int(os.environ.get(WORKERS_VARIABLE, "1")),
            pid=os.getpid(),
        )


@attr.s(frozen=True, auto_attribs=True)
class CronSpec:
    """
    A job that runs every C{seconds} in one worker only.

    @ivar lock: once per tick across every host sharing the Redis of C{--redis}.
    @ivar thread: run it in the reactor's thread pool, for a job that blocks
        (the reactor goes on serving requests and renewing the lease).
    """

    job: Job
    seconds: float
    lock: bool = False
    thread: bool = False

    @property
    def name(self) -> str:
        return getattr(self.job, "__qualname__", repr(self.job))

    @property
    def takes_lease(self) -> bool:
        """A job with one parameter is passed its lease (C{None} when it
        runs without one), whose C{.token} fences its writes."""
        return _positional_parameters(self.job) == 1


def _positional_parameters(job: Job) -> int:
    try:
        parameters = inspect.signature(job).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return 0
    return sum(1 for p in parameters if p.default is p.empty
               and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


class Cluster:
    """
    The app as every worker runs it: a web resource plus cron jobs and
    startup/shutdown hooks.

    @ivar worker: this process's L{WorkerInfo} (set before hooks run).
    @ivar redis: the worker's txredisapi connection when C{--redis} is set.
    @ivar settings: the L{txcluster.settings.Settings} the worker runs with.
    """

    def __init__(self, web: Union[Klein, IResource]) -> None:
        self.web = web
        self.cron_jobs: List[CronSpec] = []
        self.startup_hooks: List[Job] = []
        self.shutdown_hooks: List[Job] = []
        self.worker: WorkerInfo = WorkerInfo.from_environment()
        self.redis: Optional[Any] = None
        self.settings: Optional[Any] = None

    def resource(self) -> IResource:
        """The root resource to serve."""
        if isinstance(self.web, Klein):
            return self.web.resource()
        return IResource(self.web)

    def cron(self, seconds: float, lock: bool = False,
             thread: bool = False) -> Callable[[Job], Job]:
        """Decorator: run the job every C{seconds}, in worker 1 only; see
        L{CronSpec} for C{lock} and C{thread}."""
        if not seconds > 0:
            raise ValueError(f"cron interval must be positive, not {seconds!r}")

        def register(job: Job) -> Job:
            spec = CronSpec(job, float(seconds), lock, thread)
            if _positional_parameters(job) > 1:
                raise ValueError(f"cron job {spec.name} takes at most one argument "
                                 f"(its lease), not {_positional_parameters(job)}")
            if thread and inspect.iscoroutinefunction(job):
                raise ValueError(f"cron job {spec.name} is async def: it needs no "
                                 f"thread=True (that is for functions that block)")
            self.cron_jobs.append(spec)
            return job

        return register

    def on_startup(self, hook: Job) -> Job:
        """Decorator: run in every worker before it accepts connections."""
        self.startup_hooks.append(hook)
        return hook

    def on_shutdown(self, hook: Job) -> Job:
        """Decorator: run in every worker after in-flight requests finished."""
        self.shutdown_hooks.append(hook)
        return hook


class AppLoadError(Exception):
    """C{--app} does not name something a worker can serve."""


def _as_cluster(obj: Any) -> Optional[Cluster]:
    if isinstance(obj, Cluster):
        return obj
    if isinstance(obj, Klein) or IResource.providedBy(obj):
        return Cluster(obj)
    return None


def load_app(spec: str) -> Cluster:
    """
    Import C{module:name} and make a L{Cluster} of it: a Klein app, an
    C{IResource}, a Cluster, or a zero-argument callable returning one.

    The module is found from the current directory first, as C{python -m}
    would, in workers and in C{--single} alike.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attribute = spec.partition(":")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError(f"{spec}: module {module_name!r} has no {attribute!r}")
    cluster = _as_cluster(obj)
    if cluster is None and callable(obj):
        cluster = _as_cluster(obj())
    if cluster is None:
        raise AppLoadError(
            f"{spec}: expected a Klein app, an IResource, a txcluster.Cluster "
            f"or a factory of one, got {type(obj).__name__}"
        )
    return cluster
