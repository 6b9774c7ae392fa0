"""
The C{txcluster} command: ask a running master, over its control socket
(C{--control PATH}), for its status, to scale, to reload or to stop.

    txcluster --control PATH status [--json]
    txcluster --control PATH scale N
    txcluster --control PATH reload
    txcluster --control PATH stop

Every error is one line on stderr, and exit status 1 (2 for a usage error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, NoReturn, Optional, Sequence

from .control import ControlError, Reload, Scale, Status, Stop
from .options import SETTINGS

#: How long a command waits for the master's answer (a reload of many
#: slow workers, a scale-up) before it gives up.
DEFAULT_TIMEOUT = 600.0

#: The variable that names the control socket: the one of the master's
#: C{--control} option, from its table (the first of its (variable, parser)).
CONTROL_VARIABLE: str = next(s.env[0][0] for s in SETTINGS if s.name == "control")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"txcluster: error: {message} (see txcluster --help)\n")


def parse(argv: Sequence[str], environ: Dict[str, str]) -> argparse.Namespace:
    parser = _Parser(prog="txcluster", description="Control a running txcluster master.")
    parser.add_argument("--control", metavar="PATH", default=environ.get(CONTROL_VARIABLE),
                        help=f"the master's control socket (default: ${CONTROL_VARIABLE})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help=f"seconds to wait for the master (default {DEFAULT_TIMEOUT:.0f})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    status = commands.add_parser("status", help="the master and its workers")
    status.add_argument("--json", action="store_true", help="one JSON object")
    scale = commands.add_parser("scale", help="set the worker count; wait until ready")
    scale.add_argument("count", type=_count, metavar="N")
    commands.add_parser("reload", help="rolling restart; wait until every worker is replaced")
    commands.add_parser("stop", help="graceful shutdown; wait until the master has exited")
    options = parser.parse_args(argv)
    if not options.control:
        parser.error(f"no control socket: give --control PATH or set {CONTROL_VARIABLE}")
    return options


def _count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1 worker")
    return count


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _mib(rss: int) -> str:
    return f"{rss / 1048576:.1f} MiB" if rss else "-"


def status_table(status: Dict[str, Any]) -> str:
    lines = [f"master pid {status['pid']}, up {_duration(status['uptime'])}, "
             f"listening on {status['listen']} ({status['balance']})",
             f"{'worker':>6}  {'pid':>7}  {'state':<9} {'uptime':>8}  {'requests':>9}  {'rss':>10}"]
    for w in status["workers"]:
        lines.append(f"{w['id']:>6}  {w['pid']:>7}  {w['state']:<9} {_duration(w['uptime']):>8}"
                     f"  {w['requests']:>9}  {_mib(w['rss']):>10}")
    return "\n".join(lines)


def running(pid: int) -> bool:
    """True while C{pid} runs (a zombie, waiting for its parent, has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _client() -> Any:
    """An AMP client that knows when the master has closed its end, and
    which process that was (C{SO_PEERCRED} gives its pid as this process
    sees it, whatever pid namespace the master runs in)."""
    import socket
    import struct

    from twisted.internet.defer import Deferred
    from twisted.protocols.amp import AMP

    class Client(AMP):
        def __init__(self) -> None:
            super().__init__()
            self.closed: Deferred = Deferred()
            self.peer_pid: Optional[int] = None

        def connectionMade(self) -> None:
            super().connectionMade()
            credentials = self.transport.getHandle().getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            self.peer_pid = struct.unpack("3i", credentials)[0]

        def connectionLost(self, reason: Any) -> None:
            super().connectionLost(reason)
            self.closed.callback(None)

    return Client()


async def _run(reactor: Any, options: argparse.Namespace, out: List[str]) -> None:
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol

    try:
        client = await connectProtocol(UNIXClientEndpoint(reactor, options.control), _client())
    except Exception as e:
        raise ControlError(f"no master answers on {options.control} ({_reason(e)})") from None
    try:
        await _command(reactor, client, options, out)
    finally:
        if client.transport is not None:  # after stop, the master has closed it
            client.transport.loseConnection()


async def _command(reactor: Any, client: Any, options: argparse.Namespace,
                   out: List[str]) -> None:
    def ask(command: Any, **arguments: Any) -> Any:
        return client.callRemote(command, **arguments).addTimeout(options.timeout, reactor)

    if options.command == "status":
        status = json.loads((await ask(Status))["status"])
        out.append(json.dumps(status) if options.json else status_table(status))
    elif options.command == "scale":
        await ask(Scale, count=options.count)
        out.append(f"{options.count} workers ready")
    elif options.command == "reload":
        await ask(Reload)
        out.append("every worker replaced")
    elif options.command == "stop":
        pid = (await ask(Stop))["pid"]
        if not await _exited(reactor, client, options.timeout):
            raise ControlError(f"master (pid {pid}) still running after "
                               f"{options.timeout:.0f}s")
        out.append(f"master (pid {pid}) stopped")


async def _exited(reactor: Any, client: Any, timeout: float) -> bool:
    """Wait for the master to close the control connection, which its
    reactor does as it shuts down, and then for the process to be gone."""
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    try:
        await client.closed.addTimeout(timeout, reactor)
    except Exception:
        return False
    while client.peer_pid is not None and running(client.peer_pid):
        if reactor.seconds() >= deadline:
            return False
        await deferLater(reactor, 0.02, lambda: None)
    return True


def main(argv: Optional[Sequence[str]] = None) -> None:
    options = parse(sys.argv[1:] if argv is None else argv, dict(os.environ))
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    out: List[str] = []
    errors: List[str] = []

    async def run(reactor: Any) -> None:
        try:
            await _run(reactor, options, out)
        except Exception as e:
            errors.append(_one_line(e))

    try:
        react(lambda reactor: ensureDeferred(run(reactor)))
    except SystemExit as e:
        if e.code:
            raise
    if errors:
        sys.exit(f"txcluster: {errors[0]}")
    if out:
        print(out[0])


def _reason(error: BaseException) -> str:
    """Why connecting failed: Twisted's ConnectError keeps the errno."""
    errno = getattr(error, "osError", None)
    if isinstance(errno, int):
        return os.strerror(errno)
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _one_line(error: BaseException) -> str:
    from twisted.internet.defer import TimeoutError
    from twisted.protocols.amp import RemoteAmpError, UnknownRemoteError

    if isinstance(error, TimeoutError):
        return "no answer from the master in time"
    if isinstance(error, (ControlError, RemoteAmpError)):
        text = str(error)
        if isinstance(error, RemoteAmpError):
            text = text.split(": ", 1)[-1] if ": " in text else text
        return text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, UnknownRemoteError):
        return "the master failed to answer (see its log)"
    return f"{type(error).__name__}: {error}".splitlines()[0]
