"""
Command-line options, environment, ``--config`` INI file and ``.env`` file.

Every setting is declared once in L{SETTINGS}; the command line, the
environment, the config file and the help text are all derived from that
table.  Precedence: command line, then environment, then config file, then
default.  A bad value on the command line or in the config file is a usage
error; a bad value in the environment is one warning and is otherwise
ignored.
"""

from __future__ import annotations

import configparser
import os
import re
from typing import Any, Callable, Mapping, MutableMapping, Optional, Sequence

import attr
from twisted.python import usage

from .cpus import cgroup_cpu_limit, default_workers, kernel_steers_by_cpu, usable_cpus
from .settings import (
    ACCESS_LOG_FORMATS, AUTO, BALANCE_MODES, DEFAULT_APP, REUSEPORT, REUSEPORT_ENDPOINTS,
    ROUND_ROBIN, Settings, endpoint_kind,
)


class BadValue(ValueError):
    """A setting's value does not parse; the message says what was expected."""


#: More workers than this many per usable CPU get a warning.
WORKERS_PER_CPU_WARNING = 4


def usable_cpu_count() -> int:
    """How many CPUs this process may use: those it may run on (taskset,
    cpusets), or its cgroup's CPU quota if lower."""
    return default_workers(usable_cpus(), cgroup_cpu_limit())


def choose_balance(settings: Settings, kernel_steers: bool, cpus: int) -> Settings:
    """
    Resolve C{--balance auto}: C{reuseport} where the kernel hands each
    connection to the worker on the CPU that received it (Linux 6.2 and
    later) and C{--listen} is TCP, with each worker pinned to a CPU
    (C{--cpu-affinity}) when the workers take every CPU there is (two or
    more; fewer workers would crowd the first CPUs, beside other
    services); else C{round-robin}.  (README.rst, "Balancing", says why.)
    """
    if settings.balance != AUTO or settings.single:
        return settings
    kind = endpoint_kind(settings.listen)
    if not kernel_steers or kind not in REUSEPORT_ENDPOINTS:
        why = ("the kernel does not steer connections by CPU (Linux 6.2 does)"
               if not kernel_steers else f"--listen is not TCP ({kind}:)")
        return attr.evolve(settings, balance=ROUND_ROBIN, notes=settings.notes + (
            f"balance auto: round-robin, since {why}",))
    pinned = settings.cpu_affinity or settings.workers >= cpus >= 2
    how = ("with each worker pinned to a CPU" if pinned else
           "without pinning (fewer workers than CPUs, or one CPU)")
    return attr.evolve(settings, balance=REUSEPORT, cpu_affinity=pinned, notes=settings.notes + (
        f"balance auto: reuseport, {how}",))


# --- value parsers: text -> value, or BadValue -------------------------------


def parse_workers(text: str) -> Optional[int]:
    """A positive worker count, or C{None} for C{auto} (usable CPUs)."""
    if text.strip().lower() == "auto":
        return None
    try:
        count = int(text)
    except ValueError:
        raise BadValue("expected a positive integer or 'auto'") from None
    if count < 1:
        raise BadValue("expected a positive integer or 'auto'")
    return count


def parse_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise BadValue("expected a number of seconds") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise BadValue("expected a non-negative number of seconds")
    return seconds


def parse_positive_seconds(text: str) -> float:
    seconds = parse_seconds(text)
    if seconds <= 0:
        raise BadValue("expected a positive number of seconds")
    return seconds


def parse_endpoint(text: str) -> str:
    """The shape of a server endpoint description, C{type:...}; Twisted's
    own parser checks the rest once the layers are merged (L{check_endpoint})."""
    if not re.match(r"[A-Za-z][A-Za-z0-9_+.-]*:", text):
        raise BadValue("not a server endpoint (expected TYPE:..., e.g. tcp:8080)")
    return text


def check_endpoint(text: str) -> str:
    """A Twisted server endpoint description, checked by Twisted's parser."""
    from twisted.internet.endpoints import serverFromString

    try:
        # Parsing only: no endpoint built here is ever listened on, so no
        # reactor is needed (and importing one would pre-empt twistd -r).
        serverFromString(None, text)
    except Exception as e:
        raise BadValue(f"not a server endpoint ({e})") from None
    return text


