"""
Apps the integration tests serve.  They report what happens in them by
appending lines to files named in the environment, so a test can see which
process imported the app, ran a cron job or a hook.
"""

import json
import os
import time

from klein import Klein
from twisted.internet import reactor
from twisted.internet.task import deferLater

from txcluster import Cluster


def record(variable: str, line: str) -> None:
    path = os.environ.get(variable)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


record("TEST_IMPORTS", str(os.getpid()))

web = Klein()
cluster = Cluster(web)


@web.route("/")
def index(request):
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"worker": cluster.worker.id, "pid": os.getpid(),
                       "workers": cluster.worker.count})


@web.route("/whoami", methods=["GET", "POST"])
def whoami(request):
    """Who the request says its client is, and how much body it read."""
    client = request.getClientAddress()
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"client": client.host, "port": getattr(client, "port", None),
                       "secure": request.isSecure(), "body": len(request.content.read()),
                       "worker": cluster.worker.id})


@web.route("/slow")
def slow(request):
    seconds = float(request.args.get(b"seconds", [b"1"])[0])
    print(f"slow request for {seconds}s in flight")  # tests wait for this line
    return deferLater(reactor, seconds, lambda: f"slept {seconds} in {os.getpid()}")


@web.route("/block")
def block(request):
    """Blocks the whole reactor (a hung worker), for the given seconds."""
    seconds = float(request.args.get(b"seconds", [b"30"])[0])
    print(f"blocking the reactor for {seconds}s")
    time.sleep(seconds)
    return "unblocked"


@cluster.cron(seconds=float(os.environ.get("TEST_CRON_SECONDS", "0.2")))
def tick():
    record("TEST_CRON", f"{cluster.worker.id} {os.getpid()} {time.time():.3f}")


@cluster.on_startup
async def started():
    print(f"hello from worker {cluster.worker.id}")
    record("TEST_EVENTS", f"startup {cluster.worker.id} {os.getpid()}")


@cluster.on_shutdown
async def stopped():
    await deferLater(reactor, 0.05, lambda: None)
    record("TEST_EVENTS", f"shutdown {cluster.worker.id} {os.getpid()}")
    if cluster.redis is not None:  # still connected: shutdown hooks can flush
        await cluster.redis.set(f"test:shutdown:{cluster.worker.id}", str(os.getpid()))
