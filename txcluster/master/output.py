"""
A worker's output as the master sees it: whole lines, re-logged under the
worker's id (so one log shows the whole cluster), and the last few kept to
explain a crash.  The worker's side is L{txcluster.worker.logs}.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Deque, List


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
