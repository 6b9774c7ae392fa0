"""
The demo app, served by default: ``GET /`` names the worker that answered,
``GET /health`` is a health check.
"""

import json
import os

from klein import Klein

from .app import Cluster

web = Klein()
cluster = Cluster(web)


def _json(request, body: dict) -> str:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body)


@web.route("/")
def index(request):
    worker = cluster.worker
    return _json(request, {"worker": worker.id, "pid": os.getpid(), "workers": worker.count})


@web.route("/health")
def health(request):
    return _json(request, {"status": "ok", "worker": cluster.worker.id})
