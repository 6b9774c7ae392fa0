"""
The twistd/twist plugin's entry points: L{Options} and L{makeService}.

Process-level concerns live here because only the program's entry point
may own them: a usage error or a startup error (such as an address in use)
prints one line instead of the whole help or a traceback, and the master's
exit status (1 after a crash loop) survives twistd, which otherwise always
exits 0.

L{makeService} binds the listening socket: twistd calls it before it
daemonizes or drops privileges, so the port is bound by whoever started
twistd, and an address in use is an error on the terminal.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any, Optional, Sequence

from twisted.application.service import IService
from twisted.python import usage

from .master.sockets import StartupError
from .options import ClusterOptions
from .settings import Settings, endpoint_kind

__all__ = ["Options", "makeService", "build_service"]


class Options(ClusterOptions):
    """The options twistd parses, plus choices only the program may make."""

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """A usage error is one line on stderr, not twistd's whole help
        followed by the error."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            program = os.path.basename(sys.argv[0]) or "twistd"  # twistd or twist
            raise SystemExit(f"txcluster: error: {e} (see {program} txcluster --help)") from None

    def before_endpoint_check(self, settings: Settings) -> None:
        if not settings.single and endpoint_kind(settings.listen) != "ssl":
            _keep_tls_out_of_this_process()


def _keep_tls_out_of_this_process() -> None:
    """
    The master never speaks TLS (workers terminate it), yet Twisted's
    reactor and endpoint parser import pyOpenSSL, and with it cryptography,
    whenever they are installed: 12 of the master's 47 MB.  A module set to
    None in C{sys.modules} fails to import, and Twisted then runs without
    TLS, as it does where pyOpenSSL is not installed.  Too late once it is
    imported; never in C{--single} or for an C{ssl:} endpoint.
    """
    if "OpenSSL" not in sys.modules:
        sys.modules["OpenSSL"] = None  # type: ignore[assignment]


def build_service(settings: Settings, reactor: Any) -> IService:
    """The master, or with C{--single} the one serving process, with its
    listening socket bound.

    @raise StartupError: C{--listen} cannot be bound.
    """
    if settings.single:
        from .single import build_single

        return build_single(reactor, settings)
    from .master.service import build_master

    return build_master(reactor, settings)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    raised = raise_open_files_limit()
    try:
        service = build_service(options.settings, reactor)
    except StartupError as e:
        raise SystemExit(f"txcluster: {e}") from None
    if raised is not None:
        service.notes.append(
            "raised the open-files limit from {} to {}".format(*raised))
    atexit.register(_exit_with_status_of, service)
    return service


def raise_open_files_limit() -> Optional[tuple]:
    """Raise the soft C{RLIMIT_NOFILE} to the hard one, as nginx and most
    servers do, so that thousands of idle or slow clients do not run a
    worker out of descriptors (the workers inherit it).  The old and new
    soft limits, or None if nothing changed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is raised to the kernel's default ceiling
    # (fs.nr_open), and is itself left as it is.
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return None
        return soft, target
    return None


def _exit_with_status_of(service: Any) -> None:
    """Runs at interpreter exit, after twistd has removed its pidfile."""
    status = int(getattr(service, "exit_status", 0))
    if status:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)
