"""
The benchmark's one command still runs end to end (its figures are not
checked here: performance is measured in bench/, not asserted in tests),
and it leaves no process behind.  Needs wrk, like the benchmark: .ci/run
installs it and runs this file after the suite (python -m pytest bench).
"""

import os
import shutil
import subprocess
import sys
import uuid

from twisted.trial import unittest

from txcluster.testing import clean_environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def processes_with(marker: str) -> list:
    """Pids of live processes whose environment holds C{marker}."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


class BenchSmokeTests(unittest.TestCase):
    def setUp(self):
        if shutil.which("wrk") is None:
            self.fail("wrk is not installed (Debian: apt-get install wrk)")

    def test_quick_run_prints_every_table_and_cleans_up(self):
        marker = f"TXCLUSTER_BENCH_SMOKE_{uuid.uuid4().hex}"
        env = clean_environment(BENCH_MARKER=marker)
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick",
             "--workers", "2", "--balance", "round-robin,reuseport+affinity",
             "--respawn-samples", "1"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        for line in ("x-CPU/req", "cluster-2/round-robin / parallel-2", "reuseport-2 / parallel-2",
                     "cluster-2/reuseport+affinity / parallel-2",
                     "per-worker share max/min", "respawn (kill -9", "cluster-2/round-robin master"):
            self.assertIn(line, result.stdout)
        self.assertEqual(processes_with(marker), [])
