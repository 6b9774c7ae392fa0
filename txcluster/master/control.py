"""
C{--control PATH}: the master answers the C{txcluster} command on a Unix
socket (L{txcluster.control}), created with mode 0600.  A socket file left
by a dead master is replaced; one that a live master answers on is a
startup error.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from typing import Any, Awaitable, Dict, Protocol

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from ..control import ControlError, Reload, Scale, Status, Stop
from .sockets import StartupError

log = Logger(namespace="txcluster.master")


class Controlled(Protocol):
    """What the control socket asks of the master."""

    reactor: Any

    def status(self) -> Dict[str, Any]: ...

    def scale_to(self, count: int) -> Awaitable[None]: ...

    def reload(self) -> Deferred:
        """Fires with None when done, else why it stopped."""

    def stop_gracefully(self) -> None: ...


def take_over_stale_socket(path: str) -> None:
    """Remove C{path} if it is a socket no master answers on.

    @raise StartupError: a live master answers there, or it is not a socket.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"not a socket: {path} (--control {path})")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:  # its master is gone
            try:
                os.unlink(path)
            except OSError as e:
                raise StartupError(f"cannot replace a stale socket: {e.strerror} "
                                   f"(--control {path})") from None
            return
        except OSError as e:  # not ours to probe: leave it alone
            raise StartupError(f"{e.strerror} (--control {path})") from None
    raise StartupError(f"a running master already answers on {path} (--control {path})")


#: While the control socket is bound: its file is created 0600, never
#: briefly open to others between bind() and the chmod that mode= does.
CONTROL_UMASK = 0o177


def listen_control(reactor: Any, path: str, factory: Factory) -> Any:
    """Listen on C{path}, mode 0600 from the start, replacing a stale
    socket file.

    @raise StartupError: see L{take_over_stale_socket}; or it cannot be bound.
    """
    take_over_stale_socket(path)
    previous_umask = os.umask(CONTROL_UMASK)
    try:
        return reactor.listenUNIX(path, factory, mode=0o600)
    except Exception as e:  # CannotListenError
        reason = getattr(getattr(e, "socketError", None), "strerror", None) or e
        raise StartupError(f"{reason} (--control {path})") from None
    finally:
        os.umask(previous_umask)


class ControlProtocol(amp.AMP):
    """One connection of the txcluster command."""

    def __init__(self, master: Controlled) -> None:
        super().__init__()
        self._master = master

    @Status.responder
    def status(self) -> Dict[str, str]:
        return {"status": json.dumps(self._master.status())}

    @Scale.responder
    def scale(self, count: int) -> Deferred:
        if count < 1:
            raise ControlError(f"cannot scale to {count}: at least 1 worker")
        return ensureDeferred(self._master.scale_to(count)).addCallback(lambda _: {})

    @Reload.responder
    def reload(self) -> Deferred:
        def answer(failure: Any) -> Dict[str, Any]:
            if failure is not None:
                raise ControlError(failure)
            return {}

        return self._master.reload().addCallback(answer)

    @Stop.responder
    def stop(self) -> Dict[str, int]:
        self._master.reactor.callLater(0, self._master.stop_gracefully)
        return {"pid": os.getpid()}


class ControlFactory(Factory):
    noisy = False

    def __init__(self, master: Controlled) -> None:
        self._master = master

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self._master)
