"""
The resolved configuration, as the master and every worker run with it.

L{txcluster.options} builds a L{Settings} from the command line, the
environment and the config file; the master hands it to each worker in its
environment (L{txcluster.wire.WorkerEnvironment}).
"""

from __future__ import annotations

import json
from typing import Optional

import attr

DEFAULT_APP = "txcluster.demo:cluster"

#: C{--balance} modes (see README.rst, "Balancing").
AUTO = "auto"  # reuseport with CPU affinity where the kernel steers by CPU, else round-robin
ROUND_ROBIN = "round-robin"  # the master accepts and deals each connection
KERNEL = "kernel"  # every worker accepts on the one shared socket
REUSEPORT = "reuseport"  # a SO_REUSEPORT socket per worker id
BALANCE_MODES = (AUTO, ROUND_ROBIN, KERNEL, REUSEPORT)

#: The modes where --cpu-affinity also keeps each connection on the CPU
#: that received it (and so a worker sends back a client that moved).
STEERED_MODES = (ROUND_ROBIN, REUSEPORT)

#: C{--access-log-format} values.
ACCESS_LOG_FORMATS = ("combined", "json")

#: The endpoint types reuseport can bind more sockets of (also behind
#: C{haproxy:}).
REUSEPORT_ENDPOINTS = ("tcp", "tcp6", "ssl")


def endpoint_kind(description: str) -> str:
    """C{tcp} for C{tcp:8080} and for C{haproxy:tcp:8080}: the socket's kind."""
    if description.startswith("haproxy:"):
        description = description[len("haproxy:"):]
    return description.partition(":")[0]


#: What only the master's log needs; workers never see it.
_MASTER_ONLY = ("warnings", "notes")


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Settings:
    """The resolved configuration the master and the workers run with."""

    listen: str = "tcp:8080"
    workers: int = 1
    single: bool = False
    app: str = DEFAULT_APP
    balance: str = ROUND_ROBIN
    cpu_affinity: bool = False
    redis: Optional[str] = None
    shutdown_timeout: float = 30.0
    shutdown_delay: float = 0.0
    health: str = "/health"
    timeout: float = 30.0
    ready_timeout: float = 30.0
    respawn_delay: float = 2.0
    access_log: Optional[str] = None
    access_log_format: str = "combined"
    metrics: Optional[str] = None
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_memory: int = 0  # MiB
    # The HTTP edge (README.rst, "Behind a proxy"):
    forwarded_allow_ips: str = "127.0.0.1"
    keep_alive: float = 5.0
    header_timeout: float = 10.0
    limit_request_line: int = 8190
    limit_request_fields: int = 100
    limit_request_field_size: int = 8190
    limit_request_body: int = 0
    backlog: int = 2048
    control: Optional[str] = None
    config: Optional[str] = None
    env_file: Optional[str] = None
    #: what was ignored while resolving (bad environment values); the
    #: master logs them once it runs, and workers never see them
    warnings: tuple[str, ...] = ()
    #: what resolving chose that the log should say (C{--balance auto})
    notes: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(attr.asdict(self, filter=lambda a, v: a.name not in _MASTER_ONLY))

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        return cls(**json.loads(text))
