"""
Start a real cluster from a test.

    from txcluster.testing import start_cluster

    def test_it(self):
        with start_cluster("myapp:cluster", workers=2) as cluster:
            status, body = cluster.get("/")
            cluster.signal(signal.SIGHUP)
            cluster.wait_for_log("rolling restart done")

Under load, ``Load`` counts failed requests, e.g. across a rolling restart::

    with Load(cluster.url, close_clients=2, keepalive_clients=2) as load:
        cluster.signal(signal.SIGHUP)
        cluster.wait_for_log("rolling restart done")
    assert load.failed == 0

In asynchronous tests, ``eventually`` polls without blocking the reactor.

The cluster runs the installed ``twistd txcluster`` plugin in a process
group of its own, on an ephemeral port.  Every wait is bounded, and leaving
the ``with`` block kills every process of that group, so no test leaves a
process behind.  The helper blocks, so call it from synchronous tests (trial
or pytest) or from a thread (``deferToThread``) in asynchronous ones.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, TypeVar

from .load import Load, LoadThread, run_wrk, wrk_available

__all__ = [
    "ClusterTimeout", "Load", "LoadThread", "RunningCluster", "clean_environment",
    "eventually", "pid_alive",
    "run_wrk", "start_cluster", "twistd_command", "wait_until", "wrk_available",
]

T = TypeVar("T")

_LISTENING = re.compile(r"listening on (?P<address>[^\s,]+)")
_READY = re.compile(r"worker (?P<id>\d+) \(pid (?P<pid>\d+)\) ready")


#: Variables that would change what a cluster does if the developer's or
#: CI's environment happened to set them.
_OURS = ("WEB_CONCURRENCY", "CLUSTERING_ENABLED", "PORT", "REDIS_URL")


def clean_environment(**extra: str) -> Dict[str, str]:
    """This process's environment without what would configure a cluster
    (C{TXCLUSTER_*}, C{WEB_CONCURRENCY}, ...) or a test (C{TEST_*}), plus
    C{extra}."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TXCLUSTER_", "TEST_")) and k not in _OURS}
    env.update(extra)
    return env


class ClusterTimeout(AssertionError):
    """A bounded wait ran out; the message ends with the cluster's log."""


def twistd_command() -> list:
    """The installed twistd, run by this interpreter."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _check(condition: Callable[[], Optional[T]], deadline: float, timeout: float,
           what: str, describe: Callable[[], str]) -> Optional[T]:
    """One poll: the condition's value, or ClusterTimeout once past the deadline."""
    result = condition()
    if not result and time.monotonic() > deadline:
        raise ClusterTimeout(f"timed out after {timeout}s waiting for {what}\n{describe()}")
    return result


def wait_until(
    condition: Callable[[], Optional[T]], timeout: float, what: str,
    describe: Callable[[], str] = lambda: "", interval: float = 0.05,
) -> T:
    """Poll C{condition} until it returns something truthy, for C{timeout}s."""
    deadline = time.monotonic() + timeout
    while not (result := _check(condition, deadline, timeout, what, describe)):
        time.sleep(interval)
    return result


async def eventually(
    condition: Callable[[], Optional[T]], timeout: float, what: str,
    describe: Callable[[], str] = lambda: "", interval: float = 0.02,
) -> T:
    """L{wait_until} for asynchronous tests (trial or pytest-twisted): polls
    without blocking the running reactor."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    while not (result := _check(condition, deadline, timeout, what, describe)):
        await deferLater(reactor, interval, lambda: None)
    return result


def pid_alive(pid: int) -> bool:
    """True while C{pid} runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


