"""
The installed plugin, started as a new user would: ``twistd -n txcluster``.
Each test runs real processes on an ephemeral port and kills them all.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections import Counter

from txcluster.cpus import kernel_steers_by_cpu, usable_cpus
from txcluster.options import choose_balance, usable_cpu_count
from txcluster.settings import Settings
from txcluster.testing import pid_alive, twistd_command, wait_until

from .integration import ROOT, ClusterTestCase, clean_environment, free_port


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


class ServingTests(ClusterTestCase):
    def test_n_distinct_workers_answer_on_one_port(self):
        cluster = self.start(workers=3)
        seen = {}
        deadline = time.monotonic() + 20
        while len(seen) < 3 and time.monotonic() < deadline:
            body = cluster.get_json("/")
            seen[body["worker"]] = body["pid"]
        self.assertEqual(sorted(seen), [1, 2, 3])
        self.assertEqual(len(set(seen.values())), 3)
        self.assertEqual(set(seen.values()), cluster.worker_pids())
        self.assertNotIn(cluster.pid, seen.values())
        self.assertEqual(cluster.get_json("/")["workers"], 3)

    def test_log_lines(self):
        cluster = self.start(workers=2)
        output = cluster.output
        self.assertRegex(output, r"listening on 127\.0\.0\.1:\d+ with 2 workers")
        for worker_id, pid in cluster.ready_workers().items():
            self.assertIn(f"worker {worker_id} (pid {pid}) ready", output)
        # What a worker prints reaches the master's log tagged with its id.
        cluster.wait_for_log(r"\[worker 2\] hello from worker 2")

    def test_sigterm_stops_everything_with_status_0(self):
        cluster = self.start(workers=2)
        workers = cluster.worker_pids()
        self.assertEqual(cluster.stop(), 0)
        self.assertIn("all workers stopped", cluster.output)
        self.assertFalse(any(pid_alive(pid) for pid in workers))

    def test_default_app_is_the_demo(self):
        cluster = self.start(app=None, workers=1)
        body = cluster.get_json("/")
        self.assertEqual(set(body), {"worker", "pid", "workers"})
        self.assertEqual(cluster.get_json("/health"), {"status": "ok", "worker": 1})

    def test_twist_runs_it_too(self):
        twist = os.path.join(os.path.dirname(twistd_command()[0]), "twist")
        self.assertTrue(os.path.exists(twist), f"no twist script next to twistd: {twist}")
        port = free_port()
        process = subprocess.Popen(
            [twist, "txcluster", "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--workers", "2"],
            cwd=ROOT, env=clean_environment(), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(kill_group, process)

        def answers():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                    return b"200" in s.recv(100)
            except OSError:
                return False

        wait_until(answers, 20, "twist txcluster to answer")
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(20), 0)


class PluginTests(ClusterTestCase):
    def test_scaling_updates_every_workers_count(self):
        cluster = self.start(app=None, workers=2)
        cluster.signal(signal.SIGTTIN)
        cluster.wait_for_log(r"worker 3 \(pid \d+\) ready")
        counts = {}
        deadline = time.monotonic() + 20
        while len(counts) < 3 and time.monotonic() < deadline:
            body = cluster.get_json("/")
            counts[body["worker"]] = body["workers"]
        self.assertEqual(counts, {1: 3, 2: 3, 3: 3})

    def test_twistd_and_twist_list_the_plugin(self):
        twist = os.path.join(os.path.dirname(twistd_command()[0]), "twist")
        for command in (twistd_command(), [twist]):
            result = subprocess.run([*command, "--help"], capture_output=True, text=True,
                                    timeout=60, cwd=ROOT, env=clean_environment())
            self.assertRegex(result.stdout, r"txcluster\s+Serve a Klein app")


class ConfigurationTests(ClusterTestCase):
    def test_web_concurrency(self):
        cluster = self.start(workers=None, env={"WEB_CONCURRENCY": "3"})
        self.assertIn("with 3 workers", cluster.output)

    def test_bad_web_concurrency_warns_and_uses_cpu_count(self):
        cpus = len(os.sched_getaffinity(0))
        cluster = self.start(workers=None, ready=cpus, env={"WEB_CONCURRENCY": "abc"})
        warnings = [line for line in cluster.output.splitlines() if "WEB_CONCURRENCY" in line]
        self.assertEqual(len(warnings), 1, cluster.output)
        self.assertIn("'abc'", warnings[0])
        self.assertIn(f"with {cpus} workers", cluster.output)

    def test_port_variable(self):
        port = free_port()
        cluster = self.start(listen=None, workers=1, env={"PORT": str(port)})
        self.assertIn(f":{port} with 1 workers", cluster.output)

    def test_config_and_env_files(self):
        port = free_port()
        config = self.path("tx.ini")
        with open(config, "w") as f:
            f.write(f"[txcluster]\nworkers = 2\nlisten = tcp:{port}:interface=127.0.0.1\n")
        env_file = self.path(".env")
        with open(env_file, "w") as f:
            f.write("WEB_CONCURRENCY=3\n")
        cluster = self.start(listen=None, workers=None, ready=3,
                             args=["--config", config, "--env-file", env_file])
        self.assertIn(f":{port} with 3 workers", cluster.output)  # env beats config

    def test_bad_command_line_value(self):
        for args, named in [(["--workers", "0"], "--workers '0'"),
                            (["--workers", "-3"], "--workers '-3'"),
                            (["--listen", "tcp:nope"], "--listen 'tcp:nope'")]:
            result = subprocess.run(
                [*twistd_command(), "-n", "--pidfile=", "txcluster", *args],
                cwd=ROOT, env=clean_environment(), capture_output=True, text=True, timeout=30)
            output = result.stdout + result.stderr
            self.assertNotEqual(result.returncode, 0)
            lines = [line for line in output.splitlines() if line.strip()]
            self.assertEqual(len(lines), 1, output)
            self.assertTrue(lines[0].startswith("txcluster: error: "), output)
            self.assertIn(named, lines[0])
            self.assertNotIn("Traceback", output)
            self.assertNotIn("worker 1", output)

    def test_address_in_use(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = subprocess.run(
                [*twistd_command(), "-n", "--pidfile=", "txcluster",
                 "--listen", f"tcp:{port}:interface=127.0.0.1", "--app", "tests.apps:cluster"],
                cwd=ROOT, env=clean_environment(), capture_output=True, text=True, timeout=30)
        self.assertNotEqual(result.returncode, 0)
        error_lines = [line for line in result.stderr.splitlines() if line.strip()]
        self.assertEqual(len(error_lines), 1, result.stderr)
        self.assertIn(f"tcp:{port}", error_lines[0])
        self.assertIn("in use", error_lines[0])
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        self.assertNotIn("started", result.stdout)


class SingleProcessTests(ClusterTestCase):
    def test_single(self):
        events = self.path("events")
        cron = self.path("cron")
        cluster = self.start(workers=0, env={"TEST_EVENTS": events, "TEST_CRON": cron})
        body = cluster.get_json("/")
        self.assertEqual((body["worker"], body["pid"], body["workers"]), (1, cluster.pid, 1))
        self.assertEqual(cluster.worker_pids(), set())
        wait_until(lambda: len(self.lines(cron)) >= 2, 10, "cron in the single process")
        self.assertTrue(all(line.split()[1] == str(cluster.pid) for line in self.lines(cron)))
        self.assertEqual(cluster.stop(), 0)
        self.assertEqual(self.lines(events), [f"startup 1 {cluster.pid}",
                                              f"shutdown 1 {cluster.pid}"])

    def test_worker_signals_are_ignored_not_fatal(self):
        cluster = self.start(workers=0)
        for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            cluster.signal(signum)
        cluster.wait_for_log("SIGTTOU .* ignored with --single")
        self.assertEqual(cluster.get("/nope")[0], 404)
        self.assertEqual(cluster.get("/")[0], 200)
        self.assertIsNone(cluster.process.poll())

    def test_clustering_enabled_false(self):
        cluster = self.start(workers=None, ready=1, env={"CLUSTERING_ENABLED": "false"})
        self.assertEqual(cluster.get_json("/")["pid"], cluster.pid)
        self.assertEqual(cluster.worker_pids(), set())


class AppIsolationTests(ClusterTestCase):
    def test_master_never_imports_the_app(self):
        imports = self.path("imports")
        cluster = self.start(workers=2, env={"TEST_IMPORTS": imports})
        importers = {int(pid) for pid in self.lines(imports)}
        self.assertEqual(importers, cluster.worker_pids())
        self.assertNotIn(cluster.pid, importers)
        with open(f"/proc/{cluster.pid}/maps") as f:
            maps = f.read()
        self.assertNotIn("klein", maps)  # not even the framework
        # nor TLS, which only workers terminate (12 MB of RSS)
        self.assertNotIn("cryptography", maps)
        self.assertNotIn("OpenSSL", maps)

    def test_cron_runs_in_worker_one_only(self):
        cron = self.path("cron")
        cluster = self.start(workers=3, env={"TEST_CRON": cron, "TEST_CRON_SECONDS": "0.1"})
        wait_until(lambda: len(self.lines(cron)) >= 8, 15, "8 cron runs")
        worker_one = cluster.ready_workers()[1]
        runs = [line.split() for line in self.lines(cron)]
        self.assertEqual({(worker_id, int(pid)) for worker_id, pid, _ in runs},
                         {("1", worker_one)})

    def test_environment_names_the_worker(self):
        cluster = self.start(app="tests.env_app:resource", workers=2)
        ids = set()
        deadline = time.monotonic() + 20
        while len(ids) < 2 and time.monotonic() < deadline:
            status, body = cluster.get("/")
            worker_id, count = body.decode().split("/")
            ids.add(worker_id)
            self.assertEqual(count, "2")
        self.assertEqual(ids, {"1", "2"})


class DaemonTests(ClusterTestCase):
    def test_daemon_with_pidfile_and_logfile(self):
        directory = self.directory()
        pidfile = os.path.join(directory, "tx.pid")
        logfile = os.path.join(directory, "tx.log")
        port = free_port()
        result = subprocess.run(
            [*twistd_command(), "--pidfile", pidfile, "--logfile", logfile, "txcluster",
             "--listen", f"tcp:{port}:interface=127.0.0.1", "--workers", "2",
             "--app", "tests.apps:cluster"],
            cwd=ROOT, env=clean_environment(), capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        master = int(wait_until(lambda: os.path.exists(pidfile) and open(pidfile).read().strip(),
                                10, "the pidfile"))
        self.addCleanup(lambda: pid_alive(master) and os.kill(master, signal.SIGKILL))

        def log():
            with open(logfile) as f:
                return f.read()

        wait_until(lambda: len(re.findall(r"worker \d \(pid \d+\) ready", log())) >= 2,
                   20, "2 workers ready in the log file")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            self.assertIn(b"200", s.recv(100))
        os.kill(master, signal.SIGTERM)
        wait_until(lambda: not pid_alive(master), 20, "the daemon to exit")
        self.assertFalse(os.path.exists(pidfile))
        self.assertIn("all workers stopped", log())


class AccessLogTests(ClusterTestCase):
    def test_dash_means_the_main_log(self):
        cluster = self.start(workers=1, args=["--access-log", "-"])
        cluster.get("/")
        cluster.wait_for_log(r'\[worker 1\] "127\.0\.0\.1" - - \[.*\] "GET / HTTP/1\.1" 200')

    def test_file_shared_by_workers(self):
        path = self.path("access.log")
        cluster = self.start(workers=2, args=["--access-log", path])
        for _ in range(20):
            cluster.get("/")
        wait_until(lambda: len(self.lines(path)) >= 20, 10, "20 access log lines")
        self.assertTrue(all('"GET / HTTP/1.1" 200' in line for line in self.lines(path)))

    def test_off_by_default(self):
        cluster = self.start(workers=1)
        cluster.get("/")
        cluster.get("/")
        self.assertNotIn('"GET /', cluster.output)


class KernelBalanceServingTests(ServingTests):
    """The same, with workers accepting on the shared socket."""

    cluster_args = ("--balance", "kernel")


class SystemdNotifyTests(ClusterTestCase):
    def test_ready_only_when_every_worker_is_ready(self):
        path = self.path("notify.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.settimeout(20)
        cluster = self.start(workers=3, ready=0, env={"NOTIFY_SOCKET": path})
        message = listener.recv(4096).decode()
        ready = cluster.ready_workers()  # read after READY=1 arrived
        self.assertTrue(message.startswith("READY=1\n"), message)
        self.assertIn("STATUS=3 workers ready", message)
        self.assertEqual(sorted(ready), [1, 2, 3])
        cluster.signal(signal.SIGTERM)
        self.assertEqual(listener.recv(4096), b"STOPPING=1")


class ReusePortServingTests(ServingTests):
    """The same, with a socket per worker."""

    cluster_args = ("--balance", "reuseport")


class RoundRobinServingTests(ServingTests):
    """The same, with the master dealing every connection."""

    cluster_args = ("--balance", "round-robin")


class DefaultBalanceTests(ClusterTestCase):
    """C{--balance auto}, the default: reuseport with each worker pinned to
    a CPU where the kernel steers by CPU, kept even by the workers' shared
    ledger; round-robin elsewhere."""

    def test_the_log_says_what_auto_chose(self):
        cluster = self.start(workers=2)
        chosen = choose_balance(Settings(balance="auto", workers=2), kernel_steers_by_cpu(),
                                usable_cpu_count())
        cluster.wait_for_log(re.escape(chosen.notes[0]))
        status = cluster.get_json("/")
        self.assertEqual(status["workers"], 2)

    def test_one_request_at_a_time_goes_round_robin(self):
        """A person or a script, one connection at a time from one CPU:
        every worker answers in turn, as round-robin would have them."""
        cluster = self.start(workers=3)
        answered = Counter(cluster.get_json("/")["worker"] for _ in range(12))
        self.assertEqual(sorted(answered), [1, 2, 3])
        self.assertGreaterEqual(min(answered.values()), 3, answered)

    def test_a_client_on_one_cpu_is_spread_over_every_worker(self):
        """Connections that all arrive on one CPU (a one-thread client,
        a network card with one queue) would all go to that CPU's worker
        if the kernel alone chose; the workers hand the excess on."""
        cpus = usable_cpus()
        os.sched_setaffinity(0, cpus[:1])
        self.addCleanup(os.sched_setaffinity, 0, cpus)
        cluster = self.start(workers=2)
        host, port = cluster.url.split("//")[1].rstrip("/").split(":")
        connections = [http.client.HTTPConnection(host, int(port), timeout=10)
                       for _ in range(20)]
        for connection in connections:
            connection.connect()
            self.addCleanup(connection.close)
        answered = Counter()
        for connection in connections:
            connection.request("GET", "/")
            answered[json.loads(connection.getresponse().read())["worker"]] += 1
        self.assertEqual(sorted(answered), [1, 2])
        self.assertGreaterEqual(min(answered.values()), 5, answered)
