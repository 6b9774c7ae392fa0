"""
Loopback throughput benchmark of txcluster, with wrk.

    /path/to/venv/bin/python bench/run.py [--duration S] [--connections C]
                                          [--threads T] [--quick]

Run it with the interpreter of the venv where txcluster is installed (the
cluster is started with that venv's ``twistd``, through
``txcluster.testing.start_cluster``).  For each size N (1, 2, 4) it starts,
side by side, the baseline and the clusters:

- N = 1: one ``--single`` process; N > 1: ``parallel-N``, N independent
  ``--single`` processes on N ports driven by N concurrent wrk processes
  with C/N connections each (the parallel limit, with no shared socket);
- N > 1: ``reuseport-N``, N independent ``--single`` processes on one port,
  each with its own ``SO_REUSEPORT`` socket (the kernel hashes connections
  to them), driven like the cluster by one wrk: what a shared port costs
  without any manager;
- the cluster with N workers, once per ``--balance`` mode (and with
  ``--cpu-affinity``: ``round-robin+affinity``, ``reuseport+affinity``;
  with ``--metrics``: ``round-robin+metrics``, for what metrics cost),
  counting which worker answered each request (a wrk Lua script reads
  ``"worker": N``).

Each round measures them one after the other, with keep-alive and with
``Connection: close``, starting one place further along the list each
round; ratios are medians of per-round ratios, so a drift in the machine's
load during the run cancels out.  Each measurement also counts the
rescheduling interrupts (``RES`` in /proc/interrupts) per request: a task
woken on another CPU than the one that woke it.  That is what sharing a
port costs: the parallel limit pairs each wrk thread with its own server,
and the scheduler keeps each pair on one CPU.  Then the respawn latency
(SIGKILL a worker, time until its replacement answers a request)
and the RSS of the master and the workers.  Everything it starts is killed
when it ends.

The numbers are only as good as the machine is quiet: the client (wrk) and
every server process share the same cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

from peers import PeerServer  # bench/peers.py, beside this script
from peers import available as peers_available
from wrk import WrkResult, run_wrk, wrk_available  # bench/wrk.py, beside this script

PEERS = ("gunicorn", "uvicorn", "granian", "node")

try:
    from txcluster.testing import (
        RunningCluster, clean_environment, pid_alive, start_cluster, wait_until,
    )
except ImportError:  # pragma: no cover - wrong interpreter
    sys.exit("bench/run.py: cannot import txcluster; run it with the python of the venv "
             "where txcluster is installed (e.g. /tmp/venv/bin/python bench/run.py)")


@dataclass(frozen=True)
class Row:
    """One wrk measurement."""

    config: str
    mode: str  # "keep-alive" or "close"
    result: WrkResult
    workers: int  # workers that name themselves in answers (0: not a cluster)
    round: int
    wakeups_across_cpus: Optional[float]  # rescheduling interrupts per request


class Bench:
    def __init__(self, options: argparse.Namespace) -> None:
        self.o = options
        self.tmp = tempfile.TemporaryDirectory(prefix="txcluster-bench-")
        self.env = clean_environment()
        self.cwd = options.app_dir or self.tmp.name
        self.rows: List[Row] = []
        self.rss: Dict[str, str] = {}
        self.respawn: List[float] = []

    # wrk ---------------------------------------------------------------------

    def wrk(self, urls: Sequence[str], close: bool) -> WrkResult:
        """One wrk per URL, all at once, the connections split between them."""
        return run_wrk(urls, self.o.connections, self.o.threads, self.o.duration, close,
                       binary=self.o.wrk)

    # Servers -----------------------------------------------------------------

    def start(self, workers: int, variant: Optional[str] = None) -> RunningCluster:
        args = variant_args(variant) if variant else []
        cluster = start_cluster(app=self.o.app, workers=workers, env=self.env, cwd=self.cwd,
                                args=args)
        cluster.ready_at = time.monotonic()  # type: ignore[attr-defined]
        try:
            for _ in range(3):  # smoke test, and warm the first request path
                status, body = cluster.get("/")
                if status != 200 or b'"worker"' not in body:
                    raise RuntimeError(f"GET / answered {status} {body[:200]!r}")
        except BaseException:
            cluster.kill()
            raise
        return cluster

    def start_reuseport(self, n: int) -> List[RunningCluster]:
        """N --single processes, each on its own SO_REUSEPORT socket bound
        to the same port (passed to it like systemd socket activation)."""
        servers: List[RunningCluster] = []
        port = 0
        try:
            for _ in range(n):
                with socket.socket() as listener:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    listener.bind(("127.0.0.1", port))
                    listener.listen(1024)
                    port = listener.getsockname()[1]
                    servers.append(start_cluster(
                        app=self.o.app, workers=0, env=self.env, cwd=self.cwd,
                        listen="systemd:domain=INET:index=0", inherit=listener.fileno()))
        except BaseException:
            for server in servers:
                server.kill()
            raise
        return servers

    def start_nginx(self, name: str, upstreams: Sequence[str]) -> "Nginx":
        """nginx in front of C{upstreams}, with its default upstream settings
        (HTTP/1.0, a new connection per request): what most deployments run;
        with --nginx-keepalive, kept-alive upstream connections."""
        return Nginx(os.path.join(self.tmp.name, name), upstreams, self.o.nginx_keepalive)

    def measure(self, config: str, urls: Sequence[str], expected_workers: int = 0,
                round_: int = 0) -> None:
        for close in (False, True):
            mode = "close" if close else "keep-alive"
            before = rescheduling_interrupts()
            result = self.wrk(urls, close)
            after = rescheduling_interrupts()
            wakeups = ((after - before) / result.requests
                       if before is not None and after is not None and result.requests else None)
            self.rows.append(Row(config, mode, result, expected_workers, round_, wakeups))
            print(f"  round {round_ + 1}  {config:<31} {mode:<10} {result.rps:8.0f} req/s"
                  f"  {_wakeups_text(wakeups)} cross-CPU wake-ups/req"
                  f"{self._share_text(result, expected_workers)}", flush=True)

    # Runs ----------------------------------------------------------------------

    def run(self) -> None:
        """For each size N, the baseline (one --single process for N = 1,
        else N of them) and the clusters run side by side, and each round
        measures them one after the other: a ratio compares two figures of
        the same round, so drift in the machine's load cancels out."""
        print(self._header(), flush=True)
        for n in self.o.workers:
            baseline = "single" if n == 1 else f"parallel-{n}"
            with contextlib.ExitStack() as stack:
                servers = [stack.enter_context(self.start(0)) for _ in range(n)]
                clusters = {cluster_name(n, b): stack.enter_context(self.start(n, b))
                            for b in self.o.balance}
                # (config, urls, workers that name themselves in answers)
                configs = [(baseline, [s.url for s in servers], 0)]
                if n > 1:
                    shared = [stack.enter_context(s) for s in self.start_reuseport(n)]
                    configs.append((f"reuseport-{n}", [shared[0].url], 0))
                configs += [(name, [c.url], n) for name, c in clusters.items()]
                for peer in self.o.peers:
                    peer_cluster = stack.enter_context(PeerServer(peer, n))
                    alone = [stack.enter_context(PeerServer(peer, 0)) for _ in range(n)]
                    configs += [(f"{peer}-{n}", [peer_cluster.url], 0),
                                (peer_baseline(peer, n), [s.url for s in alone], 0)]
                if self.o.nginx and n > 1:
                    first = next(iter(clusters.values()))
                    behind_cluster = stack.enter_context(
                        self.start_nginx(f"nginx-cluster-{n}", [first.url]))
                    behind_parallel = stack.enter_context(
                        self.start_nginx(f"nginx-parallel-{n}", [s.url for s in servers]))
                    configs += [(f"nginx->{cluster_name(n, self.o.balance[0])}",
                                 [behind_cluster.url], n),
                                (f"nginx->parallel-{n}", [behind_parallel.url], 0)]
                for round_ in range(self.o.rounds):
                    turn = round_ % len(configs)
                    for config, urls, workers in configs[turn:] + configs[:turn]:
                        self.measure(config, urls, expected_workers=workers, round_=round_)
                if n == 1:
                    self.rss["single process"] = _rss_text([servers[0].pid])
                for config, cluster in clusters.items():
                    self.rss[f"{config} master"] = _rss_text([cluster.pid])
                    self.rss[f"{config} workers"] = _rss_text(sorted(cluster.worker_pids()))
                if n == max(self.o.workers) and self.o.respawn_samples:
                    self.respawn = self.measure_respawn(next(iter(clusters.values())), n)
        self.report()

    def measure_respawn(self, cluster: RunningCluster, n: int) -> List[float]:
        """SIGKILL the longest-running worker; time until its replacement
        answers a request (new connections, polled every 2 ms, until one is
        answered by that worker id from a new pid).

        A worker that dies within 5 s of starting is a fast crash (back-off,
        and the master gives up after N in a row), so every victim has run
        for more than 5.5 s: the respawn is immediate, as after a real crash.
        """
        print(f"  respawn     kill -9 a worker of cluster-{n}, {self.o.respawn_samples} times",
              flush=True)
        started = {i: cluster.ready_at for i in range(1, n + 1)}  # type: ignore[attr-defined]
        samples = []
        for _ in range(self.o.respawn_samples):
            victim = min(started, key=started.get)
            age = time.monotonic() - started[victim]
            if age < 5.5:
                time.sleep(5.5 - age)
            pid = cluster.ready_workers()[victim]
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: _answered_by_new(cluster, victim, pid), 30,
                       f"worker {victim} to respawn and answer", interval=0.002)
            samples.append(time.monotonic() - t0)
            started[victim] = time.monotonic()
            assert not pid_alive(pid)
        return samples

    # Output --------------------------------------------------------------------

    def _header(self) -> str:
        import twisted
        o = self.o
        return (f"txcluster bench: wrk -t{o.threads} -c{o.connections} -d{o.duration}s, "
                f"loopback, {os.cpu_count()} CPUs, load average {_loadavg()}, "
                f"Python {platform.python_version()}, Twisted {twisted.__version__}, "
                f"app {o.app or 'txcluster.demo:cluster'}")

    @staticmethod
    def _share_text(result: WrkResult, expected: int) -> str:
        if not expected:
            return ""
        shares = share(result, expected)
        spread = ratio_text(shares)
        counts = " ".join(f"w{i}={c}" for i, c in sorted(shares.items()))
        return f"   shares {counts}  max/min {spread}"

    def _rows(self, config: str, mode: str) -> Iterator[Row]:
        return (row for row in self.rows if (row.config, row.mode) == (config, mode))

    def _median_rps(self, config: str, mode: str) -> float:
        return statistics.median(row.result.rps for row in self._rows(config, mode))

    def _median_wakeups(self, config: str, mode: str) -> Optional[float]:
        values = [row.wakeups_across_cpus for row in self._rows(config, mode)
                  if row.wakeups_across_cpus is not None]
        return statistics.median(values) if values else None

    def _shares(self, config: str, mode: str, expected: int) -> Dict[int, int]:
        """Requests per worker, summed over the rounds."""
        total = {i: 0 for i in range(1, expected + 1)}
        for row in self._rows(config, mode):
            for worker, count in share(row.result, expected).items():
                total[worker] += count
        return total

    def _ratios(self, top: str, bottom: str, mode: str,
                figure: str = "rps") -> List[float]:
        """top/bottom in each round, each pair from one round; of requests/s,
        or of another figure of the wrk result (C{p99_ms})."""
        by_round: Dict[int, Dict[str, float]] = {}
        for row in self.rows:
            if row.mode == mode and row.config in (top, bottom):
                by_round.setdefault(row.round, {})[row.config] = getattr(row.result, figure)
        return [v[top] / v[bottom] for v in by_round.values()
                if top in v and bottom in v and v[bottom]]

    def _ratio_text(self, top: str, bottom: str, mode: str) -> str:
        ratios = self._ratios(top, bottom, mode)
        if not ratios:
            return "-"
        return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"

    def report(self) -> None:
        configs: List[tuple] = []
        for row in self.rows:
            if (row.config, row.workers) not in configs:
                configs.append((row.config, row.workers))
        print(f"\nmedian of {self.o.rounds} rounds of {self.o.duration} s")
        print(f"{'config':<32}{'mode':<11}{'req/s':>8}{'errors':>8}{'x-CPU/req':>11}"
              "  per-worker share (max/min)")
        for config, expected in configs:
            for mode in ("keep-alive", "close"):
                errors = sum(row.result.errors + row.result.non2xx
                             for row in self._rows(config, mode))
                line = (f"{config:<32}{mode:<11}{self._median_rps(config, mode):>8.0f}{errors:>8}"
                        f"{_wakeups_text(self._median_wakeups(config, mode)):>11}")
                if expected:
                    shares = self._shares(config, mode, expected)
                    total = sum(shares.values()) or 1
                    line += "  " + " ".join(f"{100 * c / total:.0f}%" for _, c in sorted(shares.items()))
                    line += f" ({ratio_text(shares)})"
                print(line)

        print("\nratios of requests/s, paired by round: median (min-max)"
              f"\n{'':<48}keep-alive             close")
        for n in self.o.workers:
            baseline = "single" if n == 1 else f"parallel-{n}"
            tops = [cluster_name(n, balance) for balance in self.o.balance]
            if n > 1:
                tops.append(f"reuseport-{n}")
            pairs = [(top, baseline) for top in tops]
            # What --metrics costs: each +metrics variant against the same without.
            pairs += [(cluster_name(n, balance), cluster_name(n, balance.replace("+metrics", "")))
                      for balance in self.o.balance
                      if "+metrics" in balance and balance.replace("+metrics", "") in self.o.balance]
            pairs += [(f"{peer}-{n}", peer_baseline(peer, n)) for peer in self.o.peers]
            if self.o.nginx and n > 1:
                pairs.append((f"nginx->{cluster_name(n, self.o.balance[0])}",
                              f"nginx->parallel-{n}"))
            for top, bottom in pairs:
                cells = [self._ratio_text(top, bottom, mode) for mode in ("keep-alive", "close")]
                label = f"{top} / {bottom}"
                print(f"  {label:<46}{cells[0]:>15}{cells[1]:>18}" if len(label) <= 46 else
                      f"  {label}\n  {'':<46}{cells[0]:>15}{cells[1]:>18}")

        print("\np99 latency (wrk's; with parallel-N, the worst of its wrk processes):"
              " median ms, and the ratio to the baseline paired by round"
              f"\n{'':<48}keep-alive             close")
        for n in self.o.workers:
            baseline = "single" if n == 1 else f"parallel-{n}"
            for config in [baseline] + [cluster_name(n, b) for b in self.o.balance]:
                cells = []
                for mode in ("keep-alive", "close"):
                    p99 = statistics.median(row.result.p99_ms for row in self._rows(config, mode))
                    ratios = self._ratios(config, baseline, mode, "p99_ms")
                    ratio = f" x{statistics.median(ratios):.2f}" if config != baseline and ratios \
                        else ""
                    cells.append(f"{p99:.1f}{ratio}")
                print(f"  {config:<46}{cells[0]:>15}{cells[1]:>18}")

        print(f"\n{'per-worker share max/min (all rounds)':<50}keep-alive   close")
        for n in self.o.workers:
            if n < 2:
                continue
            for balance in self.o.balance:
                config = cluster_name(n, balance)
                cells = [ratio_text(self._shares(config, m, n)) for m in ("keep-alive", "close")]
                print(f"  {config:<48}{cells[0]:>10}{cells[1]:>8}")

        if self.respawn:
            ms = sorted(1000 * s for s in self.respawn)
            print(f"\nrespawn (kill -9 -> the replacement answers): median {statistics.median(ms):.0f} ms"
                  f" (samples: {', '.join(f'{m:.0f}' for m in ms)} ms)")
        print("\nRSS (VmRSS after the load)")
        for what, text in self.rss.items():
            print(f"  {what:<40}{text}")
        print(f"\nload average at the end: {_loadavg()}  (other processes on the machine "
              "skew every number above)")


