"""Shared pieces of the integration tests: paths, environment, test files."""

import os
import shutil
import socket
import tempfile

from twisted.trial import unittest

from txcluster.testing import RunningCluster, clean_environment, start_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_APP = "tests.apps:cluster"

__all__ = ["ROOT", "TEST_APP", "ClusterTestCase", "clean_environment", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClusterTestCase(unittest.TestCase):
    """Starts clusters that are always killed, and gives them files to write."""

    #: added to every cluster's command line (subclasses run a mode)
    cluster_args: tuple = ()

    def directory(self) -> str:
        """A fresh temporary directory, removed after the test."""
        path = tempfile.mkdtemp(prefix="txcluster-test-")
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    def path(self, name: str) -> str:
        return os.path.join(self.directory(), name)

    def lines(self, path: str) -> list:
        try:
            with open(path) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def start(self, app: str = TEST_APP, env: dict = None, cwd: str = ROOT,
              args: tuple = (), **kwargs) -> RunningCluster:
        cluster = start_cluster(app, env=clean_environment(**(env or {})), cwd=cwd,
                                args=[*self.cluster_args, *args], **kwargs)
        self.addCleanup(cluster.kill)
        return cluster
