"""
Lifecycle against real processes: respawn, crash loops, graceful shutdown,
orphans, hung workers, rolling restarts under load, scaling.
"""

import http.client
import os
import signal
import socket
import textwrap
import threading
import time
from urllib.parse import urlsplit

from txcluster.cpus import cpu_for
from txcluster.testing import Load, pid_alive, wait_until

from .integration import ClusterTestCase


def reload_under(load, cluster, requests):
    """SIGHUP once C{load} has sent C{requests}; return once the new workers
    have served C{requests} more."""
    wait_until(lambda: load.sent >= requests, 20, "load on the old workers")
    cluster.signal(signal.SIGHUP)
    cluster.wait_for_log("rolling restart done", timeout=60)
    after_restart = load.sent
    wait_until(lambda: load.sent >= after_restart + requests, 20, "load on the new workers")


class RespawnAssertions:
    def assertRespawned(self, cluster, worker_id, old_pid, how):
        cluster.wait_for_log(rf"worker {worker_id} \(pid {old_pid}\) {how}")
        new_pid = int(cluster.wait_for_log(
            rf"worker {worker_id} \(pid (\d+)\) ready", count=2).group(1))
        self.assertNotEqual(new_pid, old_pid)
        self.assertIn(new_pid, cluster.worker_pids())
        self.assertFalse(pid_alive(old_pid))
        return new_pid


class RespawnTests(RespawnAssertions, ClusterTestCase):
    def test_kill_9_respawns_same_id(self):
        cluster = self.start(workers=2)
        old = cluster.ready_workers()[2]
        os.kill(old, signal.SIGKILL)
        self.assertRespawned(cluster, 2, old, r"exited on signal 9 \(SIGKILL\)")
        self.assertEqual(len(cluster.worker_pids()), 2)

    def test_sigterm_to_one_worker_respawns_it(self):
        cluster = self.start(workers=2)
        old = cluster.ready_workers()[1]
        os.kill(old, signal.SIGTERM)
        self.assertRespawned(cluster, 1, old, "exited with status 0")

    def test_crash_loop_exits_1_with_the_error(self):
        cluster = self.start(app="tests.broken_app:cluster", workers=2, ready=0)
        self.assertEqual(cluster.wait_exit(30), 1)
        output = cluster.output
        self.assertIn("crash loop", output)
        self.assertIn("this app is broken on purpose", output)
        self.assertEqual(cluster.worker_pids(), set())

class GracefulShutdownTests(ClusterTestCase):
    def slow_request(self, cluster, seconds):
        """Start GET /slow in a thread; return a dict filled in when it ends."""
        result = {}
        parts = urlsplit(cluster.url)

        def request():
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            try:
                connection.request("GET", f"/slow?seconds={seconds}")
                response = connection.getresponse()
                result.update(status=response.status, body=response.read(),
                              connection=response.getheader("connection"))
            except Exception as e:
                result.update(error=e)
            finally:
                connection.close()

        thread = threading.Thread(target=request, daemon=True)
        thread.start()
        result["thread"] = thread
        return result

    def test_in_flight_request_finishes_then_hooks_run(self):
        events = self.path("events")
        cluster = self.start(workers=1, env={"TEST_EVENTS": events})
        result = self.slow_request(cluster, 1.5)
        cluster.wait_for_log("slow request for 1.5s in flight")
        started = time.monotonic()
        cluster.signal(signal.SIGTERM)
        self.assertEqual(cluster.wait_exit(20), 0)
        result["thread"].join(10)
        self.assertEqual(result.get("status"), 200, result)
        self.assertIn(b"slept 1.5", result["body"])
        self.assertEqual(result["connection"], "close")
        self.assertGreater(time.monotonic() - started, 1.0)
        self.assertEqual([line.split()[0] for line in self.lines(events)],
                         ["startup", "shutdown"])

    def test_timeout_kills_what_is_left(self):
        cluster = self.start(workers=1, args=["--shutdown-timeout", "1"])
        result = self.slow_request(cluster, 60)
        cluster.wait_for_log("slow request for 60.0s in flight")
        started = time.monotonic()
        cluster.signal(signal.SIGTERM)
        self.assertEqual(cluster.wait_exit(20), 0)
        self.assertLess(time.monotonic() - started, 6)
        result["thread"].join(10)
        self.assertNotEqual(result.get("status"), 200)

    def test_second_sigint_stops_at_once(self):
        cluster = self.start(workers=2, args=["--shutdown-timeout", "60"])
        self.slow_request(cluster, 60)
        cluster.wait_for_log("slow request for 60.0s in flight")
        cluster.signal(signal.SIGINT)
        cluster.wait_for_log("graceful shutdown")
        started = time.monotonic()
        cluster.signal(signal.SIGINT)
        cluster.wait_exit(10)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(cluster.worker_pids(), set())

    def test_no_respawn_during_shutdown(self):
        cluster = self.start(workers=2)
        cluster.signal(signal.SIGTERM)
        cluster.wait_exit(20)
        self.assertNotIn("respawning", cluster.output)

