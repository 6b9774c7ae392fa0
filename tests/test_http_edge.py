"""
The HTTP edge on the installed plugin: every option of the contract's
table, forwarded headers, PROXY protocol from a real HAProxy in every
balance mode, and slowloris against a low open-files limit.
"""

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from typing import Dict
from urllib.parse import urlsplit

from txcluster.testing import wait_until

from .integration import ClusterTestCase, free_port
from .system import installed


def raw(cluster, data=b"", timeout=5.0):
    """Send C{data} on a new connection; what came back until it closed."""
    parts = urlsplit(cluster.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
        s.sendall(data)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
        return received


def status(response):
    match = re.match(rb"HTTP/1.1 (\d{3}) ", response)
    return int(match[1]) if match else None


def body(response):
    """The JSON body of a whole response, chunked or not."""
    head, rest = response.split(b"\r\n\r\n", 1)
    if b"transfer-encoding: chunked" not in head.lower():
        return json.loads(rest)
    data = b""
    while True:
        size, rest = rest.split(b"\r\n", 1)
        if not int(size, 16):
            return json.loads(data)
        data, rest = data + rest[:int(size, 16)], rest[int(size, 16) + 2:]


class OptionTests(ClusterTestCase):
    def test_limits_on_the_installed_plugin(self):
        cluster = self.start(workers=2, args=[
            "--limit-request-line", "100", "--limit-request-fields", "5",
            "--limit-request-field-size", "60", "--limit-request-body", "10"])
        cases = [
            (b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 200),
            (b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
            (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(6)) + b"\r\n",
             431),
            (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 100 + b"\r\n\r\n", 431),
            (b"POST /whoami HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n" + b"a" * 11, 413),
            (b"GET\r\n\r\n", 400),
            (os.urandom(8192).replace(b"\n", b"\0"), 400),
        ]
        for request, expected in cases:
            self.assertEqual(status(raw(cluster, request)), expected, request[:40])
        self.assertEqual(cluster.get("/")[0], 200)  # the workers go on
        self.assertEqual(len(cluster.worker_pids()), 2)

    def test_header_timeout_counts_from_the_connections_start(self):
        cluster = self.start(workers=1, args=["--header-timeout", "1"])
        parts = urlsplit(cluster.url)
        started = time.monotonic()
        with socket.create_connection((parts.hostname, parts.port), timeout=5) as s:
            received = b""
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    break
                s.settimeout(0.2)  # a byte every 0.2 s
                try:
                    chunk = s.recv(4096)
                except socket.timeout:
                    continue
                received += chunk
                if not chunk or b"\r\n\r\n" in received:
                    break
        self.assertEqual(status(received), 408)
        self.assertLess(time.monotonic() - started, 2)

    def test_an_idle_kept_alive_connection_is_closed_after_keep_alive(self):
        cluster = self.start(workers=1, args=["--keep-alive", "0.5"])
        parts = urlsplit(cluster.url)
        with socket.create_connection((parts.hostname, parts.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertEqual(status(s.recv(65536)), 200)
            started = time.monotonic()
            self.assertEqual(s.recv(1), b"")  # closed by the server
            self.assertLess(time.monotonic() - started, 2)

    def test_backlog(self):
        cluster = self.start(workers=1, args=["--backlog", "1234"])
        port = urlsplit(cluster.url).port
        listing = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                                 text=True, check=True).stdout
        self.assertEqual(listing.split()[2], "1234", listing)  # Send-Q: the backlog

    def test_forwarded_headers_from_a_trusted_peer_only(self):
        log = self.path("access.json")
        cluster = self.start(workers=1, args=["--access-log", log,
                                              "--access-log-format", "json"])
        request = (b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                   b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n")
        seen = body(raw(cluster, request))
        self.assertEqual((seen["client"], seen["secure"]), ("203.0.113.7", True))
        wait_until(lambda: self.lines(log), 5, "the access log line")
        self.assertEqual(json.loads(self.lines(log)[0])["client"], "203.0.113.7")

        untrusted = self.start(workers=1, args=["--forwarded-allow-ips", "10.0.0.0/8"])
        seen = body(raw(untrusted, request))
        self.assertEqual((seen["client"], seen["secure"]), ("127.0.0.1", False))


HAPROXY_SEND_PROXY = """\
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s

frontend web
    bind 127.0.0.1:{port}
    default_backend cluster

backend cluster
    server cluster 127.0.0.1:{cluster_port} {send_proxy}
"""


class ProxyProtocolTests(ClusterTestCase):
    """A real HAProxy sends the PROXY header (v1, then v2) to a cluster
    listening on haproxy:tcp:..., in each balance mode."""

    def test_every_balance_mode_and_both_versions(self):
        haproxy = installed("haproxy", "haproxy")
        directory = self.directory()
        for balance in ("round-robin", "kernel", "reuseport"):
            cluster_port = free_port()
            cluster = self.start(workers=2, listen=f"haproxy:tcp:{cluster_port}:interface=127.0.0.1",
                                 args=["--balance", balance])
            for version in ("send-proxy", "send-proxy-v2"):
                port = free_port()
                config = os.path.join(directory, f"{balance}-{version}.cfg")
                with open(config, "w") as f:
                    f.write(HAPROXY_SEND_PROXY.format(port=port, cluster_port=cluster_port,
                                                      send_proxy=version))
                process = subprocess.Popen([haproxy, "-db", "-f", config],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                self.addCleanup(lambda p=process: (p.kill(), p.wait()))
                with socket.socket() as client:
                    client.settimeout(5)
                    wait_until(lambda: client.connect_ex(("127.0.0.1", port)) == 0, 10,
                               "haproxy to listen")
                    client.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    received = b""
                    while chunk := client.recv(65536):
                        received += chunk
                    seen = body(received)
                    # the client's own address and port, which only the header carries
                    self.assertEqual((seen["client"], seen["port"]),
                                     client.getsockname(), (balance, version))
                process.kill()
                process.wait()
            cluster.stop()


def _with_open_files_limit(soft):
    """A wrapper command that lowers the soft open-files limit, then execs."""
    return [sys.executable, "-c",
            "import os, resource, sys; hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, hard)); "
            "os.execvp(sys.argv[1], sys.argv[1:])"]


class SlowlorisTests(ClusterTestCase):
    HELD = 2000

    def test_thousands_of_slow_connections_do_not_stop_a_new_client(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 4 * self.HELD:
            self.fail(f"the hard open-files limit is {hard}, this test needs {4 * self.HELD}: "
                      f"raise it (as root: ulimit -Hn {4 * self.HELD}, or LimitNOFILE=)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 3 * self.HELD), hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        cluster = self.start(workers=2, wrapper=_with_open_files_limit(1024),
                             args=["--header-timeout", "4"])
        self.assertIn("raised the open-files limit from 1024", cluster.output)
        parts = urlsplit(cluster.url)
        address = (parts.hostname, parts.port)

        def descriptors() -> Dict[int, int]:
            """Open descriptors of each worker, by pid."""
            return {pid: len(os.listdir(f"/proc/{pid}/fd")) for pid in cluster.worker_pids()}

        idle = sum(descriptors().values())
        held = []
        self.addCleanup(lambda: [s.close() for s in held])
        opened_at = time.monotonic()
        for i in range(self.HELD):  # half say nothing, half trickle their headers
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(address)
            held.append(s)
        wait_until(lambda: sum(descriptors().values()) - idle >= self.HELD, 10,
                   "the workers to hold every slow connection")
        for s in held[::2]:
            try:
                s.send(b"GET / HTTP/1.1\r\nX-a: ")
            except OSError:
                pass
        worst = 0.0
        for _ in range(20):
            started = time.monotonic()
            self.assertEqual(cluster.get("/", timeout=5)[0], 200)
            worst = max(worst, time.monotonic() - started)
            for s in held[::2]:  # a byte now and then: never resets the clock
                try:
                    s.send(b"a")
                except OSError:
                    pass
            # The trickle's pace, not a wait: time passing between bytes is
            # what a slowloris client does, and there is nothing to poll.
            time.sleep(0.05)
        held_by = descriptors()
        self.assertLess(worst, 1.0)
        self.assertGreater(sum(held_by.values()), self.HELD * 0.9, held_by)

        def closed(s):
            try:
                return s.recv(65536) is not None  # b"" or the 408
            except BlockingIOError:
                return False
            except OSError:
                return True

        wait_until(lambda: all(closed(s) for s in held), 10, "the slow connections to close")
        closed_after = time.monotonic() - opened_at
        self.assertLess(closed_after, 4 + 3)  # from their start, not their last byte
        print(f"\nslowloris: {self.HELD} connections held; new clients' worst latency "
              f"{worst * 1000:.0f} ms; descriptors per worker {sorted(held_by.values())}; "
              f"all closed {closed_after:.1f}s after they opened")


NGINX_CONFIG = """\
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{cluster_port};
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


class NginxTests(ClusterTestCase):
    """README.rst's nginx snippet, in front of a cluster that trusts it."""

    def test_the_client_nginx_saw_and_not_the_one_it_claims(self):
        nginx = installed("nginx", "nginx-light")
        cluster = self.start(workers=2)
        directory, port = self.directory(), free_port()
        with open(os.path.join(directory, "nginx.conf"), "w") as f:
            f.write(NGINX_CONFIG.format(dir=directory, port=port,
                                        cluster_port=urlsplit(cluster.url).port))
        process = subprocess.Popen([nginx, "-p", directory, "-c", "nginx.conf",
                                    "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(lambda: (os.killpg(process.pid, signal.SIGKILL), process.wait()))
        with socket.socket() as client:
            client.bind(("127.0.0.5", 0))  # an address the cluster does not trust
            client.settimeout(5)
            wait_until(lambda: client.connect_ex(("127.0.0.1", port)) == 0, 10,
                       "nginx to listen")
            client.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                           b"X-Forwarded-For: 198.51.100.66\r\n\r\n")
            received = b""
            while chunk := client.recv(65536):
                received += chunk
        seen = body(received)
        self.assertEqual((seen["client"], seen["secure"]), ("127.0.0.5", False))


class Http2Tests(ClusterTestCase):
    """ALPN offers h2 on ssl: endpoints (the test extra installs twisted[http2]);
    curl, built with nghttp2, is the client."""

    def setUp(self):
        super().setUp()
        from twisted.web import http

        if not http.H2_ENABLED:
            self.fail("twisted[http2] is not installed: pip install '.[test]'")
        self.curl_binary = installed("curl", "curl")
        from .test_endpoints import self_signed

        self.key, self.cert = self_signed(self.directory())

    def curl(self, url, *args):
        process = subprocess.Popen([self.curl_binary, "-s", "--http2", "--cacert", self.cert,
                                    *args, "-w", "\n%{http_code} %{http_version}", url],
                                   stdout=subprocess.PIPE, text=True)
        self.addCleanup(lambda: (process.kill(), process.wait(), process.stdout.close()))
        return process

    def test_served_over_http2_and_drained_with_its_streams_answered(self):
        cluster = self.start(workers=2, listen=f"ssl:0:privateKey={self.key}:certKey={self.cert}"
                                               f":interface=127.0.0.1")
        url = f"https://127.0.0.1:{urlsplit(cluster.url).port}"
        out, _ = self.curl(url + "/whoami").communicate(timeout=20)
        answer, status = out.rsplit("\n", 1)
        self.assertEqual(status, "200 2")
        self.assertEqual(json.loads(answer)["client"], "127.0.0.1")

        slow = self.curl(url + "/slow?seconds=2")
        cluster.wait_for_log(r"slow request for 2.0s in flight")
        cluster.signal(signal.SIGTERM)
        out, _ = slow.communicate(timeout=20)
        self.assertEqual(out.rsplit("\n", 1)[1], "200 2")
        self.assertEqual(cluster.wait_exit(20), 0)
        self.assertNotIn("Traceback", cluster.output)