_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"


def parse_app(text: str) -> str:
    """C{module:name}; only its shape is checked, the master never imports it."""
    if not re.fullmatch(f"{_DOTTED}:{_DOTTED}", text):
        raise BadValue("expected MODULE:NAME, e.g. myapp.web:cluster")
    return text


def parse_redis_url(text: str) -> str:
    from .redis_url import parse_redis_url as parse

    try:
        parse(text)
    except ValueError as e:
        raise BadValue(str(e)) from None
    return text


def parse_balance(text: str) -> str:
    if text not in BALANCE_MODES:
        raise BadValue(f"expected one of {', '.join(BALANCE_MODES)}")
    return text


def parse_count(text: str) -> int:
    """A whole number, 0 or more (0: off)."""
    try:
        count = int(text)
    except ValueError:
        raise BadValue("expected a whole number (0 means off)") from None
    if count < 0:
        raise BadValue("expected a whole number (0 means off)")
    return count


def parse_access_log_format(text: str) -> str:
    if text not in ACCESS_LOG_FORMATS:
        raise BadValue(f"expected one of {', '.join(ACCESS_LOG_FORMATS)}")
    return text


def parse_health_path(text: str) -> str:
    """A URL path, or empty (off)."""
    if text and not text.startswith("/"):
        raise BadValue("expected a path starting with /, or nothing (off)")
    return text


def parse_path(text: str) -> str:
    if not text:
        raise BadValue("expected a path")
    return text


def parse_positive_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise BadValue("expected a whole number above 0") from None
    if count < 1:
        raise BadValue("expected a whole number above 0")
    return count


def parse_forwarded_allow_ips(text: str) -> str:
    """C{*}, or addresses and networks separated by commas; spaces dropped."""
    from .forwarded import TrustedProxies

    try:
        return str(TrustedProxies.parse(text))
    except ValueError as e:
        raise BadValue(str(e)) from None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise BadValue("expected true/false, 1/0, yes/no or on/off")


def parse_clustering_enabled(text: str) -> bool:
    """C{CLUSTERING_ENABLED=false} means single-process mode."""
    return not parse_bool(text)


def parse_port(text: str) -> str:
    """C{PORT=8000} means C{tcp:8000}."""
    try:
        port = int(text)
    except ValueError:
        raise BadValue("expected a TCP port number") from None
    if not 0 <= port <= 65535:
        raise BadValue("expected a TCP port number")
    return f"tcp:{port}"


@attr.s(frozen=True, auto_attribs=True)
class Setting:
    """One option: how it is spelled on each layer and how it parses."""

    name: str
    doc: str
    default: Any = None
    parse: Callable[[str], Any] = parse_path
    short: Optional[str] = None
    flag: bool = False
    metavar: Optional[str] = None
    # (variable, parser) pairs, the first one set wins.
    env: Sequence[tuple[str, Callable[[str], Any]]] = ()
    in_config_file: bool = True

    @property
    def attribute(self) -> str:
        return self.name.replace("-", "_")