class OrphanTests(ClusterTestCase):
    def test_workers_exit_within_2s_of_master_kill_9(self):
        cluster = self.start(workers=3)
        workers = cluster.worker_pids()
        self.assertEqual(len(workers), 3)
        os.kill(cluster.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: not any(pid_alive(p) for p in workers), 5, "workers to exit")
        self.assertLess(time.monotonic() - killed, 2.0)

class HungWorkerTests(ClusterTestCase):
    def test_silent_worker_is_killed_and_replaced(self):
        cluster = self.start(workers=2, args=["--timeout", "1"])
        hung = cluster.ready_workers()[2]
        os.kill(hung, signal.SIGSTOP)
        cluster.wait_for_log(rf"worker 2 \(pid {hung}\) silent for [\d.]+s")
        cluster.wait_for_log(r"worker 2 \(pid \d+\) ready", count=2)
        self.assertNotIn(hung, cluster.worker_pids())

VERSIONED_APP = """
from klein import Klein
from txcluster import Cluster

VERSION = {version!r}
{extra}
web = Klein()
cluster = Cluster(web)

@web.route("/")
def index(request):
    return f"{{VERSION}} {{cluster.worker.id}}"
"""

class RollingRestartTests(ClusterTestCase):
    def write_app(self, directory, version, extra=""):
        with open(os.path.join(directory, "versioned_app.py"), "w") as f:
            f.write(VERSIONED_APP.format(version=version, extra=textwrap.dedent(extra)))
        # a new .pyc must not be mistaken for the old one
        for name in os.listdir(os.path.join(directory, "__pycache__")) if os.path.isdir(
                os.path.join(directory, "__pycache__")) else []:
            os.remove(os.path.join(directory, "__pycache__", name))

    def start_versioned(self, workers=2):
        directory = self.directory()
        self.write_app(directory, "v1")
        return self.start("versioned_app:cluster", workers=workers, cwd=directory), directory

    def test_sighup_under_load_fails_no_request_and_loads_new_code(self):
        cluster, directory = self.start_versioned(workers=4)
        before = cluster.ready_workers()
        self.write_app(directory, "v2")
        with Load(cluster.url, close_clients=2, keepalive_clients=2) as load:
            reload_under(load, cluster, 50)
        self.assertGreater(load.sent, 100)
        self.assertEqual(load.failed, 0, load.errors[:5])
        after = cluster.ready_workers()
        self.assertEqual(sorted(after), [1, 2, 3, 4])
        self.assertFalse(set(before.values()) & set(after.values()))
        bodies = {cluster.get("/")[1] for _ in range(20)}
        self.assertTrue(all(body.startswith(b"v2 ") for body in bodies), bodies)

    def test_new_code_that_fails_keeps_the_old_workers(self):
        cluster, directory = self.start_versioned(workers=2)
        before = cluster.ready_workers()
        self.write_app(directory, "v2", extra="raise RuntimeError('v2 is broken')")
        cluster.signal(signal.SIGHUP)
        cluster.wait_for_log("rolling restart stopped")
        self.assertIn("v2 is broken", cluster.output)
        self.assertEqual(cluster.worker_pids(), set(before.values()))
        self.assertEqual(cluster.get("/")[1][:3], b"v1 ")
        self.assertIsNone(cluster.process.poll())

    def test_cron_moves_to_the_new_worker_1_without_overlap(self):
        cron = self.path("cron")
        cluster = self.start(workers=2, env={"TEST_CRON": cron, "TEST_CRON_SECONDS": "0.1"})
        wait_until(lambda: len(self.lines(cron)) >= 3, 10, "cron runs")
        old = cluster.ready_workers()[1]
        cluster.signal(signal.SIGHUP)
        cluster.wait_for_log("rolling restart done", timeout=60)
        new = cluster.ready_workers()[1]
        count = len(self.lines(cron))
        wait_until(lambda: len(self.lines(cron)) >= count + 3, 10, "cron after reload")
        pids = [int(line.split()[1]) for line in self.lines(cron)]
        handover = pids.index(new)
        self.assertEqual(set(pids[:handover]), {old})
        self.assertEqual(set(pids[handover:]), {new})
        times = [float(line.split()[2]) for line in self.lines(cron)]
        self.assertGreater(times[handover], times[handover - 1])

