"""A cron job with lock=True, for clusters that share one Redis."""

import os
import time

from klein import Klein

from txcluster import Cluster

from .apps import record

web = Klein()
cluster = Cluster(web)


@web.route("/")
def index(request):
    return "ok"


@cluster.cron(seconds=float(os.environ.get("TEST_CRON_SECONDS", "0.5")), lock=True)
def tick():
    record("TEST_CRON", f"{os.getpid()} {time.time():.3f}")
