"""
The operations layer, on real clusters: signals (logrotate's SIGUSR1, fast
SIGQUIT, harmless ones, SIGTERM at any moment or to the whole group),
systemd notifications, recycling under load, metrics, the control socket
and the txcluster command, hung workers' stacks, and one traceback for a
broken app.
"""

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request

from txcluster.testing import Load, pid_alive, twistd_command, wait_until

from .integration import ROOT, ClusterTestCase, clean_environment, free_port


def ignored_signals(pid):
    """The signals process C{pid} ignores (SIG_IGN), from /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
    except (OSError, StopIteration):
        return set()
    return {n for n in range(1, 65) if mask & (1 << (n - 1))}


def environ_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)


class SignalTests(ClusterTestCase):
    def test_harmless_signals_change_nothing(self):
        cluster = self.start(workers=2)
        pids = cluster.worker_pids()
        for signum in (signal.SIGUSR2, signal.SIGWINCH, signal.SIGPIPE, signal.SIGALRM,
                       signal.SIGRTMIN + 1):
            cluster.signal(signum)
        cluster.wait_for_log(r"ignored SIGRTMIN\+1")
        self.assertEqual(cluster.get_json("/")["workers"], 2)
        self.assertIsNone(cluster.process.poll())
        self.assertEqual(cluster.worker_pids(), pids)
        for name in ("SIGUSR2", "SIGALRM"):
            self.assertEqual(cluster.output.count(f"ignored {name}"), 1, name)
        self.assertNotIn("ignored SIGPIPE", cluster.output)  # routine: EPIPE says it all

    def test_sigusr1_and_sigusr2_to_the_whole_group_spare_starting_workers(self):
        """logrotate with killall, or an operator, while workers start: a
        starting worker ignores SIGUSR1 and dumps its stack on SIGUSR2
        from its first lines, before its slow imports."""
        cluster = self.start(workers=2, ready=0)
        starting = [int(cluster.wait_for_log(r"worker \d \(pid (\d+)\) started", count=n)[1])
                    for n in (1, 2)]
        # Past its first lines (SIGUSR1 ignored), its reactor not running
        # yet (no handler of its own): the moment the default would kill.
        wait_until(lambda: all(signal.SIGUSR1 in ignored_signals(pid) for pid in starting),
                   10, "workers ignoring SIGUSR1 while they start", interval=0.001)
        os.killpg(cluster.pid, signal.SIGUSR1)
        os.killpg(cluster.pid, signal.SIGUSR2)
        cluster.wait_ready(2)
        self.assertEqual(set(cluster.ready_workers().values()), set(starting))
        self.assertEqual(cluster.worker_pids(), set(starting))
        self.assertNotIn("exited", cluster.output)
        self.assertIn("ignored SIGUSR2", cluster.output)

    def test_sigquit_stops_at_once_with_status_0(self):
        cluster = self.start(workers=2, args=["--shutdown-timeout", "60"])
        thread = threading.Thread(target=lambda: self._get(cluster, "/slow?seconds=60"),
                                  daemon=True)
        thread.start()
        cluster.wait_for_log("slow request for 60.0s in flight")
        started = time.monotonic()
        cluster.signal(signal.SIGQUIT)
        self.assertEqual(cluster.wait_exit(20), 0)
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(cluster.worker_pids(), set())

    @staticmethod
    def _get(cluster, path):
        try:
            cluster.get(path, timeout=70)
        except Exception:
            pass

    def test_sigterm_while_workers_start_is_graceful(self):
        cluster = self.start(workers=12, ready=0)
        cluster.wait_for_log(r"worker \d+ \(pid \d+\) started")
        cluster.signal(signal.SIGTERM)
        self.assertEqual(cluster.wait_exit(60), 0)
        wait_until(lambda: not cluster.worker_pids(), 5, "no worker left")

    def test_sigterm_to_the_whole_group_is_quiet(self):
        cluster = self.start(workers=2)
        os.killpg(cluster.pid, signal.SIGTERM)  # what timeout(1), systemd and shells do
        self.assertEqual(cluster.wait_exit(20), 0)
        for noise in ("ReactorNotRunning", "CRITICAL", "Traceback"):
            self.assertNotIn(noise, cluster.output)

    def test_many_more_workers_than_cpus_warn(self):
        cluster = self.start(workers=None, env={"WEB_CONCURRENCY": str(4 * os.cpu_count() + 1)},
                             ready=1)
        cluster.wait_for_log("usable CPUs: each worker is a whole process")


class LogReopenTests(ClusterTestCase):
    def test_sigusr1_reopens_the_log_and_the_access_log_after_logrotate(self):
        directory = self.directory()
        pidfile, logfile = (os.path.join(directory, name) for name in ("tx.pid", "tx.log"))
        access = os.path.join(directory, "access.log")
        port = free_port()
        result = subprocess.run(
            [*twistd_command(), "--pidfile", pidfile, "--logfile", logfile, "txcluster",
             "--listen", f"tcp:{port}:interface=127.0.0.1", "--workers", "2",
             "--app", "tests.apps:cluster", "--access-log", access],
            cwd=ROOT, env=clean_environment(), capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        master = int(wait_until(lambda: os.path.exists(pidfile) and open(pidfile).read().strip(),
                                10, "the pidfile"))
        self.addCleanup(lambda: pid_alive(master) and os.kill(master, signal.SIGKILL))
        wait_until(lambda: len(re.findall(r"worker \d \(pid \d+\) ready", self.read(logfile)))
                   >= 2, 20, "2 workers ready")

        def get():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                return json.loads(response.read())["pid"]

        workers = {get() for _ in range(4)}
        os.rename(logfile, logfile + ".1")  # what logrotate does, then:
        os.rename(access, access + ".1")
        os.kill(master, signal.SIGUSR1)
        wait_until(lambda: "reopened the log files" in self.read(logfile), 10, "a new log")
        wait_until(lambda: self.send_until_logged(get, access), 10, "a new access log")
        self.assertTrue(pid_alive(master))
        self.assertLessEqual({get() for _ in range(4)}, workers | {get()})
        self.assertTrue(all(pid_alive(pid) for pid in workers))
        os.kill(master, signal.SIGTERM)
        wait_until(lambda: not pid_alive(master), 20, "the daemon to exit")

    @staticmethod
    def read(path):
        try:
            with open(path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def send_until_logged(self, get, access):
        get()
        return '"GET / HTTP/1.1" 200' in self.read(access)


class BrokenAppTests(ClusterTestCase):
    def test_the_traceback_is_logged_once_with_one_closing_line(self):
        cluster = self.start(app="tests.broken_app:cluster", workers=3, ready=0)
        self.assertEqual(cluster.wait_exit(30), 1)
        output = cluster.output
        self.assertEqual(output.count("Traceback (most recent call last)"), 1, output)
        raised = [line for line in output.splitlines()
                  if "] RuntimeError: this app is broken on purpose" in line]
        self.assertEqual(len(raised), 1, output)
        closing = [line for line in output.splitlines() if "giving up" in line]
        self.assertEqual(len(closing), 1)
        self.assertIn("cannot load app tests.broken_app:cluster: RuntimeError: this app is "
                      "broken on purpose", closing[0])


class SystemdTests(ClusterTestCase):
    def notify_socket(self):
        path = self.path("notify")
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(path)
        receiver.settimeout(20)
        self.addCleanup(receiver.close)
        return path, receiver

    def test_ready_reload_and_watchdog(self):
        path, receiver = self.notify_socket()
        cluster = self.start(workers=2, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        states = []

        def heard(prefix):
            while True:
                message = receiver.recv(4096).decode()
                states.append(message)
                if message.startswith(prefix):
                    return message

        heard("READY=1")
        self.assertIn("WATCHDOG=1", states + [heard("WATCHDOG=1")])
        cluster.signal(signal.SIGHUP)
        reloading = heard("RELOADING=1")
        self.assertRegex(reloading, r"^RELOADING=1\nMONOTONIC_USEC=\d+$")
        heard("READY=1")
        self.assertIn("rolling restart done", cluster.output)
        for pid in cluster.worker_pids():
            self.assertNotIn(b"NOTIFY_SOCKET", environ_of(pid))
            self.assertNotIn(b"WATCHDOG_USEC", environ_of(pid))

    def test_an_unreachable_notify_socket_is_one_warning(self):
        cluster = self.start(workers=2, env={"NOTIFY_SOCKET": "/nonexistent/notify"})
        cluster.signal(signal.SIGHUP)
        cluster.wait_for_log("rolling restart done", timeout=60)
        self.assertEqual(cluster.output.count("cannot notify systemd"), 1)
        self.assertEqual(cluster.get_json("/")["workers"], 2)
        self.assertNotIn("Traceback", cluster.output)


class RecyclingTests(ClusterTestCase):
    def test_max_requests_under_load_fails_nothing(self):
        """The load runs until each worker has been recycled, one of them
        twice (none is recycled in its first 5 s), and their successors
        serve: no request fails, and none needs a retry, since a recycled
        worker hands its idle kept-alive connections back to the master."""
        cluster = self.start(app=None, workers=2,
                             args=["--max-requests", "50", "--max-requests-jitter", "10"])
        first = cluster.worker_pids()

        def each_recycled_one_twice_and_replaced():
            output = cluster.output
            recycled = [len(re.findall(rf"worker {worker_id} \(pid \d+\) recycled: \d+ "
                                       rf"requests", output)) for worker_id in (1, 2)]
            ready = len(re.findall(r"worker \d \(pid \d+\) ready", output))
            return min(recycled) >= 1 and sum(recycled) >= 3 and ready >= 2 + sum(recycled)

        with Load(cluster.url, close_clients=2, keepalive_clients=2, max_seconds=40) as load:
            wait_until(each_recycled_one_twice_and_replaced, 30,
                       "each worker recycled, one twice", cluster._tail)
            sent = load.sent
            wait_until(lambda: load.sent > sent + 100, 10, "requests to the successors")
            lasted = all(thread.is_alive() for thread in load.threads)
        self.assertTrue(lasted, "the load ended before the recycling did")
        self.assertEqual((load.failed, load.errors[:3]), (0, []))
        self.assertEqual(load.retried, 0)
        self.assertFalse(cluster.worker_pids() & first)

    def test_max_memory(self):
        cluster = self.start(app=None, workers=1, args=["--max-memory", "1"])
        line = cluster.wait_for_log(r"worker 1 \(pid \d+\) recycled: RSS \d+ MiB > 1 MiB")
        self.assertTrue(line)
        self.assertEqual(cluster.get_json("/")["worker"], 1)


class OperationsEnvironmentTests(ClusterTestCase):
    """The contract's Operations options read from their variables, as a
    container or a unit's Environment= would set them."""

    def test_each_option_from_its_variable(self):
        control = self.path("control.sock")
        cluster = self.start(app=None, workers=1, env={
            "TXCLUSTER_METRICS": "tcp:0:interface=127.0.0.1",
            "TXCLUSTER_CONTROL": control,
            "TXCLUSTER_MAX_MEMORY": "1",
            "TXCLUSTER_MAX_REQUESTS": "-5",
            "TXCLUSTER_MAX_REQUESTS_JITTER": "abc",
        })
        address = cluster.wait_for_log(r"metrics on (\S+)").group(1)
        self.assertIn("txcluster_workers 1.0", scrape(f"http://{address}/metrics"))
        self.assertEqual(stat.S_IMODE(os.stat(control).st_mode), 0o600)
        cluster.wait_for_log(r"worker 1 \(pid \d+\) recycled: RSS \d+ MiB > 1 MiB")
        for variable in ("TXCLUSTER_MAX_REQUESTS=", "TXCLUSTER_MAX_REQUESTS_JITTER="):
            [warning] = [line for line in cluster.output.splitlines()
                         if f"ignoring {variable}" in line]
            self.assertIn("using the default", warning)
        self.assertNotIn("Traceback", cluster.output)