class ShutdownDelayTests(ClusterTestCase):
    def test_health_answers_503_while_the_app_serves_then_connections_are_refused(self):
        cluster = self.start(workers=2, args=["--shutdown-delay", "1.5"])
        self.assertEqual(cluster.get("/health")[0], 200)
        cluster.signal(signal.SIGTERM)
        cluster.wait_for_log("health checks answer 503")
        status, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(
            cluster.get("/health")), 5, "503")
        self.assertIn(b'"status": "draining"', body)
        self.assertEqual(cluster.get("/")[0], 200)  # still served
        self.assertEqual(cluster.wait_exit(20), 0)

    def test_a_draining_cluster_refuses_new_connections_at_once(self):
        cluster = self.start(workers=2, args=["--shutdown-timeout", "10"])
        parts = urlsplit(cluster.url)
        result = GracefulShutdownTests.slow_request(self, cluster, 3)
        cluster.wait_for_log("slow request for 3.0s in flight")
        cluster.signal(signal.SIGTERM)
        cluster.wait_for_log("shutting down 2 workers")

        def refused():
            try:
                socket.create_connection((parts.hostname, parts.port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            return False

        wait_until(refused, 2, "new connections refused while the drain goes on")
        result["thread"].join(10)
        self.assertEqual(result.get("status"), 200, result)
        self.assertEqual(cluster.wait_exit(20), 0)


class KeepAliveHandBackTests(ClusterTestCase):
    """A stopping worker hands its idle kept-alive connections back to the
    master, which passes them to another worker, so a client never has a
    kept-alive connection closed under it.  (Not in the default mode here:
    with workers pinned, a kept-alive client whose thread moved to another
    CPU may be sent there before the restart, and then nothing is left to
    hand back; ReusePortHandBackTests runs the same code without pinning.)"""

    cluster_args = ("--balance", "round-robin")

    def test_sighup_closes_no_kept_alive_connection(self):
        cluster = self.start(app=None, workers=2)
        with Load(cluster.url, close_clients=0, keepalive_clients=6) as load:
            reload_under(load, cluster, 100)
        self.assertEqual((load.failed, load.retried), (0, 0), load.errors[:3])
        self.assertRegex(cluster.output, r"drained: [1-9]\d* of \d+ connections handed back")


class ReusePortHandBackTests(KeepAliveHandBackTests):
    cluster_args = ("--balance", "reuseport")


class ScalingTests(ClusterTestCase):
    def test_ttin_adds_and_ttou_removes(self):
        cluster = self.start(workers=2)
        cluster.signal(signal.SIGTTIN)
        pid3 = int(cluster.wait_for_log(r"worker 3 \(pid (\d+)\) ready").group(1))
        self.assertEqual(len(cluster.worker_pids()), 3)
        cluster.signal(signal.SIGTTOU)
        cluster.wait_for_log(rf"worker 3 \(pid {pid3}\) exited with status 0")
        wait_until(lambda: len(cluster.worker_pids()) == 2, 5, "2 workers")
        self.assertNotIn("respawning worker 3", cluster.output)

    def test_ttou_under_load_fails_no_request(self):
        cluster = self.start(app=None, workers=3)
        with Load(cluster.url, close_clients=2, keepalive_clients=2) as load:
            wait_until(lambda: load.sent >= 100, 20, "load on 3 workers")
            cluster.signal(signal.SIGTTOU)
            cluster.wait_for_log(r"worker 3 \(pid \d+\) exited with status 0")
            removed_at = load.sent
            wait_until(lambda: load.sent >= removed_at + 300, 20, "load on 2 workers")
        self.assertEqual((load.failed, load.retried), (0, 0), load.errors[:3])


KERNEL = ("--balance", "kernel")


class KernelBalanceGracefulShutdownTests(GracefulShutdownTests):
    """The same, with workers accepting on the shared socket."""

    cluster_args = KERNEL


class KernelBalanceRollingRestartTests(RollingRestartTests):
    cluster_args = KERNEL


class KernelBalanceOrphanTests(OrphanTests):
    cluster_args = KERNEL


class KernelBalanceKeepAliveHandBackTests(KeepAliveHandBackTests):
    cluster_args = KERNEL


REUSEPORT = ("--balance", "reuseport")


def settled_for(value, seconds: float, timeout: float, what: str) -> None:
    """Wait until C{value()} has not changed for C{seconds}."""
    state = {"last": value(), "since": time.monotonic()}

    def settled() -> bool:
        now = value()
        if now != state["last"]:
            state.update(last=now, since=time.monotonic())
        return time.monotonic() - state["since"] >= seconds

    wait_until(settled, timeout, what)


def queued_connections(port: int) -> int:
    """Connections waiting in the accept queues of the sockets listening on
    C{port}: the kernel's count (a listening socket's rx_queue in
    /proc/net/tcp)."""
    queued = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, _, state, queues = line.split()[1:5]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # LISTEN
                    queued += int(queues.split(":")[1], 16)
    return queued


class ReusePortGracefulShutdownTests(GracefulShutdownTests):
    cluster_args = REUSEPORT


class ReusePortRollingRestartTests(RollingRestartTests):
    cluster_args = REUSEPORT


class ReusePortKeepAliveHandBackTests(KeepAliveHandBackTests):
    cluster_args = REUSEPORT


class ReusePortScalingTests(ScalingTests):
    cluster_args = REUSEPORT

    def test_a_removed_workers_socket_is_served_by_the_master_until_an_added_one_takes_it(self):
        cluster = self.start(app=None, workers=3)
        cluster.signal(signal.SIGTTOU)
        cluster.wait_for_log(r"worker 3 \(pid \d+\) exited with status 0")
        # Its socket stays in the group (closing it would reset what is
        # queued on it) and takes a third of these: the master accepts them.
        answers = [cluster.get_json("/")["worker"] for _ in range(30)]
        self.assertEqual(set(answers), {1, 2})
        cluster.signal(signal.SIGTTIN)
        cluster.wait_for_log(r"worker 3 \(pid \d+\) ready", count=2)
        wait_until(lambda: cluster.get_json("/")["worker"] == 3, 10, "worker 3 to answer")


class ReusePortRespawnTests(RespawnAssertions, ClusterTestCase):
    """Each worker has a socket of its own, which the master holds: the
    connections queued on it when its worker dies are accepted by the
    master and served by the other workers (or by the replacement)."""

    cluster_args = REUSEPORT

    def test_connections_queued_for_a_killed_worker_are_served(self):
        cluster = self.start(app=None, workers=2)
        stuck = cluster.ready_workers()[2]
        os.kill(stuck, signal.SIGSTOP)  # its connections queue on its socket
        self.addCleanup(lambda: pid_alive(stuck) and os.kill(stuck, signal.SIGKILL))
        answers = []

        def get():
            try:
                answers.append(cluster.get_json("/"))
            except Exception as e:
                answers.append(e)

        clients = [threading.Thread(target=get) for _ in range(16)]
        for client in clients:
            client.start()
        port = urlsplit(cluster.url).port
        # Each client is answered by worker 1, or waits for worker 2: queued
        # on its socket, or sent to it by the master (handed on by worker 1,
        # which sees worker 2 take nothing only after a few).
        wait_until(lambda: len(answers) + queued_connections(port) > 0, 10, "the clients")
        settled_for(lambda: len(answers), 1.0, 10, "worker 1 to answer what it will")
        waiting = 16 - len(answers)
        self.assertGreater(waiting, 0, answers)  # 2**-16 odds that none hashed to 2
        os.kill(stuck, signal.SIGKILL)
        new = self.assertRespawned(cluster, 2, stuck, r"exited on signal 9 \(SIGKILL\)")
        for client in clients:
            client.join(20)
        self.assertEqual(len(answers), 16)
        failures = [a for a in answers if isinstance(a, Exception)]
        self.assertEqual(failures, [])
        self.assertNotIn(stuck, {a["pid"] for a in answers})
        self.assertLessEqual({a["pid"] for a in answers}, {cluster.ready_workers()[1], new})


def allowed_cpus(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f
                    if line.startswith("Cpus_allowed_list:"))


class CpuAffinityTests(RespawnAssertions, ClusterTestCase):
    """--cpu-affinity pins worker N to usable CPU N-1 (mod CPUs), respawned
    workers included; the master itself stays unpinned."""

    def test_workers_are_pinned_and_respawns_keep_their_cpu(self):
        cpus = sorted(os.sched_getaffinity(0))  # the cluster inherits ours
        cluster = self.start(workers=3, args=("--cpu-affinity",))
        workers = cluster.ready_workers()
        for worker_id, pid in workers.items():
            self.assertEqual(allowed_cpus(pid), str(cpu_for(worker_id, cpus)), worker_id)
        self.assertEqual(allowed_cpus(cluster.pid), allowed_cpus(os.getpid()))
        os.kill(workers[2], signal.SIGKILL)
        new = self.assertRespawned(cluster, 2, workers[2], r"exited on signal 9")
        self.assertEqual(allowed_cpus(new), str(cpu_for(2, cpus)))
        self.assertEqual(cluster.get("/")[0], 200)
