"""
The access log (C{--access-log}, C{--access-log-format}): one line per
request, written by the worker that answered it.

Each line goes out in one C{write(2)} to a file opened with C{O_APPEND}, so
every worker can share one file; C{SIGUSR1} reopens it after logrotate
moved it.  C{"-"} writes to the main log (the worker's stdout, which the
master re-logs) instead.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

from twisted.logger import Logger
from twisted.web import http

log = Logger(namespace="txcluster.access")

COMBINED = "combined"
JSON = "json"
FORMATS = (COMBINED, JSON)


def _header(request: Any, name: bytes) -> Optional[str]:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def _client(request: Any) -> str:
    return getattr(request.getClientAddress(), "host", None) or "-"


def json_line(request: Any, worker: int, duration: float, now: float) -> str:
    """One request as a JSON object on one line."""
    return json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
                + f".{int(now % 1 * 1000):03d}Z",
        "worker": worker,
        "client": _client(request),
        "method": request.method.decode("latin-1"),
        "path": request.uri.decode("latin-1"),
        "status": request.code,
        "bytes": request.sentLength,
        "duration_ms": round(duration * 1000, 3),
        "referer": _header(request, b"referer"),
        "user_agent": _header(request, b"user-agent"),
    }, separators=(",", ":"))


def combined_line(request: Any) -> str:
    return http.combinedLogFormatter(http.datetimeToLogString(), request)


class AccessLog:
    """
    @param path: a file, or C{"-"} for the main log.
    @param worker: the id written in JSON lines.
    @param now: the wall clock, for JSON's C{time}.
    """

    def __init__(self, path: str, format: str = COMBINED, worker: int = 1,
                 now: Callable[[], float] = time.time) -> None:
        self.path = path
        self.format = format
        self.worker = worker
        self._now = now
        self._fd: Optional[int] = None

    def open(self) -> None:
        if self.path != "-" and self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def reopen(self) -> None:
        """After logrotate moved the file: write to a new one at C{path}."""
        if self._fd is not None:
            self.close()
            self.open()

    def write(self, request: Any, duration: float) -> None:
        if self.format == JSON:
            line = json_line(request, self.worker, duration, self._now())
        else:
            line = combined_line(request)
        if self._fd is None:
            log.info("{line}", line=line)
        else:
            os.write(self._fd, (line + "\n").encode("utf-8"))
