"""Tell systemd (C{Type=notify}) how the master is doing."""

from __future__ import annotations

import os
import socket
from typing import Mapping


def notify_systemd(state: bytes, environ: Mapping[str, str] = os.environ) -> None:
    """Send C{state} (C{READY=1}, C{STOPPING=1}, ...) to C{NOTIFY_SOCKET};
    a no-op outside systemd."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # Linux's abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state, address)
