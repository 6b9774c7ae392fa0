"""
Redis URLs: C{redis://} and C{unix://}, with database, password and pool
size.  Pure parsing, so that the master can reject a bad C{--redis} at
start without importing txredisapi.
"""

from __future__ import annotations

from typing import Optional, Tuple
from urllib.parse import parse_qsl, unquote, urlsplit

import attr


@attr.s(frozen=True, auto_attribs=True)
class RedisConfig:
    """Where Redis is: C{host} and C{port}, or the unix socket C{path}."""

    host: Optional[str] = None
    port: int = 6379
    path: Optional[str] = None
    db: int = 0
    username: Optional[str] = attr.ib(default=None, repr=False)
    password: Optional[str] = attr.ib(default=None, repr=False)
    pool_size: int = 1

    @property
    def where(self) -> str:
        """The server and database, for log lines; never the password."""
        if self.path is not None:
            server = f"unix:{self.path}"
        elif ":" in (self.host or ""):
            server = f"[{self.host}]:{self.port}"
        else:
            server = f"{self.host}:{self.port}"
        return f"{server} db {self.db}"


def _number(text: str, what: str, minimum: int) -> int:
    if not text.isdigit() or int(text) < minimum:
        raise ValueError(f"bad Redis URL: {what} must be a whole number "
                         f">= {minimum}, not {text!r}")
    return int(text)


def _query(query: str) -> Tuple[Optional[int], int]:
    """The C{db} and C{pool_size} query parameters."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"bad Redis URL: cannot parse the query {query!r}")
    seen: dict = {}
    for name, value in pairs:
        if name not in ("db", "pool_size"):
            raise ValueError(f"bad Redis URL: unknown parameter {name!r} "
                             "(known: db, pool_size)")
        if name in seen:
            raise ValueError(f"bad Redis URL: parameter {name!r} given twice")
        seen[name] = value
    db = _number(seen["db"], "db", 0) if "db" in seen else None
    pool_size = _number(seen.get("pool_size", "1"), "pool_size", 1)
    return db, pool_size


def _credentials(userinfo: str) -> Tuple[Optional[str], Optional[str]]:
    """C{user:password}, C{:password} or nothing, percent-decoded."""
    if not userinfo:
        return None, None
    user, colon, password = userinfo.partition(":")
    if not colon or not password:
        raise ValueError("bad Redis URL: a user name needs a password "
                         "(user:password@host, or :password@host)")
    return unquote(user) or None, unquote(password)


def parse_redis_url(url: str) -> RedisConfig:
    """
    Parse C{redis://[[user]:password@]host[:port][/db][?pool_size=N]} or
    C{unix://[[user]:password@]/path/to/redis.sock[?db=N][&pool_size=N]}.

    @raise ValueError: one line naming what is wrong (never the password).
    """
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in ("redis", "unix"):
        raise ValueError("bad Redis URL: expected redis://host[:port][/db] "
                         "or unix:///path/to/redis.sock")
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo)
    query_db, pool_size = _query(parts.query)

    if scheme.lower() == "unix":
        if hostport:
            raise ValueError(f"bad Redis URL: unix URLs have no host ({hostport!r}); "
                             "write unix:///path/to/redis.sock")
        if not parts.path.startswith("/"):
            raise ValueError("bad Redis URL: unix URL without a socket path; "
                             "write unix:///path/to/redis.sock")
        return RedisConfig(path=unquote(parts.path), db=query_db or 0,
                           username=username, password=password,
                           pool_size=pool_size)

    if not parts.hostname:
        raise ValueError("bad Redis URL: no host (redis://host[:port][/db])")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad Redis URL: bad port in {hostport!r}")
    if port == 0:
        raise ValueError("bad Redis URL: port 0")
    path_db = parts.path.lstrip("/")
    db = _number(path_db, "the database", 0) if path_db else None
    if db is not None and query_db is not None:
        raise ValueError("bad Redis URL: database given both as /N and as ?db=N")
    return RedisConfig(host=parts.hostname, port=port or 6379,
                       db=db if db is not None else (query_db or 0),
                       username=username, password=password, pool_size=pool_size)