NGINX_CONFIG = """\
worker_processes auto;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream app {{
{servers}
{upstream_keepalive}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
{location_keepalive}
        }}
    }}
}}
"""


class Nginx:
    """An nginx process group on a free loopback port, killed on exit."""

    def __init__(self, directory: str, upstreams: Sequence[str],
                 keepalive: bool = False) -> None:
        import shutil
        import subprocess

        binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
        if binary is None:
            raise SystemExit("bench/run.py --nginx: nginx is not installed "
                             "(Debian: apt-get install nginx-light)")
        os.makedirs(directory, exist_ok=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        servers = "\n".join(f"        server {url.split('//', 1)[1]};" for url in upstreams)
        with open(os.path.join(directory, "nginx.conf"), "w") as f:
            f.write(NGINX_CONFIG.format(
                dir=directory, port=self.port, servers=servers,
                upstream_keepalive="        keepalive 32;" if keepalive else "",
                location_keepalive=('            proxy_http_version 1.1;\n'
                                    '            proxy_set_header Connection "";')
                if keepalive else ""))
        self.process = subprocess.Popen(
            [binary, "-p", directory, "-c", "nginx.conf", "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.__exit__()
                raise RuntimeError("nginx did not start")
            time.sleep(0.05)

    def __enter__(self) -> "Nginx":
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def rescheduling_interrupts() -> Optional[int]:
    """Rescheduling interrupts so far, over all CPUs (the C{RES} line of
    /proc/interrupts, on x86 Linux): a task woken on another CPU than the
    waker's.  C{None} where there is no such line."""
    try:
        with open("/proc/interrupts") as f:
            for line in f:
                name, _, counts = line.partition(":")
                if name.strip() == "RES":
                    return sum(int(c) for c in counts.split() if c.isdigit())
    except OSError:
        pass
    return None


def _wakeups_text(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _answered_by_new(cluster: RunningCluster, worker: int, old_pid: int) -> bool:
    """One GET /: did worker C{worker}, in a process other than C{old_pid}, answer?"""
    try:
        status, body = cluster.get("/", timeout=2)
        answer = json.loads(body)
    except (OSError, ValueError):
        return False
    return status == 200 and answer.get("worker") == worker and answer.get("pid") != old_pid


def peer_baseline(peer: str, workers: int) -> str:
    """The peer's own parallel limit: its single process, or N of them."""
    return f"{peer}-single" if workers == 1 else f"{peer}-parallel-{workers}"


def cluster_name(workers: int, variant: str) -> str:
    return f"cluster-{workers}/{variant}"


#: What a +suffix of a --balance variant adds to the cluster's command line.
VARIANT_OPTIONS = {
    "affinity": ["--cpu-affinity"],
    # Metrics on (workers time every request and report it): compare with
    # the same mode without, to see what reporting metrics costs.
    "metrics": ["--metrics", "tcp:0:interface=127.0.0.1"],
}


def variant_args(variant: str) -> List[str]:
    """C{round-robin+affinity} -> C{--balance round-robin --cpu-affinity};
    C{round-robin+metrics} -> C{--balance round-robin --metrics ...}."""
    balance, *extras = variant.split("+")
    return ["--balance", balance] + [arg for extra in extras for arg in VARIANT_OPTIONS[extra]]


def share(result: WrkResult, expected: int) -> Dict[int, int]:
    """Requests per worker id, every expected id present (0 if it got none)."""
    shares = {i: 0 for i in range(1, expected + 1)}
    shares.update(result.workers)
    return shares


def ratio_text(shares: Dict[int, int]) -> str:
    if len(shares) < 2:
        return "-"
    lo, hi = min(shares.values()), max(shares.values())
    return f"{hi / lo:.2f}" if lo else "inf"


def _rss_kib(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_text(pids: Sequence[int]) -> str:
    values = [v for v in (_rss_kib(p) for p in pids) if v is not None]
    if not values:
        return "-"
    mib = [v / 1024 for v in values]
    if len(mib) == 1:
        return f"{mib[0]:.1f} MiB"
    return f"{statistics.mean(mib):.1f} MiB each ({', '.join(f'{m:.1f}' for m in mib)})"


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x]


DEFAULT_MODES = ["auto", "round-robin", "round-robin+affinity", "kernel", "reuseport",
                 "reuseport+affinity"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=None,
                   help="seconds per wrk run (default 3; 1 with --quick)")
    p.add_argument("--connections", type=int, default=32,
                   help="wrk -c, split between the processes of parallel-N (default 32)")
    p.add_argument("--threads", type=int, default=2,
                   help="wrk -t (default 2); parallel-N runs N wrk with max(1, T/N) each")
    p.add_argument("--quick", action="store_true",
                   help="1 s runs and 3 respawn samples")
    p.add_argument("--workers", type=_ints, default=[1, 2, 4],
                   help="cluster sizes, comma-separated (default 1,2,4)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds per size; ratios are medians of per-round ratios "
                        "(default 9; 1 with --quick)")
    p.add_argument("--respawn-samples", type=int, default=None,
                   help="kill -9 samples on the largest cluster (default 5; 3 with --quick)")
    p.add_argument("--app", default=None,
                   help="--app of the cluster (default: the demo); its GET / must answer "
                        'JSON naming the worker, like {"worker": N}')
    p.add_argument("--app-dir", default=None,
                   help="directory the cluster runs in, where --app is imported from")
    p.add_argument("--balance", type=lambda text: text.split(","), default=DEFAULT_MODES,
                   help="--balance modes of the clusters, comma-separated, each "
                        "optionally +affinity for --cpu-affinity and/or +metrics for "
                        "--metrics "
                        f"(default {','.join(DEFAULT_MODES)})")
    p.add_argument("--wrk", default="wrk", help="the wrk binary (default: wrk on PATH)")
    p.add_argument("--peers", type=lambda text: [p for p in text.split(",") if p],
                   default=[],
                   help="also measure these peers with the same hello world, each as N "
                        "workers on one port against its own N single processes: any of "
                        "gunicorn,uvicorn,granian,node (pip install '.[bench]')")
    p.add_argument("--nginx", action="store_true",
                   help="also put nginx (Debian package) in front, with its default "
                        "upstream settings: nginx->cluster-N (the first --balance mode) "
                        "against nginx->parallel-N (an upstream block of the N --single "
                        "processes)")
    p.add_argument("--nginx-keepalive", action="store_true",
                   help="with --nginx: nginx keeps its upstream connections alive "
                        "(keepalive 32, HTTP/1.1) instead of its default")
    options = p.parse_args(argv)
    options.nginx = options.nginx or options.nginx_keepalive
    if options.duration is None:
        options.duration = 1 if options.quick else 3
    if options.rounds is None:
        options.rounds = 1 if options.quick else 9
    if options.respawn_samples is None:
        options.respawn_samples = 3 if options.quick else 5
    if options.connections < 1 or options.threads < 1 or options.duration < 1:
        p.error("--connections, --threads and --duration must be at least 1")
    if options.threads > options.connections:
        p.error("wrk needs --connections >= --threads")
    for peer in options.peers:
        if peer not in PEERS:
            p.error(f"--peers: {peer!r} is not one of {','.join(PEERS)}")
        why = peers_available(peer)
        if why:
            p.error(f"--peers: {why}")
    return options


def main(argv: Optional[Sequence[str]] = None) -> None:
    options = parse_args(argv)
    if not wrk_available(options.wrk):
        sys.exit("bench/run.py: wrk is not installed (Debian: apt-get install wrk)")
    bench = Bench(options)
    try:
        bench.run()
    finally:
        bench.tmp.cleanup()


if __name__ == "__main__":
    main()
