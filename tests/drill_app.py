"""
The app of the several-hosts drill: a locked cron job that fences its
writes with its lease's token, as README.rst's "Several hosts" shows.

Each run appends "PID TIME TOKEN" to $DRILL_RUNS; each write, "PID TIME
TOKEN APPLIED" to $DRILL_WRITES.  $DRILL_CRON_SECONDS is the interval;
$DRILL_WORK_SECONDS, how long a run works before it writes.
"""

import os
import time

from klein import Klein
from twisted.internet import reactor
from twisted.internet.task import deferLater

from txcluster import Cluster
from txcluster.redis import fenced_set

from .apps import record

web = Klein()
cluster = Cluster(web)


@web.route("/")
def index(request):
    return f'{{"worker": {cluster.worker.id}}}'


@cluster.cron(seconds=float(os.environ.get("DRILL_CRON_SECONDS", "1")), lock=True)
async def publish_report(lease):
    record("DRILL_RUNS", f"{os.getpid()} {time.time():.3f} {lease.token}")
    work = float(os.environ.get("DRILL_WORK_SECONDS", "0"))
    if work:
        await deferLater(reactor, work, lambda: None)
    report = f"report of run {lease.token}"
    applied = await fenced_set(cluster.redis, "drill:report", report, lease.token)
    record("DRILL_WRITES", f"{os.getpid()} {time.time():.3f} {lease.token} {int(applied)}")
