"""Shared pieces of the integration tests: paths, environment, test files."""

import filecmp
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile

from twisted.trial import unittest

from txcluster.testing import RunningCluster, clean_environment, start_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_APP = "tests.apps:cluster"

__all__ = ["ROOT", "TEST_APP", "ClusterTestCase", "clean_environment", "free_port"]


@functools.lru_cache(maxsize=None)
def stale_install() -> str:
    """Why the installed txcluster is not this checkout's (empty: it is).

    A cluster's master runs the venv's C{twistd}, which imports the
    I{installed} package (only workers, started in the checkout, import
    the checkout's): after an edit without C{pip install .}, a test would
    exercise the old master and pass or fail for nothing.
    """
    where = subprocess.run(
        [sys.executable, "-c", "import os, txcluster; print(os.path.dirname(txcluster.__file__))"],
        cwd=os.path.dirname(sys.executable), capture_output=True, text=True, timeout=30)
    installed = where.stdout.strip()
    if where.returncode or not installed:
        return "txcluster is not installed in this venv: pip install ."
    checkout = os.path.join(ROOT, "txcluster")
    for folder, _, files in os.walk(checkout):
        for name in (n for n in files if n.endswith(".py")):
            ours = os.path.join(folder, name)
            theirs = os.path.join(installed, os.path.relpath(ours, checkout))
            if not os.path.exists(theirs) or not filecmp.cmp(ours, theirs, shallow=False):
                return (f"the installed txcluster is older than this checkout "
                        f"({os.path.relpath(ours, ROOT)} differs): pip install .")
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClusterTestCase(unittest.TestCase):
    """Starts clusters that are always killed, and gives them files to write."""

    #: added to every cluster's command line (subclasses run a mode)
    cluster_args: tuple = ()

    def setUp(self) -> None:
        if stale_install():
            self.fail(stale_install())

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
