"""
The peers that bench/run.py --peers measures beside txcluster, each with
the same hello world (peer_apps.py, peer_node.js): gunicorn (gthread),
uvicorn, granian, and Node's cluster module.  Each runs as N workers on
one port (the peer's cluster) and as N independent single processes on N
ports (its own parallel limit).  Install them with pip install
'.[bench]'; Node where ``node`` is installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def command(peer: str, workers: int, port: int) -> List[str]:
    """The command line of C{peer} with C{workers} worker processes (0: one
    process without a manager, where the peer has that)."""
    where = ["127.0.0.1", str(port)]
    if peer == "gunicorn":
        return [_bin("gunicorn"), "-w", str(max(1, workers)), "-k", "gthread", "--threads", "2",
                "-b", ":".join(where), "--log-level", "warning", "peer_apps:wsgi"]
    if peer == "uvicorn":
        return [_bin("uvicorn"), "--host", where[0], "--port", where[1], "--no-access-log",
                "--log-level", "warning", *(["--workers", str(workers)] if workers else []),
                "peer_apps:asgi"]
    if peer == "granian":
        return [_bin("granian"), "--interface", "asgi", "--host", where[0], "--port", where[1],
                "--workers", str(max(1, workers)), "--no-access-log", "--log-level", "warning",
                "peer_apps:asgi"]
    if peer == "node":
        return ["node", os.path.join(HERE, "peer_node.js")]
    raise ValueError(f"unknown peer {peer!r}")


def available(peer: str) -> Optional[str]:
    """None if C{peer} can run here, else why not."""
    binary = "node" if peer == "node" else _bin(peer)
    if peer != "node" and not os.access(binary, os.X_OK):
        return f"{peer} is not installed (pip install '.[bench]')"
    if peer == "node" and shutil.which("node") is None:
        return "node is not installed"
    return None


class PeerServer:
    """One peer process group on a free loopback port; killed on exit."""

    def __init__(self, peer: str, workers: int) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env: Dict[str, str] = dict(os.environ, PORT=str(self.port), WORKERS=str(workers))
        self.process = subprocess.Popen(
            command(peer, workers, self.port), cwd=HERE, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while not self._answers():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"{peer} with {workers} workers did not start")
            time.sleep(0.1)
        time.sleep(0.5 if workers > 1 else 0)  # the other workers

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return s.recv(12).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def __enter__(self) -> "PeerServer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
