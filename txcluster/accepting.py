"""
Accepting connections as bare descriptors: the master's dispatcher (which
only passes them on) and a worker's own reuseport socket (which keeps
some and hands the rest on) both take what waits in a listening socket
this way.
"""

from __future__ import annotations

import errno
import socket
from typing import List, Optional, Tuple

#: accept(2) errors that concern one connection only, to be treated like EAGAIN.
ONE_CONNECTION_ERRORS = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.ENETDOWN,
    errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.ENETUNREACH,
})


def accept_waiting(listening: socket.socket, limit: int) -> Tuple[List[int], Optional[OSError]]:
    """
    Accept what waits on the non-blocking C{listening}, up to C{limit}
    connections: their descriptors, and the error that stopped accepting
    if it was not the end of the queue nor one connection's (out of
    descriptors, say: the caller should pause, since the socket stays
    readable).
    """
    accepted: List[int] = []
    # CPython's socket.accept() is written over the private _accept(),
    # which returns the new descriptor and the peer's address (since 3.3;
    # tests/test_round_robin.py checks it): calling it directly saves
    # building a socket object per connection.
    accept = listening._accept  # type: ignore[attr-defined]
    while len(accepted) < limit:
        try:
            fd, _ = accept()
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno in ONE_CONNECTION_ERRORS:  # that client is gone: next
                continue
            return accepted, e
        accepted.append(fd)
    return accepted, None
