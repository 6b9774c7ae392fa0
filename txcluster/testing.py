"""
Start a real cluster from a test.

    from txcluster.testing import start_cluster

    def test_it(self):
        with start_cluster("myapp:cluster", workers=2) as cluster:
            status, body = cluster.get("/")
            cluster.signal(signal.SIGHUP)
            cluster.wait_for_log("rolling restart done")

Under load, ``Load`` counts failed requests, e.g. across a rolling restart,
and which worker answered each one::

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

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar
from urllib.parse import urlsplit

from .cli import running as pid_alive

__all__ = [
    "ClusterTimeout", "Load", "LoadThread", "RunningCluster", "clean_environment",
    "eventually", "pid_alive", "start_cluster", "twistd_command", "wait_until",
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
                 inherit: Optional[int] = None, wrapper: Sequence[str] = ()) -> None:
        self._log = tempfile.NamedTemporaryFile(prefix="txcluster-test-", suffix=".log")
        self.args = list(args)
        command = [*twistd_command(), "-n", "--pidfile=", "txcluster", *args]
        if inherit is not None:
            command = [sys.executable, "-c", _SYSTEMD_ACTIVATION, str(inherit), *command]
        command = [*wrapper, *command]
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
    wrapper: Sequence[str] = (),
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
    @param wrapper: a command that execs the rest, such as
        C{ip netns exec NAME}.
    """
    argv = []
    if listen is not None:
        argv += ["--listen", listen]
    if app is not None:
        argv += ["--app", app]
    if workers is not None:
        argv += ["--single"] if workers == 0 else ["--workers", str(workers)]
    argv += list(args)
    cluster = RunningCluster(argv, dict(os.environ) if env is None else env, cwd, inherit,
                             wrapper)
    if ready is None:
        ready = workers or 1
    if ready:
        try:
            cluster.wait_ready(ready, timeout)
        except BaseException:
            cluster.kill()
            raise
    return cluster


# Load ------------------------------------------------------------------------


class LoadThread(threading.Thread):
    """One client sending GETs one after another, on a new connection each
    (or, with C{keepalive}, on one kept-alive connection), until stopped,
    C{max_seconds} have passed, or it has sent C{max_requests}."""

    def __init__(self, url: str, path: str = "/", keepalive: bool = False,
                 max_seconds: float = 60.0, max_requests: Optional[int] = None) -> None:
        super().__init__(daemon=True)
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.path = path
        self.keepalive = keepalive
        self.deadline = time.monotonic() + max_seconds
        self.max_requests = max_requests
        self.sent = 0
        self.failed = 0
        self.retried = 0
        self.errors: List[str] = []
        self.workers_seen: set = set()
        #: answers by the worker id named in their JSON body ("worker": N)
        self.answers: Counter = Counter()
        self._stopping = threading.Event()
        self._connection: Optional[http.client.HTTPConnection] = None

    def stop(self) -> None:
        self._stopping.set()
        self.join(30)

    def _more(self) -> bool:
        if self.max_requests is not None and self.sent >= self.max_requests:
            return False
        return not self._stopping.is_set() and time.monotonic() < self.deadline

    def run(self) -> None:
        while self._more():
            self.sent += 1
            try:
                self._one_request()
            except Exception as e:
                self.failed += 1
                self.errors.append(f"{type(e).__name__}: {e}")
                self._close()
        self._close()

    def _one_request(self) -> None:
        reused = self._connection is not None
        try:
            self._exchange()
        except (http.client.RemoteDisconnected, ConnectionResetError,
                BrokenPipeError, http.client.BadStatusLine):
            self._close()
            if not reused:
                raise
            # The server closed an idle keep-alive connection: retry once.
            self.retried += 1
            self._exchange()

    def _exchange(self) -> None:
        if self._connection is None:
            self._connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        headers = {} if self.keepalive else {"Connection": "close"}
        self._connection.request("GET", self.path, headers=headers)
        response = self._connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}: {body[:100]!r}")
        worker = _WORKER_IN_BODY.search(body)
        if worker:
            self.workers_seen.add(body)
            self.answers[int(worker[1])] += 1
        if not self.keepalive or response.will_close:
            self._close()

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


_WORKER_IN_BODY = re.compile(rb'"worker":\s*(\d+)')


class Load:
    """Several load threads as one: C{close_clients} on a new connection
    per request, C{keepalive_clients} on one connection each."""

    def __init__(self, url: str, close_clients: int = 2, keepalive_clients: int = 2,
                 path: str = "/", max_seconds: float = 60.0,
                 max_requests: Optional[int] = None) -> None:
        self.threads = (
            [LoadThread(url, path, False, max_seconds, max_requests)
             for _ in range(close_clients)]
            + [LoadThread(url, path, True, max_seconds, max_requests)
               for _ in range(keepalive_clients)]
        )

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for thread in self.threads:
            thread.stop()

    def wait(self, timeout: float = 60.0) -> "Load":
        """Wait for every thread to reach its C{max_requests} (or deadline)."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return self

    @property
    def sent(self) -> int:
        return sum(t.sent for t in self.threads)

    @property
    def failed(self) -> int:
        return sum(t.failed for t in self.threads)

    @property
    def retried(self) -> int:
        return sum(t.retried for t in self.threads)

    @property
    def errors(self) -> List[str]:
        return [e for t in self.threads for e in t.errors]

    @property
    def answers(self) -> Counter:
        """Answers by worker id, over every thread."""
        return sum((t.answers for t in self.threads), Counter())
