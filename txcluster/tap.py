"""
The twistd/twist plugin's entry points: L{Options} and L{makeService}.

Process-level concerns live here because only the program's entry point
may own them: a usage error or a startup error (such as an address in use)
prints one line instead of the whole help or a traceback, and the master's
exit status (1 after a crash loop) survives twistd, which otherwise always
exits 0.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any, Optional, Sequence

from twisted.application.service import IService
from twisted.python import usage

from .listening import StartupError
from .options import ClusterOptions, Settings

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
        if not settings.single and not settings.listen.startswith("ssl:"):
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
    """The master, or with C{--single} the one serving process."""
    from .master import MasterService, SingleProcessService

    if settings.single:
        return SingleProcessService(reactor, settings)
    return MasterService(reactor, settings)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    service = build_service(options.settings, reactor)
    _report_startup_errors_in_one_line()
    atexit.register(_exit_with_status_of, service)
    return service


def _report_startup_errors_in_one_line() -> None:
    previous = sys.excepthook

    def hook(kind: type, error: BaseException, traceback: Optional[Any]) -> None:
        if issubclass(kind, StartupError):
            # twistd has redirected sys.stderr into the log by now.
            sys.__stderr__.write(f"txcluster: {error}\n")
            sys.__stderr__.flush()
        else:
            previous(kind, error, traceback)

    sys.excepthook = hook


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