class CgroupQuotaTests(ClusterTestCase):
    """C{--workers auto} in a cgroup (v1's cpu controller, as on this
    machine) limited to 1 CPU starts 1 worker, whatever the CPUs."""

    QUOTA_CPUS = 1

    def cpu_cgroup(self):
        """A new child of this process's cpu cgroup, removed after the test:
        its directory, and its line in /proc/PID/cgroup."""
        with open("/proc/self/cgroup") as f:
            v1 = [line.split(":", 2) for line in f.read().splitlines()
                  if "cpu" in line.split(":")[1].split(",")]
        if os.geteuid() != 0 or not v1:
            self.fail("needs root and cgroup v1's cpu controller (/sys/fs/cgroup/cpu)")
        _, controllers, path = v1[0]
        parent = os.path.join("/sys/fs/cgroup", controllers, path.lstrip("/"))
        if not os.access(os.path.join(parent, "cgroup.procs"), os.W_OK):
            self.fail(f"cannot write to the cgroup {parent}")
        name = f"txcluster-test-{os.getpid()}"
        child = os.path.join(parent, name)
        os.mkdir(child)
        self.addCleanup(self.remove_cgroup, child)
        for setting, value in (("cpu.cfs_period_us", 100000),
                               ("cpu.cfs_quota_us", 100000 * self.QUOTA_CPUS)):
            with open(os.path.join(child, setting), "w") as f:
                f.write(str(value))
        return child, f"{controllers}:{os.path.join(path, name)}"

    @staticmethod
    def remove_cgroup(path):
        """Once its processes are gone (the cluster is killed first)."""
        def empty():
            with open(os.path.join(path, "cgroup.procs")) as f:
                return not f.read().strip()

        wait_until(empty, 10, f"no process left in {path}")
        os.rmdir(path)

    def test_workers_auto_counts_the_cpu_quota(self):
        cgroup, membership = self.cpu_cgroup()
        expected = min(self.QUOTA_CPUS, len(os.sched_getaffinity(0)))
        join = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup]
        cluster = self.start(workers=None, args=["--workers", "auto"], wrapper=join,
                             ready=expected, timeout=60)
        with open(f"/proc/{cluster.pid}/cgroup") as f:
            self.assertIn(membership, {line.split(":", 1)[1] for line in f.read().splitlines()})
        started = int(cluster.wait_for_log(r"listening on \S+ with (\d+) workers")[1])
        self.assertEqual(started, expected)
        self.assertEqual(len(cluster.worker_pids()), expected)


