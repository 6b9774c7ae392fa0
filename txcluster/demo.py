"""
The demo app, served by default.

- ``GET /`` names the worker that answered; ``GET /health`` is a health check.
- With ``--redis``: ``GET /views/<page>`` counts a page view in Redis (every
  worker shares the counts), and a ``flush_views`` cron job (``lock=True``:
  once across all hosts sharing the Redis) moves the counts into a SQLite
  file (``TXCLUSTER_DEMO_DB``, default ``txcluster-demo.sqlite``) through
  ``twisted.enterprise.adbapi``.  ``GET /views``
  shows the flushed totals.

The flush moves each batch exactly once: the counts are first renamed to a
batch key (atomically, so a view is in exactly one batch); the batch is
applied to SQLite in one transaction that also records the batch's name;
only then is the batch key deleted.  A flush that dies between the commit
and the delete is finished by the next one, which sees the batch's name in
SQLite and only deletes it.
"""

import json
import os
import uuid
from typing import Dict, Optional

import txredisapi
from klein import Klein
from twisted.enterprise import adbapi

from .app import Cluster
from .redis import connected

web = Klein()
cluster = Cluster(web)

VIEWS = "txcluster:demo:views"
BATCH_PREFIX = "txcluster:demo:views:batch:"
FLUSH_SECONDS = float(os.environ.get("TXCLUSTER_DEMO_FLUSH_SECONDS", "5"))
#: The demo's own settings come from the environment (or --env-file), as
#: any app's do: txcluster's options are for what every app needs.
DB_PATH_VARIABLE = "TXCLUSTER_DEMO_DB"
DEFAULT_DB_PATH = "txcluster-demo.sqlite"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS views (page TEXT PRIMARY KEY, count INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS flushed_batches (batch TEXT PRIMARY KEY)",
)


class ViewStore:
    """The flushed totals, in SQLite through adbapi's thread pool."""

    def __init__(self, path: str) -> None:
        self.pool = adbapi.ConnectionPool(
            "sqlite3", path, timeout=30, check_same_thread=False, cp_min=1, cp_max=1)

    async def create(self) -> None:
        for statement in _SCHEMA:
            await self.pool.runOperation(statement)

    async def totals(self) -> Dict[str, int]:
        rows = await self.pool.runQuery("SELECT page, count FROM views ORDER BY page")
        return {page: count for page, count in rows}

    async def total(self, page: str) -> int:
        rows = await self.pool.runQuery("SELECT count FROM views WHERE page = ?", (page,))
        return rows[0][0] if rows else 0

    async def apply(self, batch: str, counts: Dict[str, int]) -> bool:
        """Add a batch's counts, once: False if it was applied before."""
        return await self.pool.runInteraction(self._apply, batch, counts)

    @staticmethod
    def _apply(cursor, batch: str, counts: Dict[str, int]) -> bool:
        cursor.execute("SELECT 1 FROM flushed_batches WHERE batch = ?", (batch,))
        if cursor.fetchone():
            return False
        cursor.execute("INSERT INTO flushed_batches (batch) VALUES (?)", (batch,))
        for page, count in counts.items():
            cursor.execute(
                "INSERT INTO views (page, count) VALUES (?, ?) "
                "ON CONFLICT (page) DO UPDATE SET count = count + excluded.count",
                (page, count))
        return True

    def close(self) -> None:
        self.pool.close()


store: Optional[ViewStore] = None


def _json(request, body: object, code: int = 200) -> str:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body)


@web.route("/")
def index(request):
    worker = cluster.worker
    return _json(request, {"worker": worker.id, "pid": os.getpid(), "workers": worker.count})


@web.route("/health")
def health(request):
    return _json(request, {"status": "ok", "worker": cluster.worker.id})


@web.route("/views/<page>")
async def count_view(request, page: str):
    if cluster.redis is None:
        return _json(request, {"error": "page views need --redis"}, 404)
    if not connected(cluster.redis):
        return _json(request, {"error": "Redis is unreachable; try again"}, 503)
    pending = await cluster.redis.hincrby(VIEWS, page, 1)
    return _json(request, {"page": page, "views": pending + await store.total(page)})


@web.route("/views")
async def flushed_views(request):
    if store is None:
        return _json(request, {"error": "page views need --redis"}, 404)
    return _json(request, await store.totals())


@cluster.on_startup
async def open_store() -> None:
    """With Redis, open the SQLite store and schedule the flush."""
    global store
    if cluster.redis is not None:
        store = ViewStore(os.environ.get(DB_PATH_VARIABLE) or DEFAULT_DB_PATH)
        await store.create()
        cluster.cron(seconds=FLUSH_SECONDS, lock=True)(flush_views)


@cluster.on_shutdown
def close_store() -> None:
    if store is not None:
        store.close()


async def flush_views() -> None:
    """Move the view counts from Redis into SQLite, each batch exactly once
    (a cron job with C{lock=True}: once per tick across hosts)."""
    # Batches a previous flush left behind (it died mid-way) go first.
    # KEYS is fine for the handful of keys this demo makes.
    for batch in await cluster.redis.keys(BATCH_PREFIX + "*"):
        await _flush_batch(batch)
    batch = BATCH_PREFIX + uuid.uuid4().hex
    try:
        await cluster.redis.rename(VIEWS, batch)
    except txredisapi.ResponseError:  # no such key: no views since the last flush
        return
    await _flush_batch(batch)


async def _flush_batch(batch: str) -> None:
    counts = {page: int(count) for page, count in (await cluster.redis.hgetall(batch)).items()}
    await store.apply(batch, counts)
    await cluster.redis.delete(batch)
