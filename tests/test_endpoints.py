"""
Endpoint types other than tcp: a Unix socket and TLS, served by workers in
every balance mode (reuseport takes TLS but not Unix sockets).
"""

import datetime
import ipaddress
import json
import os
import socket
import ssl

from txcluster.testing import wait_until

from .integration import ClusterTestCase


def get_json(connected: socket.socket, path: str = "/") -> dict:
    """One HTTP/1.0 GET on a connected socket (plain or TLS): the JSON body
    of a 200 answer."""
    connected.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
    response = b""
    while chunk := connected.recv(65536):
        response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return json.loads(body)


def get_over_unix_socket(path: str) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        return get_json(s)


def get_over_tls(port: int, cert: str, path: str = "/") -> dict:
    """GET over TLS on 127.0.0.1, trusting only C{cert}."""
    context = ssl.create_default_context(cafile=cert)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return get_json(tls, path)


def self_signed(directory: str) -> tuple:
    """A throwaway key and certificate for 127.0.0.1, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256()))
    key_path = os.path.join(directory, "key.pem")
    cert_path = os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class UnixSocketTests(ClusterTestCase):
    def test_workers_serve_a_unix_socket(self):
        path = self.path("tx.sock")
        cluster = self.start(app=None, workers=2, listen=f"unix:{path}")
        self.assertIn(f"listening on {path}", cluster.output)
        seen = set()
        wait_until(lambda: seen.add(get_over_unix_socket(path)["worker"]) or len(seen) == 2,
                   20, "both workers over the unix socket")


class TLSTests(ClusterTestCase):
    def test_workers_terminate_tls(self):
        key, cert = self_signed(self.directory())
        cluster = self.start(app=None, workers=2,
                             listen=f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1")
        port = int(cluster.url.rsplit(":", 1)[1])
        seen = set()
        wait_until(lambda: seen.add(get_over_tls(port, cert)["worker"]) or len(seen) == 2,
                   20, "both workers over TLS")

    def test_single_process_terminates_tls(self):
        key, cert = self_signed(self.directory())
        cluster = self.start(app=None, workers=0,
                             listen=f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1")
        port = int(cluster.url.rsplit(":", 1)[1])
        self.assertEqual(get_over_tls(port, cert, "/health"), {"status": "ok", "worker": 1})

    def test_missing_certificate_is_a_usage_error(self):
        cluster = self.start(app=None, workers=1, ready=0,
                             listen="ssl:0:privateKey=/no/key.pem:interface=127.0.0.1")
        self.assertNotEqual(cluster.wait_exit(20), 0)
        self.assertIn("--listen", cluster.output)
        self.assertNotIn("Traceback", cluster.output)


class KernelBalanceUnixSocketTests(UnixSocketTests):
    cluster_args = ("--balance", "kernel")


class KernelBalanceTLSTests(TLSTests):
    cluster_args = ("--balance", "kernel")


class SystemdSocketActivationTests(ClusterTestCase):
    """systemd passes the bound socket as fd 3 (LISTEN_FDS, LISTEN_FDNAMES and
    LISTEN_PID, which exec keeps: the helper execs twistd in its place)."""

    def test_workers_serve_the_inherited_socket(self):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            port = listener.getsockname()[1]
            cluster = self.start(app=None, workers=2, inherit=listener.fileno(),
                                 listen="systemd:domain=INET:index=0")
        self.assertEqual(cluster.url, f"http://127.0.0.1:{port}")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            self.assertIn(b"200", s.recv(100))


class ReusePortTLSTests(TLSTests):
    cluster_args = ("--balance", "reuseport")
