"""
A bounded load loop for the integration tests: threads that send GET
requests until stopped (or a deadline), counting every failure.

``close`` clients open a new connection per request.  ``keepalive`` clients
reuse one; when a reused connection turns out to have been closed by the
server while idle, they reconnect and retry once, as HTTP clients do for
idempotent requests, and count the retry separately.
"""

import http.client
import threading
import time
from typing import List, Optional
from urllib.parse import urlsplit


class LoadThread(threading.Thread):
    def __init__(self, url: str, path: str = "/", keepalive: bool = False,
                 max_seconds: float = 60.0) -> None:
        super().__init__(daemon=True)
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.path = path
        self.keepalive = keepalive
        self.deadline = time.monotonic() + max_seconds
        self.sent = 0
        self.failed = 0
        self.retried = 0
        self.errors: List[str] = []
        self.workers_seen: set = set()
        self._stopping = threading.Event()
        self._connection: Optional[http.client.HTTPConnection] = None

    def stop(self) -> None:
        self._stopping.set()
        self.join(30)

    def run(self) -> None:
        while not self._stopping.is_set() and time.monotonic() < self.deadline:
            self.sent += 1
            try:
                self._one_request()
            except Exception as e:
                self.failed += 1
                self.errors.append(f"{type(e).__name__}: {e}")
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
        if b'"worker"' in body:
            self.workers_seen.add(body)
        if not self.keepalive or response.will_close:
            self._close()

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class Load:
    """Several load threads as one."""

    def __init__(self, url: str, close_clients: int = 2, keepalive_clients: int = 2,
                 path: str = "/", max_seconds: float = 60.0) -> None:
        self.threads = (
            [LoadThread(url, path, False, max_seconds) for _ in range(close_clients)]
            + [LoadThread(url, path, True, max_seconds) for _ in range(keepalive_clients)]
        )

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for thread in self.threads:
            thread.stop()

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
