"""
The several-hosts drill (contract, "Several hosts"; README, "Several
hosts"): a real HAProxy with health checks in front of three clusters that
share one redis-server, under load, while each host in turn is stopped
(C{SIGTERM} with C{--shutdown-delay}) and started again, then restarted
with C{SIGHUP}; the locked cron job runs once per tick across them, and
moves on within one lease period when its host is killed.

The partition drill joins each host to Redis through a relay of its own
(tests/relay.py), and cuts the leader's link while its run is going: the
connections stay open and nothing goes through, until the link heals.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Tuple

from twisted.trial import unittest

from txcluster.redis import lease_seconds
from txcluster.testing import Load, wait_until

from .integration import ClusterTestCase, free_port
from .redis_server import start_redis
from .relay import Relay
from .system import installed

INTERVAL = 1.0
DRILL_APP = "tests.drill_app:cluster"

#: The configuration README.rst shows: health checks every 200 ms, a host
#: out after one failed check and in after two good ones.  `retries` and
#: `option redispatch` send a refused connection to another host.
HAPROXY_CONFIG = """\
global
    maxconn 4000
    stats socket {stats} mode 600 level admin

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch

frontend web
    bind 127.0.0.1:{port}
    default_backend hosts

backend hosts
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
    default-server inter 200ms fall 1 rise 2
{servers}
"""


class HAProxy:
    """One haproxy process in front of C{servers} ({name: port}), on loopback."""

    def __init__(self, test: unittest.TestCase, servers: Dict[str, int]) -> None:
        directory = tempfile.mkdtemp(prefix="txcluster-haproxy-")
        test.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.port = free_port()
        self.stats = os.path.join(directory, "stats.sock")
        config = os.path.join(directory, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(HAPROXY_CONFIG.format(
                stats=self.stats, port=self.port,
                servers="\n".join(f"    server {name} 127.0.0.1:{port} check"
                                  for name, port in servers.items())))
        self.process = subprocess.Popen(
            [installed("haproxy", "haproxy"), "-db", "-f", config], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        test.addCleanup(self.kill)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(lambda: os.path.exists(self.stats) or self.process.poll() is not None,
                   10, "haproxy to start")
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited: {self.process.stdout.read().decode()}")

    def states(self) -> Dict[str, str]:
        """Each server's status as the health checks see it: UP, DOWN, ..."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.stats)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = [line.split(",") for line in data.decode().splitlines() if line]
        header = rows[0]
        name, status = header.index("svname"), header.index("status")
        return {row[name]: row[status].split(" ")[0] for row in rows[1:]
                if len(row) > status and row[name] not in ("FRONTEND", "BACKEND")}

    def wait(self, server: str, state: str, timeout: float = 20) -> None:
        wait_until(lambda: self.states().get(server) == state, timeout,
                   f"haproxy to see {server} {state}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()


def runs_in(path: str) -> List[Tuple[int, float, int]]:
    """(pid, time, token) of each cron run the drill app recorded."""
    try:
        with open(path) as f:
            return [(int(pid), float(at), int(token))
                    for pid, at, token in (line.split() for line in f if line.strip())]
    except FileNotFoundError:
        return []


class SeveralHostsDrill(ClusterTestCase):
    def start_host(self, port: int, env: dict):
        return self.start(DRILL_APP, workers=2, env=env, listen=f"tcp:{port}:interface=127.0.0.1",
                          args=["--redis", self.redis.url, "--shutdown-delay", "1"])

    def test_deploys_lose_no_request_and_cron_runs_once_per_tick(self):
        installed("haproxy", "haproxy")
        self.redis = start_redis(self)
        cron = self.path("runs")
        env = {"DRILL_RUNS": cron, "DRILL_CRON_SECONDS": str(INTERVAL)}
        ports = {f"host{i}": free_port() for i in (1, 2, 3)}
        hosts = {name: self.start_host(port, env) for name, port in ports.items()}
        haproxy = HAProxy(self, ports)
        for name in hosts:
            haproxy.wait(name, "UP")

        with Load(haproxy.url, close_clients=2, keepalive_clients=2, max_seconds=300) as load:
            wait_until(lambda: load.sent > 50, 20, "load through haproxy")
            for name, port in ports.items():  # a deploy: stop, start again
                hosts[name].signal(signal.SIGTERM)
                self.assertEqual(hosts[name].wait_exit(30), 0, hosts[name].output)
                hosts[name] = self.start_host(port, env)
                haproxy.wait(name, "UP")
            for name in ports:  # a rolling restart
                hosts[name].signal(signal.SIGHUP)
                hosts[name].wait_for_log("rolling restart done", 30)
            sent_during_deploys = load.sent
        self.assertGreater(sent_during_deploys, 200)
        self.assertEqual((load.failed, load.retried, load.errors[:3]), (0, 0, []))

        quiet_from = {name: len(host.output.splitlines()) for name, host in hosts.items()}
        # Three cron ticks, and some fifteen health checks (every 200 ms),
        # log nothing.
        ticks = len(runs_in(cron))
        wait_until(lambda: len(runs_in(cron)) >= ticks + 3, 10 * INTERVAL, "three cron ticks")
        for name, host in hosts.items():
            self.assertEqual(host.output.splitlines()[quiet_from[name]:], [], name)

        runs = runs_in(cron)
        elapsed = runs[-1][1] - runs[0][1]
        gaps = [b[1] - a[1] for a, b in zip(runs, runs[1:])]
        self.assertGreater(min(gaps), INTERVAL / 2, gaps)  # never twice in one tick
        self.assertLess(max(gaps), 2 * INTERVAL, gaps)  # no tick missed
        self.assertLessEqual(len(runs), elapsed / INTERVAL + 1.5)
        tokens = [token for _, _, token in runs]
        self.assertEqual(tokens, sorted(tokens))

        leader_pid = runs[-1][0]
        [leader] = [name for name, host in hosts.items() if leader_pid in host.worker_pids()]
        os.killpg(hosts[leader].pid, signal.SIGKILL)
        killed_at = time.time()
        wait_until(lambda: runs_in(cron)[-1][0] != leader_pid, 10, "another host to run it")
        takeover = runs_in(cron)[-1][1] - killed_at
        self.assertLess(takeover, lease_seconds(INTERVAL) + 0.5)
        self.assertGreater(runs_in(cron)[-1][2], max(tokens))
        print(f"\ndrill: {sent_during_deploys} requests, 0 failed, over 3 deploys and "
              f"3 rolling restarts; {len(runs)} cron runs in {elapsed:.1f}s "
              f"(gaps {min(gaps):.2f}-{max(gaps):.2f}s); takeover {takeover:.2f}s "
              f"after kill -9")


def writes_in(path: str) -> List[Tuple[int, float, int, bool]]:
    """(pid, time, token, applied) of each fenced write the drill app made."""
    try:
        with open(path) as f:
            return [(int(pid), float(at), int(token), applied == "1")
                    for pid, at, token, applied in (line.split() for line in f if line.strip())]
    except FileNotFoundError:
        return []


class PartitionDrill(ClusterTestCase):
    """Three hosts, each joined to one Redis through a relay of its own
    (tests/relay.py); the leader's link is cut mid-run, then healed."""

    def test_a_leader_cut_off_from_redis_cannot_overwrite_the_next_ones_work(self):
        redis = start_redis(self)
        links = {n: Relay(self, ("127.0.0.1", redis.port)) for n in (1, 2, 3)}
        runs, writes = self.path("runs"), self.path("writes")
        env = {"DRILL_RUNS": runs, "DRILL_WRITES": writes,
               "DRILL_CRON_SECONDS": str(INTERVAL), "DRILL_WORK_SECONDS": "2.5"}
        clusters = {n: self.start(DRILL_APP, workers=1, env=env,
                                  args=["--redis", f"redis://127.0.0.1:{link.port}"])
                    for n, link in links.items()}
        wait_until(lambda: len(writes_in(writes)) >= 2, 30, "two fenced writes")
        self.assertTrue(all(applied for *_, applied in writes_in(writes)))

        # The leader starts a run (2.5 s of work, then a fenced write) and
        # loses Redis at once.
        count = len(runs_in(runs))
        wait_until(lambda: len(runs_in(runs)) > count, 10, "the next run")
        leader_pid, _, stale_token = runs_in(runs)[-1]
        [leader] = [n for n, c in clusters.items() if leader_pid in c.worker_pids()]
        links[leader].cut()
        cut_at = time.time()
        wait_until(lambda: any(pid != leader_pid and applied
                               for pid, _, _, applied in writes_in(writes)),
                   20, "another host to take over and write")
        links[leader].heal()

        def late_writes() -> List[Tuple[int, float, int, bool]]:
            return [w for w in writes_in(writes) if w[0] == leader_pid and w[1] > cut_at]

        wait_until(late_writes, 60, "the cut-off leader's late write")
        [(_, _, token, applied_late)] = late_writes()
        self.assertEqual(token, stale_token)
        self.assertFalse(applied_late, "the stale write was applied")
        applied = [token for _, _, token, ok in writes_in(writes) if ok]
        self.assertEqual(applied, sorted(applied))  # never out of order
        self.assertGreater(max(applied), stale_token)
        self.assertEqual(redis.command("GET", "drill:report").decode(),
                         f"report of run {max(applied)}")
        clusters[leader].wait_for_log(r"could not renew its Redis lease", 20)
        taken_over = min(at for pid, at, _ in runs_in(runs) if pid != leader_pid and at > cut_at)
        print(f"\npartition: another host ran the job {taken_over - cut_at:.2f}s after the "
              f"leader lost Redis; its late write (token {stale_token}) refused, "
              f"{len(applied)} writes applied in token order")
