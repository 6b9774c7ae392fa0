"""
Logging: a worker writes plain lines to its stdout; the master re-logs each
line tagged with the worker's id, so one log shows the whole cluster.
"""

from __future__ import annotations

from collections import deque
from typing import IO, Callable, Deque, List

from twisted.logger import (
    FileLogObserver,
    LogLevel,
    eventAsText,
    globalLogBeginner,
)

_LEVEL_PREFIX = {
    LogLevel.warn: "WARNING: ",
    LogLevel.error: "ERROR: ",
    LogLevel.critical: "CRITICAL: ",
}


def _format_worker_event(event: dict) -> str:
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    prefix = _LEVEL_PREFIX.get(event.get("log_level"), "")
    return f"{prefix}{text}\n"


def start_worker_logging(out: IO[str]) -> None:
    """Log to C{out} without timestamps: the master adds its own."""
    globalLogBeginner.beginLoggingTo(
        [FileLogObserver(out, _format_worker_event)], redirectStandardIO=False
    )


class LineSplitter:
    """Turn a stream of byte chunks into whole text lines."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._partial = b""

    def feed(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._emit(line.decode("utf-8", "replace").rstrip("\r"))

    def flush(self) -> None:
        if self._partial:
            partial, self._partial = self._partial, b""
            self._emit(partial.decode("utf-8", "replace"))


class OutputTail:
    """The last lines a worker printed, kept to explain why it died."""

    def __init__(self, size: int = 40) -> None:
        self._lines: Deque[str] = deque(maxlen=size)

    def append(self, line: str) -> None:
        self._lines.append(line)

    def lines(self) -> List[str]:
        return list(self._lines)
