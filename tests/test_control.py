"""
The control socket and the txcluster command, without processes: the
master's answers over AMP (through a pump of StringTransports), the
command's parsing and output, and the socket file's rules.
"""

import json
import os
import socket
import stat
import tempfile

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.amp import AMP
from twisted.trial import unittest

from txcluster.cli import _exited, _one_line, parse, status_table
from txcluster.control import ControlError, Reload, Scale, Status, Stop
from txcluster.master.control import ControlProtocol, take_over_stale_socket
from txcluster.master.sockets import StartupError


class FakeMaster:
    def __init__(self):
        self.reactor = Clock()
        self.stops = 0
        self.scaled = []
        self.reloaded = Deferred()

    def status(self):
        return {"pid": 1, "uptime": 5.0, "listen": "127.0.0.1:8080", "balance": "round-robin",
                "workers": [{"id": 1, "pid": 2, "state": "ready", "uptime": 4.0,
                             "requests": 12, "rss": 50 * 1048576}]}

    async def scale_to(self, count):
        self.scaled.append(count)
        if count == 99:
            raise ControlError("worker 3 (pid 9) exited with status 4 before it was ready")

    def reload(self):
        return self.reloaded

    def stop_gracefully(self):
        self.stops += 1


class ProtocolTests(unittest.TestCase):
    def setUp(self):
        self.master = FakeMaster()
        self.server = ControlProtocol(self.master)
        self.client = AMP()
        self.to_server, self.to_client = StringTransport(), StringTransport()
        self.client.makeConnection(self.to_server)
        self.server.makeConnection(self.to_client)

    def pump(self):
        while self.to_server.value() or self.to_client.value():
            for transport, receiver in ((self.to_server, self.server),
                                        (self.to_client, self.client)):
                data = transport.value()
                transport.clear()
                receiver.dataReceived(data)

    def ask(self, command, **arguments):
        """The answers so far: [] until the master answers."""
        answers = []
        self.client.callRemote(command, **arguments).addBoth(answers.append)
        self.pump()
        return answers

    def error(self, answers):
        [failure] = answers
        failure.trap(ControlError)
        return _one_line(failure.value)

    def test_status_is_one_json_object(self):
        [answer] = self.ask(Status)
        self.assertEqual(json.loads(answer["status"])["workers"][0]["state"], "ready")

    def test_scale_answers_once_the_workers_are_ready(self):
        self.assertEqual(self.ask(Scale, count=3), [{}])
        self.assertEqual(self.master.scaled, [3])

    def test_scale_errors_are_one_line_for_the_command(self):
        self.assertIn("worker 3", self.error(self.ask(Scale, count=99)))
        self.assertEqual(self.error(self.ask(Scale, count=0)),
                         "cannot scale to 0: at least 1 worker")

    def test_reload_answers_when_done_or_names_what_failed(self):
        answers = self.ask(Reload)
        self.assertEqual(answers, [])  # not before the restart is over
        self.master.reloaded.callback("worker 2 (pid 7) exited with status 4 before it was ready")
        self.pump()
        self.assertIn("worker 2 (pid 7)", self.error(answers))

    def test_a_reload_that_succeeds(self):
        answers = self.ask(Reload)
        self.master.reloaded.callback(None)
        self.pump()
        self.assertEqual(answers, [{}])

    def test_stop_answers_with_the_pid_then_stops(self):
        [answer] = self.ask(Stop)
        self.assertEqual(answer["pid"], os.getpid())
        self.master.reactor.advance(0)
        self.assertEqual(self.master.stops, 1)


class CommandLineTests(unittest.TestCase):
    def test_control_comes_from_the_option_or_the_environment(self):
        self.assertEqual(parse(["--control", "/a", "status"], {}).control, "/a")
        self.assertEqual(parse(["status", "--json"], {"TXCLUSTER_CONTROL": "/b"}).control, "/b")

    def test_usage_errors_are_one_line(self):
        for argv, named in ((["status"], "--control"), (["--control", "/a", "scale", "x"], "'x'"),
                            (["--control", "/a", "scale", "0"], "at least 1"),
                            (["--control", "/a", "frobnicate"], "frobnicate")):
            error = self.assertRaises(SystemExit, parse, argv, {})
            self.assertEqual(error.code, 2)

    def test_status_table(self):
        table = status_table(FakeMaster().status())
        self.assertIn("master pid 1, up 5s, listening on 127.0.0.1:8080 (round-robin)", table)
        self.assertRegex(table.splitlines()[-1], r"^\s+1\s+2\s+ready\s+4s\s+12\s+50.0 MiB$")


