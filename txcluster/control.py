"""
The control socket's protocol: what the C{txcluster} command asks a
running master (L{txcluster.master.control} answers, L{txcluster.cli}
asks).  AMP, as between the master and its workers, over a Unix socket
that only its owner may use (mode 0600).
"""

from __future__ import annotations

from twisted.protocols import amp


class ControlError(Exception):
    """The master could not do what it was asked; the message says why."""


_ERRORS = {ControlError: b"CONTROL_ERROR"}


class Status(amp.Command):
    """The master and every worker process, as one JSON object."""

    response = [(b"status", amp.Unicode())]
    errors = _ERRORS


class Scale(amp.Command):
    """Set the worker count; answered once that many workers are ready."""

    arguments = [(b"count", amp.Integer())]
    errors = _ERRORS


class Reload(amp.Command):
    """A rolling restart (as SIGHUP); answered once every worker has been
    replaced, or with the error of the one whose successor failed."""

    errors = _ERRORS


class Stop(amp.Command):
    """A graceful shutdown (as SIGTERM); answered at once, with the
    master's pid, so that the caller can wait for it to exit."""

    response = [(b"pid", amp.Integer())]
    errors = _ERRORS