def scrape(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def metric(text, name, **labels):
    """The sum of a metric's samples with these labels."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            sample_labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(sample_labels.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


class MetricsTests(ClusterTestCase):
    def test_counts_survive_a_replaced_worker(self):
        cluster = self.start(app=None, workers=2, args=["--metrics", "tcp:0:interface=127.0.0.1"])
        address = cluster.wait_for_log(r"metrics on (\S+)").group(1)
        url = f"http://{address}/metrics"
        for _ in range(20):
            cluster.get("/")
        cluster.get("/nope")
        wait_until(lambda: metric(scrape(url), "txcluster_http_requests_total") >= 21, 10,
                   "the counts reported")
        text = scrape(url)
        self.assertEqual(metric(text, "txcluster_workers"), 2)
        self.assertEqual(metric(text, "txcluster_workers_ready"), 2)
        self.assertEqual(metric(text, "txcluster_http_requests_total", code="404"), 1)
        self.assertEqual(metric(text, "txcluster_http_request_duration_seconds_count"), 21)
        self.assertGreater(metric(text, "txcluster_worker_resident_memory_bytes", worker="1")
                           + 1, 0)
        os.kill(cluster.ready_workers()[1], signal.SIGKILL)
        cluster.wait_for_log(r"worker 1 \(pid \d+\) ready", count=2)
        after = scrape(url)
        self.assertEqual(metric(after, "txcluster_http_requests_total"), 21)
        self.assertEqual(metric(after, "txcluster_worker_restarts_total", reason="crash"), 1)
        self.assertIn("# TYPE txcluster_http_request_duration_seconds histogram", after)


class ControlTests(ClusterTestCase):
    def command(self, *argv, env=None):
        return subprocess.run([sys.executable, "-m", "txcluster", *argv], cwd=ROOT,
                              env=clean_environment(**(env or {})), capture_output=True,
                              text=True, timeout=120)

    def test_status_scale_reload_stop(self):
        control = self.path("control.sock")
        cluster = self.start(workers=2, args=["--control", control])
        self.assertEqual(stat.S_IMODE(os.stat(control).st_mode), 0o600)
        status = json.loads(self.command("--control", control, "status", "--json").stdout)
        self.assertEqual(status["pid"], cluster.pid)
        self.assertEqual([(w["id"], w["state"]) for w in status["workers"]],
                         [(1, "ready"), (2, "ready")])
        table = self.command("status", env={"TXCLUSTER_CONTROL": control})
        self.assertEqual(table.returncode, 0, table.stderr)
        self.assertIn("ready", table.stdout)
        scaled = self.command("--control", control, "scale", "3")
        self.assertEqual(scaled.returncode, 0, scaled.stderr)
        self.assertEqual(len(cluster.worker_pids()), 3)
        before = cluster.worker_pids()
        reloaded = self.command("--control", control, "reload")
        self.assertEqual(reloaded.returncode, 0, reloaded.stderr)
        self.assertFalse(cluster.worker_pids() & before)
        stopped = self.command("--control", control, "stop")
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        self.assertFalse(pid_alive(cluster.pid))
        self.assertFalse(os.path.exists(control))

    def test_a_reload_that_fails_names_the_worker(self):
        directory = self.directory()
        app = os.path.join(directory, "reloaded_app.py")
        with open(app, "w") as f:
            f.write("from klein import Klein\nweb = Klein()\n")
        control = self.path("control.sock")
        self.start("reloaded_app:web", workers=2, cwd=directory, args=["--control", control])
        with open(app, "w") as f:
            f.write("raise RuntimeError('the new code is broken')\n")
        cache = os.path.join(directory, "__pycache__")  # the new source must be read
        for name in os.listdir(cache) if os.path.isdir(cache) else []:
            os.remove(os.path.join(cache, name))
        result = self.command("--control", control, "reload")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertRegex(result.stderr, r"worker 1 \(pid \d+\) exited with status 4")
        self.assertIn("the new code is broken", result.stderr)

    def test_a_live_socket_is_refused_and_a_stale_one_replaced(self):
        control = self.path("control.sock")
        self.start(workers=1, args=["--control", control])
        second = self.start(workers=1, args=["--control", control], ready=0)
        self.assertNotEqual(second.wait_exit(20), 0)
        self.assertIn(f"already answers on {control}", second.output)
        stale = self.path("stale.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(stale)
        s.close()  # the file stays; nobody answers
        self.start(workers=1, args=["--control", stale])
        self.assertEqual(self.command("--control", stale, "status").returncode, 0)

    def test_no_master_is_one_line_and_status_1(self):
        missing = self.path("missing.sock")
        result = self.command("--control", missing, "status")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn(missing, result.stderr)

    def test_the_console_script_is_installed(self):
        script = os.path.join(os.path.dirname(twistd_command()[0]), "txcluster")
        result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0)
        self.assertIn("status", result.stdout)


class HungWorkerTests(ClusterTestCase):
    def test_its_stack_is_logged_before_it_is_killed(self):
        cluster = self.start(workers=2, args=["--timeout", "1"])
        threading.Thread(target=lambda: SignalTests._get(cluster, "/block?seconds=30"),
                         daemon=True).start()
        line = cluster.wait_for_log(r"worker (\d) \(pid (\d+)\) silent for")
        worker_id, pid = line.group(1), line.group(2)
        killed = cluster.wait_for_log(rf"worker {worker_id} \(pid {pid}\) exited on signal 9")
        stack = cluster.output[line.end():killed.start()]
        self.assertIn(f"[worker {worker_id}]", stack)
        self.assertRegex(stack, r'File ".*apps\.py", line \d+ in block')
        cluster.wait_for_log(rf"worker {worker_id} \(pid \d+\) ready", count=2)


class AccessLogFormatTests(ClusterTestCase):
    def test_json_lines(self):
        access = self.path("access.log")
        cluster = self.start(workers=1, args=["--access-log", access,
                                              "--access-log-format", "json"])
        cluster.get("/?q=1")
        wait_until(lambda: self.lines(access), 10, "an access log line")
        entry = json.loads(self.lines(access)[0])
        self.assertEqual({k: entry[k] for k in ("worker", "client", "method", "path", "status")},
                         {"worker": 1, "client": "127.0.0.1", "method": "GET", "path": "/?q=1",
                          "status": 200})
        self.assertEqual(set(entry), {"time", "worker", "client", "method", "path", "status",
                                      "bytes", "duration_ms", "referer", "user_agent"})