SETTINGS: Sequence[Setting] = (
    Setting(
        "listen", "Server endpoint to listen on (tcp:, tcp6:, unix:, ssl:, systemd:).",
        default="tcp:8080", parse=parse_endpoint, short="l", metavar="ENDPOINT",
        env=(("TXCLUSTER_LISTEN", parse_endpoint), ("PORT", parse_port)),
    ),
    Setting(
        "workers", "Number of worker processes; 'auto' means usable CPUs.",
        default=None, parse=parse_workers, short="w", metavar="N",
        env=(("WEB_CONCURRENCY", parse_workers),),
    ),
    Setting(
        "single", "One process, no workers: the app runs in the master.",
        default=False, parse=parse_bool, flag=True,
        env=(("CLUSTERING_ENABLED", parse_clustering_enabled),),
    ),
    Setting(
        "app", "What every worker serves: MODULE:NAME of a Klein app, IResource, "
        "Cluster, or a factory of one.",
        default=DEFAULT_APP, parse=parse_app, short="a", metavar="MODULE:NAME",
        env=(("TXCLUSTER_APP", parse_app),),
    ),
    Setting(
        "balance", "How connections are spread: 'auto' (reuseport with "
        "--cpu-affinity where the kernel steers connections by CPU, Linux 6.2 and "
        "later, and --listen is TCP; else round-robin), 'round-robin' (the master "
        "accepts and hands each connection to the next worker), 'kernel' (workers "
        "accept on the shared socket, one per wakeup) or 'reuseport' (a socket per "
        "worker, each keeping a fair share, TCP only; see README.rst).",
        default=AUTO, parse=parse_balance, metavar="MODE",
        env=(("TXCLUSTER_BALANCE", parse_balance),),
    ),
    Setting(
        "cpu-affinity", "Pin worker N to usable CPU N-1 (modulo the CPUs); with "
        "round-robin or reuseport, serve each connection on the CPU that received it.",
        default=False, parse=parse_bool, flag=True,
        env=(("TXCLUSTER_CPU_AFFINITY", parse_bool),),
    ),
    Setting(
        "redis", "Redis URL; each worker opens its own connection.",
        parse=parse_redis_url, metavar="URL", env=(("REDIS_URL", parse_redis_url),),
    ),
    Setting(
        "shutdown-timeout", "Seconds in-flight requests get to finish on shutdown.",
        default=30.0, parse=parse_seconds, metavar="S",
        env=(("TXCLUSTER_SHUTDOWN_TIMEOUT", parse_seconds),),
    ),
    Setting(
        "shutdown-delay", "On SIGTERM, seconds during which health checks answer 503 "
        "while requests are still served, before accepting stops.",
        default=0.0, parse=parse_seconds, metavar="S",
        env=(("TXCLUSTER_SHUTDOWN_DELAY", parse_seconds),),
    ),
    Setting(
        "health", "Path every worker answers in front of the app: 200, or 503 once "
        "it is shutting down; empty: off.",
        default="/health", parse=parse_health_path, metavar="PATH",
        env=(("TXCLUSTER_HEALTH", parse_health_path),),
    ),
    Setting(
        "timeout", "Seconds a worker may stay silent (no heartbeat) before it is "
        "killed and replaced.",
        default=30.0, parse=parse_positive_seconds, metavar="S",
        env=(("TXCLUSTER_TIMEOUT", parse_positive_seconds),),
    ),
    Setting(
        "ready-timeout", "Seconds a new worker gets to report ready during a "
        "rolling restart.",
        default=30.0, parse=parse_positive_seconds, metavar="S",
        env=(("TXCLUSTER_READY_TIMEOUT", parse_positive_seconds),),
    ),
    Setting(
        "respawn-delay", "Longest pause between fast respawns (back-off doubles "
        "from 0.1 s up to this).",
        default=2.0, parse=parse_seconds, metavar="S",
        env=(("TXCLUSTER_RESPAWN_DELAY", parse_seconds),),
    ),
    Setting(
        "access-log", "Combined-format access log file; '-' means the main log.",
        parse=parse_path, metavar="PATH", env=(("TXCLUSTER_ACCESS_LOG", parse_path),),
    ),
    Setting(
        "max-requests", "Replace a worker once it has served N requests (0: never).",
        default=0, parse=parse_count, metavar="N",
        env=(("TXCLUSTER_MAX_REQUESTS", parse_count),),
    ),
    Setting(
        "max-requests-jitter", "Add a random 0..J to each worker's --max-requests, so that "
        "workers do not recycle together.",
        default=0, parse=parse_count, metavar="J",
        env=(("TXCLUSTER_MAX_REQUESTS_JITTER", parse_count),),
    ),
    Setting(
        "max-memory", "Replace a worker whose resident memory exceeds MIB mebibytes "
        "(0: no limit).",
        default=0, parse=parse_count, metavar="MIB",
        env=(("TXCLUSTER_MAX_MEMORY", parse_count),),
    ),
    Setting(
        "metrics", "Serve Prometheus metrics from the master on this endpoint "
        "(e.g. tcp:9100:interface=127.0.0.1).",
        parse=parse_endpoint, metavar="ENDPOINT", env=(("TXCLUSTER_METRICS", parse_endpoint),),
    ),
    Setting(
        "control", "Unix socket for the txcluster command (status, scale, reload, stop); "
        "default $RUNTIME_DIRECTORY/txcluster.sock under systemd.",
        parse=parse_path, metavar="PATH", env=(("TXCLUSTER_CONTROL", parse_path),),
    ),
    Setting(
        "access-log-format", "Access log lines: 'combined' (Apache's) or 'json' "
        "(one object per line).",
        default="combined", parse=parse_access_log_format, metavar="FORMAT",
        env=(("TXCLUSTER_ACCESS_LOG_FORMAT", parse_access_log_format),),
    ),
    Setting(
        "forwarded-allow-ips", "Comma-separated addresses or networks ('*': all) whose "
        "X-Forwarded-For, X-Forwarded-Proto and Forwarded headers are trusted.",
        default="127.0.0.1", parse=parse_forwarded_allow_ips, metavar="LIST",
        env=(("FORWARDED_ALLOW_IPS", parse_forwarded_allow_ips),),
    ),
    Setting(
        "keep-alive", "Seconds an idle keep-alive connection is kept (0: close after "
        "each response).",
        default=5.0, parse=parse_seconds, metavar="S",
        env=(("TXCLUSTER_KEEP_ALIVE", parse_seconds),),
    ),
    Setting(
        "header-timeout", "Seconds a request's line and headers may take, from the "
        "connection's start or its first byte; then 408 and close.",
        default=10.0, parse=parse_positive_seconds, metavar="S",
        env=(("TXCLUSTER_HEADER_TIMEOUT", parse_positive_seconds),),
    ),
    Setting(
        "limit-request-line", "Longest request line in bytes (longer: 414; 0: no limit).",
        default=8190, parse=parse_count, metavar="N",
        env=(("TXCLUSTER_LIMIT_REQUEST_LINE", parse_count),),
    ),
    Setting(
        "limit-request-fields", "Most header fields in a request (more: 431; 0: no limit).",
        default=100, parse=parse_count, metavar="N",
        env=(("TXCLUSTER_LIMIT_REQUEST_FIELDS", parse_count),),
    ),
    Setting(
        "limit-request-field-size", "Longest header field in bytes (longer: 431; "
        "0: no limit).",
        default=8190, parse=parse_count, metavar="N",
        env=(("TXCLUSTER_LIMIT_REQUEST_FIELD_SIZE", parse_count),),
    ),
    Setting(
        "limit-request-body", "Longest request body in bytes (longer: 413, read no "
        "further; 0: no limit).",
        default=0, parse=parse_count, metavar="N",
        env=(("TXCLUSTER_LIMIT_REQUEST_BODY", parse_count),),
    ),
    Setting(
        "backlog", "Listen backlog: connections the kernel queues before one is accepted.",
        default=2048, parse=parse_positive_count, metavar="N",
        env=(("TXCLUSTER_BACKLOG", parse_positive_count),),
    ),
    Setting(
        "config", "INI file with a [txcluster] section; keys are long option names.",
        parse=parse_path, short="c", metavar="FILE",
        env=(("TXCLUSTER_CONFIG", parse_path),), in_config_file=False,
    ),
    Setting(
        "env-file", "dotenv file loaded into the environment first.",
        parse=parse_path, metavar="FILE", in_config_file=False,
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


def _config_file_values(path: str) -> dict[str, str]:
    """The C{[txcluster]} section of an INI file, keys checked."""
    parser = configparser.ConfigParser()
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise usage.UsageError(f"--config {path}: cannot read ({e.strerror})")
    except configparser.Error as e:
        first_line = str(e).splitlines()[0]
        raise usage.UsageError(f"--config {path}: not an INI file ({first_line})")
    if not parser.has_section("txcluster"):
        raise usage.UsageError(f"--config {path}: no [txcluster] section")
    values = {}
    for key, value in parser.items("txcluster"):
        name = key.replace("_", "-")
        setting = _BY_NAME.get(name)
        if setting is None or not setting.in_config_file:
            raise usage.UsageError(f"--config {path}: unknown key {key!r}")
        values[name] = value
    return values


def _load_env_file(path: str, environ: MutableMapping[str, str]) -> None:
    """Load a dotenv file; variables already in the environment win."""
    from dotenv import dotenv_values

    if not os.path.isfile(path):
        raise usage.UsageError(f"--env-file {path}: no such file")
    for key, value in dotenv_values(path).items():
        if value is not None:
            environ.setdefault(key, value)


def resolve(
    command_line: Mapping[str, Any],
    environ: MutableMapping[str, str],
    cpu_count: Callable[[], int] = usable_cpu_count,
    sources: Optional[dict] = None,
) -> Settings:
    """
    Merge the layers into L{Settings}.

    @param command_line: values given on the command line, by setting name,
        already parsed; absent or C{None} means not given.
    @param environ: the environment; C{--env-file} is loaded into it.
    @param sources: if given, filled with where each value came from: the
        option (C{--name}), the variable, C{config} or C{default}.
    """
    env_file = command_line.get("env-file")
    if env_file:
        _load_env_file(env_file, environ)
    layers = _Layers(command_line, environ, {} if sources is None else sources)
    resolved = {setting.attribute: layers.value_of(setting) for setting in SETTINGS}
    if resolved["control"] is None and environ.get("RUNTIME_DIRECTORY"):
        # systemd's RuntimeDirectory= (several are separated by colons)
        runtime = environ["RUNTIME_DIRECTORY"].split(":")[0]
        resolved["control"] = os.path.join(runtime, "txcluster.sock")
        layers.sources["control"] = "RUNTIME_DIRECTORY"
    cpus = cpu_count()
    if resolved["workers"] is None:
        resolved["workers"] = cpus
    elif resolved["workers"] > WORKERS_PER_CPU_WARNING * cpus and not resolved["single"]:
        layers.warnings.append(
            f"{resolved['workers']} workers (from {layers.sources['workers']}) on {cpus} usable "
            f"CPUs: each worker is a whole process with its own reactor, so more than one or "
            f"two per CPU only costs memory and start-up time")
    resolved["config"] = layers.config_path
    if resolved["single"]:
        layers.warnings.extend(_ignored_with_single(resolved, layers.sources))
    return Settings(warnings=tuple(layers.warnings), **resolved)


#: What C{--single} has no use for, and why: each one given is a warning.
IGNORED_WITH_SINGLE = {
    "cpu-affinity": "there are no workers to pin",
    "max-requests": "there are no workers to recycle",
    "max-memory": "there are no workers to recycle",
    "metrics": "the master serves them, and there is none",
    "control": "the txcluster command talks to a master, and there is none",
}


def _ignored_with_single(resolved: Mapping[str, Any], sources: Mapping[str, str]) -> list[str]:
    """One warning for each setting given that C{--single} ignores (not
    the control socket systemd's C{RUNTIME_DIRECTORY} implies)."""
    return [f"ignoring {name} (from {sources[name]}): {why} with --single"
            for name, why in IGNORED_WITH_SINGLE.items()
            if resolved[_BY_NAME[name].attribute] and sources[name] != "RUNTIME_DIRECTORY"]


class _Layers:
    """The command line, the environment and the config file, asked in
    that order for each setting; bad environment values become warnings."""

    def __init__(self, command_line: Mapping[str, Any], environ: Mapping[str, str],
                 sources: dict) -> None:
        self.command_line = command_line
        self.environ = environ
        self.sources = sources
        self.warnings: list[str] = []
        self.config_path: Optional[str] = command_line.get("config")
        self.config_values = (_config_file_values(self.config_path)
                              if self.config_path else self._config_from_environment())

    def _config_from_environment(self) -> dict[str, str]:
        path = self.environ.get("TXCLUSTER_CONFIG")
        if not path:
            return {}
        try:
            values = _config_file_values(path)
        except usage.UsageError as e:  # a bad environment value warns
            self.warnings.append(f"ignoring TXCLUSTER_CONFIG: {e}")
            return {}
        self.config_path = path
        return values

    def value_of(self, setting: Setting) -> Any:
        """The first layer that has a value for C{setting} decides; later
        layers are not even read (a bad value there is no error)."""
        layers: Sequence[Callable[[Setting], tuple[str, Any]]] = (
            self._from_command_line, self._from_environment, self._from_config_file)
        for layer in layers:
            source, value = layer(setting)
            if value is not None:
                self.sources[setting.name] = source
                return value
        self.sources[setting.name] = "default"
        return setting.default

    def _from_command_line(self, setting: Setting) -> tuple[str, Any]:
        return f"--{setting.name}", self.command_line.get(setting.name)

    def _from_environment(self, setting: Setting) -> tuple[str, Any]:
        """The first variable of C{setting} that is set."""
        for variable, parse in setting.env:
            text = self.environ.get(variable)
            if not text:
                continue
            try:
                return variable, parse(text)
            except BadValue as e:
                fallback = "config file" if setting.name in self.config_values else "default"
                self.warnings.append(f"ignoring {variable}={text!r}: {e}; using the {fallback}")
                break
        return "", None

    def _from_config_file(self, setting: Setting) -> tuple[str, Any]:
        text = self.config_values.get(setting.name)
        if text is None:
            return "config", None
        try:
            return "config", setting.parse(text)
        except BadValue as e:
            raise usage.UsageError(
                f"--config {self.config_path}: {setting.name} = {text!r}: {e}"
            ) from None


class ClusterOptions(usage.Options):
    """C{twistd txcluster} options."""

    synopsis = "[options]"
    longdesc = (
        "Bind ENDPOINT once and serve the app from N worker processes. "
        "Each option may also come from the environment or a --config file; "
        "see README.rst."
    )

    optFlags = [[s.name, s.short, s.doc] for s in SETTINGS if s.flag]
    optParameters = [[s.name, s.short, None, s.doc] for s in SETTINGS if not s.flag]

    def __init__(
        self,
        environ: Optional[MutableMapping[str, str]] = None,
        cpu_count: Callable[[], int] = usable_cpu_count,
        kernel_steers: Callable[[], bool] = kernel_steers_by_cpu,
    ) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        self._cpu_count = cpu_count
        self._kernel_steers = kernel_steers
        self.settings: Optional[Settings] = None

    def postOptions(self) -> None:
        given: dict[str, Any] = {}
        for setting in SETTINGS:
            value = self[setting.name]
            if setting.flag:
                given[setting.name] = bool(value) or None
                continue
            if value is None:
                continue
            try:
                given[setting.name] = setting.parse(value)
            except BadValue as e:
                raise usage.UsageError(f"--{setting.name} {value!r}: {e}") from None
        sources: dict = {}
        settings = resolve(given, self._environ, self._cpu_count, sources)
        self.before_endpoint_check(settings)
        for name in ("listen", "metrics"):
            settings = self._check_endpoint(settings, name, sources[name])
        self.settings = self._check_balance(settings, sources["balance"])

    def before_endpoint_check(self, settings: Settings) -> None:
        """Runs before Twisted's endpoint parser is first imported."""

    def _check_balance(self, settings: Settings, source: str) -> Settings:
        """reuseport binds more sockets like the first: TCP ones only.  Like
        any bad value, a usage error on the command line or in the config
        file, a warning and the default from the environment.  Then C{auto}
        is resolved (L{choose_balance})."""
        kind = endpoint_kind(settings.listen)
        if settings.balance != REUSEPORT or settings.single or kind in REUSEPORT_ENDPOINTS:
            return choose_balance(settings, self._kernel_steers(), self._cpu_count())
        problem = f"needs a tcp:, tcp6: or ssl: --listen, not {settings.listen!r}"
        if source.startswith("--"):
            raise usage.UsageError(f"--balance reuseport {problem}")
        if source == "config":
            raise usage.UsageError(f"--config {settings.config}: balance = reuseport {problem}")
        warning = f"ignoring {source}='reuseport': it {problem}; using the default"
        return choose_balance(
            attr.evolve(settings, balance=_BY_NAME["balance"].default,
                        warnings=settings.warnings + (warning,)),
            self._kernel_steers(), self._cpu_count())

    @staticmethod
    def _check_endpoint(settings: Settings, name: str, source: str) -> Settings:
        """C{--listen} or C{--metrics}, checked by Twisted's own parser."""
        value = getattr(settings, name)
        if value is None:
            return settings
        try:
            check_endpoint(value)
        except BadValue as e:
            if source.startswith("--"):
                raise usage.UsageError(f"--{name} {value!r}: {e}") from None
            if source == "config":
                raise usage.UsageError(f"--config {settings.config}: "
                                       f"{name} = {value!r}: {e}") from None
            warning = f"ignoring {source}={value!r}: {e}; using the default"
            return attr.evolve(settings, **{name: _BY_NAME[name].default},
                               warnings=settings.warnings + (warning,))
        return settings