class SocketFileTests(unittest.TestCase):
    def setUp(self):
        self.directory = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, self.directory)
        self.path = os.path.join(self.directory, "control.sock")

    def bound(self, listening):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        if listening:
            s.listen(1)
        self.addCleanup(lambda: os.path.exists(self.path) and os.unlink(self.path))
        self.addCleanup(s.close)
        return s

    def test_a_stale_socket_is_replaced(self):
        self.bound(listening=False)  # bound, nobody accepts: connect is refused
        take_over_stale_socket(self.path)
        self.assertFalse(os.path.exists(self.path))

    def test_a_live_one_is_an_error(self):
        self.bound(listening=True)
        error = self.assertRaises(StartupError, take_over_stale_socket, self.path)
        self.assertIn("already answers", str(error))

    def test_a_file_that_is_no_socket_is_left_alone(self):
        with open(self.path, "w"):
            pass
        self.addCleanup(os.unlink, self.path)
        self.assertRaises(StartupError, take_over_stale_socket, self.path)
        self.assertTrue(os.path.isfile(self.path))

    def test_the_master_listens_with_mode_0600(self):
        from twisted.internet import reactor

        from txcluster.master.control import ControlFactory, listen_control

        port = listen_control(reactor, self.path, ControlFactory(FakeMaster()))
        self.addCleanup(port.stopListening)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_the_socket_file_is_0600_from_the_moment_it_is_bound(self):
        """Twisted binds, then chmods to mode=: the umask closes that gap.
        This reactor binds as Twisted does and does not chmod at all."""
        from txcluster.master.control import ControlFactory, listen_control

        created = []

        class BindOnly:
            def listenUNIX(self, path, factory, mode):
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                server.bind(path)
                created.append(stat.S_IMODE(os.stat(path).st_mode))
                return server

        before = os.umask(0o022)  # a usual umask: bind() alone would make it 0755
        self.addCleanup(os.umask, before)
        server = listen_control(BindOnly(), self.path, ControlFactory(FakeMaster()))
        self.addCleanup(os.unlink, self.path)
        self.addCleanup(server.close)
        self.assertEqual(created, [0o600])
        self.assertEqual(os.umask(0o022), 0o022)  # restored

    def test_the_umask_is_restored_when_binding_fails(self):
        from txcluster.master.control import ControlFactory, listen_control

        class Failing:
            def listenUNIX(self, path, factory, mode):
                raise OSError("no")

        before = os.umask(0o022)
        self.addCleanup(os.umask, before)
        self.assertRaises(StartupError, listen_control, Failing(), self.path,
                          ControlFactory(FakeMaster()))
        self.assertEqual(os.umask(0o022), 0o022)


class StopWaitsForTheMasterToExitTests(unittest.TestCase):
    """C{txcluster stop} returns once the master process is gone, not when
    its reactor closes the control connection (twistd still has work to do
    after that: the pid file, the logs, the interpreter's exit)."""

    def client(self, pid):
        client = type("Client", (), {})()
        client.closed = Deferred()
        client.peer_pid = pid
        return client

    def test_waits_for_the_process_after_the_connection_closes(self):
        import subprocess
        import sys

        clock = Clock()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        client = self.client(child.pid)
        done = []
        ensureDeferred(_exited(clock, client, 10)).addCallback(done.append)
        client.closed.callback(None)
        clock.advance(1)
        self.assertEqual(done, [])
        child.kill()
        child.wait()
        clock.advance(0.02)
        self.assertEqual(done, [True])

    def test_gives_up_at_the_timeout(self):
        clock = Clock()
        client = self.client(os.getpid())
        done = []
        ensureDeferred(_exited(clock, client, 10)).addCallback(done.append)
        client.closed.callback(None)
        clock.pump([0.02] * 501)
        self.assertEqual(done, [False])
