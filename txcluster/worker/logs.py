"""
A worker logs plain lines to its stdout, without timestamps; the master
re-logs each one under the worker's id, with its own
(L{txcluster.master.output}).
"""

from __future__ import annotations

from typing import IO

from twisted.logger import FileLogObserver, LogLevel, eventAsText, globalLogBeginner

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