#: Run argv[2:] with the socket on descriptor argv[1] passed the way
#: systemd's socket activation does (fd 3, LISTEN_FDS, LISTEN_FDNAMES, and
#: LISTEN_PID, which exec keeps).
_SYSTEMD_ACTIVATION = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="http", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[2], sys.argv[2:])
"""


class RunningCluster:
    """A C{twistd -n txcluster} process and its workers."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], cwd: Optional[str],
                 inherit: Optional[int] = None) -> None:
        self._log = tempfile.NamedTemporaryFile(prefix="txcluster-test-", suffix=".log")
        self.args = list(args)
        command = [*twistd_command(), "-n", "--pidfile=", "txcluster", *args]
        if inherit is not None:
            command = [sys.executable, "-c", _SYSTEMD_ACTIVATION, str(inherit), *command]
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=dict(env), cwd=cwd, start_new_session=True,
            pass_fds=() if inherit is None else (inherit,),
        )
        self.pid = self.process.pid
        self.url = ""
        self._final_output: Optional[str] = None

    # Observing -----------------------------------------------------------------

    @property
    def output(self) -> str:
        """Everything the master (and through it, the workers) logged."""
        if self._final_output is not None:
            return self._final_output
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_for_log(self, pattern: str, timeout: float = 20.0, count: int = 1) -> re.Match:
        """Wait until C{pattern} (a regex) has appeared C{count} times."""
        regex = re.compile(pattern)

        def found() -> Optional[re.Match]:
            matches = list(regex.finditer(self.output))
            return matches[count - 1] if len(matches) >= count else None

        return wait_until(found, timeout, f"log line {pattern!r} x{count}", self._tail)

    def ready_workers(self) -> Dict[int, int]:
        """worker id -> pid of its latest process to report ready."""
        return {int(m["id"]): int(m["pid"]) for m in _READY.finditer(self.output)}

    def worker_pids(self) -> set:
        """Pids of the master's live children."""
        children = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.pid and fields[0] != "Z":
                    children.add(int(entry))
        return children

    def _tail(self, lines: int = 60) -> str:
        return "--- cluster log (tail) ---\n" + "\n".join(self.output.splitlines()[-lines:])

    # Talking to it ---------------------------------------------------------------

    def get(self, path: str = "/", timeout: float = 10.0) -> Tuple[int, bytes]:
        """One HTTP GET on a new connection: (status, body)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str = "/") -> dict:
        status, body = self.get(path)
        assert status == 200, (status, body)
        return json.loads(body)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = 20.0) -> int:
        """Wait for the master to exit; return its exit status."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ClusterTimeout(f"master still running after {timeout}s\n{self._tail()}")

    # Starting and stopping -------------------------------------------------------------

    def wait_ready(self, workers: int, timeout: float = 30.0) -> "RunningCluster":
        def listening_and_ready() -> Optional[re.Match]:
            if self.process.poll() is not None:
                raise ClusterTimeout(
                    f"cluster exited with {self.process.returncode} before ready\n{self._tail()}")
            output = self.output
            ids = {m["id"] for m in _READY.finditer(output)}
            ready = len(ids) >= workers or (workers == 1 and "] ready" in output)
            return _LISTENING.search(output) if ready else None

        address = wait_until(listening_and_ready, timeout, "the cluster to be ready",
                             self._tail)["address"]
        host, _, port = address.rpartition(":")
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        self.url = f"http://{host}:{port}"
        return self

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; whatever is left of the group is then killed."""
        try:
            if self.process.poll() is None:
                self.signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the master and every process in its group."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        if self._final_output is None:
            self._final_output = self.output
            self._log.close()

    def __enter__(self) -> "RunningCluster":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


def start_cluster(
    app: Optional[str] = None,
    workers: Optional[int] = 2,
    args: Sequence[str] = (),
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    listen: Optional[str] = "tcp:0:interface=127.0.0.1",
    ready: Optional[int] = None,
    timeout: float = 30.0,
    inherit: Optional[int] = None,
) -> RunningCluster:
    """
    Start C{twistd -n txcluster} and wait until C{ready} workers are ready.

    @param workers: C{--workers N}; C{0} means C{--single}; C{None} passes
        neither, leaving it to the environment or config file.
    @param listen: C{--listen}; C{None} leaves it to the environment.
    @param ready: how many workers to wait for (default: C{workers}, or 1);
        C{0} returns without waiting.
    @param env: the environment (default: this process's).
    @param cwd: where to run; C{--app} modules are imported from here.
    @param inherit: a listening socket's descriptor to pass as systemd's
        socket activation would; use it with
        C{listen="systemd:domain=INET:index=0"}.
    """
    argv = []
    if listen is not None:
        argv += ["--listen", listen]
    if app is not None:
        argv += ["--app", app]
    if workers is not None:
        argv += ["--single"] if workers == 0 else ["--workers", str(workers)]
    argv += list(args)
    cluster = RunningCluster(argv, dict(os.environ) if env is None else env, cwd, inherit)
    if ready is None:
        ready = workers or 1
    if ready:
        try:
            cluster.wait_ready(ready, timeout)
        except BaseException:
            cluster.kill()
            raise
    return cluster
