"""A plain IResource app that shows its TXCLUSTER_* environment."""

import os

from twisted.web.resource import Resource


class WorkerEnvironment(Resource):
    isLeaf = True

    def render_GET(self, request):
        return f"{os.environ['TXCLUSTER_WORKER_ID']}/{os.environ['TXCLUSTER_WORKERS']}".encode()


resource = WorkerEnvironment()
