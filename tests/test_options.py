"""Options: every layer, the precedence between them, and bad values."""

import os
import shutil
import tempfile

from twisted.python import usage
from twisted.trial import unittest

from txcluster.options import SETTINGS, ClusterOptions
from txcluster.settings import Settings

#: The checkout, found at import time: trial runs tests from its own temp directory.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv=(), environ=None, cpus=3):
    options = ClusterOptions(environ={} if environ is None else environ,
                             cpu_count=lambda: cpus)
    options.parseOptions(list(argv))
    return options.settings


def parse_steering(argv=(), environ=None, steers=True, cpus=3):
    """Parse as on a kernel that does (or does not) steer by CPU."""
    options = ClusterOptions(environ={} if environ is None else environ,
                             cpu_count=lambda: cpus, kernel_steers=lambda: steers)
    options.parseOptions(list(argv))
    return options.settings


class DefaultsTests(unittest.TestCase):
    def test_defaults(self):
        settings = parse()
        self.assertEqual(settings.listen, "tcp:8080")
        self.assertEqual(settings.workers, 3)
        self.assertFalse(settings.single)
        self.assertEqual(settings.app, "txcluster.demo:cluster")
        self.assertIsNone(settings.redis)
        self.assertEqual(settings.shutdown_timeout, 30.0)
        self.assertIsNone(settings.access_log)
        self.assertEqual(settings.warnings, ())

    def test_workers_auto_means_usable_cpus(self):
        self.assertEqual(parse(["--workers", "auto"], cpus=5).workers, 5)
        self.assertEqual(parse(["-w", "AUTO"], cpus=7).workers, 7)

    def test_default_cpu_count_is_the_affinity_mask(self):
        options = ClusterOptions(environ={})
        options.parseOptions([])
        self.assertEqual(options.settings.workers, len(os.sched_getaffinity(0)))

    def test_far_more_workers_than_cpus_warns(self):
        self.assertEqual(parse(["--workers", "8"], cpus=2).warnings, ())
        [warning] = parse(["--workers", "9"], cpus=2).warnings
        self.assertIn("9 workers (from --workers) on 2 usable CPUs", warning)
        self.assertEqual(parse(["--workers", "9", "--single"], cpus=2).warnings, ())

    def test_short_options(self):
        settings = parse(["-l", "tcp:9000", "-w", "2", "-a", "pkg.mod:app"])
        self.assertEqual((settings.listen, settings.workers, settings.app),
                         ("tcp:9000", 2, "pkg.mod:app"))


class CommandLineErrorTests(unittest.TestCase):
    def assertUsageError(self, argv, *fragments):
        error = self.assertRaises(usage.UsageError, parse, argv)
        message = str(error)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_bad_worker_counts(self):
        for value in ["0", "-3", "abc", "1.5", ""]:
            self.assertUsageError(["--workers", value], "--workers", repr(value))

    def test_malformed_endpoint(self):
        self.assertUsageError(["--listen", "tcp:notaport"], "--listen", "tcp:notaport")
        self.assertUsageError(["--listen", "carrier-pigeon:1"], "--listen", "carrier-pigeon")

    def test_bad_app(self):
        self.assertUsageError(["--app", "no-colon"], "--app", "no-colon")

    def test_bad_timeout(self):
        self.assertUsageError(["--shutdown-timeout", "-1"], "--shutdown-timeout", "-1")
        self.assertUsageError(["--shutdown-timeout", "soon"], "--shutdown-timeout")

    def test_bad_redis_url(self):
        self.assertUsageError(["--redis", "localhost:6379"], "--redis", "localhost:6379")

    def test_unknown_option(self):
        self.assertRaises(usage.UsageError, parse, ["--wrokers", "2"])

    def test_balance_modes(self):
        for mode in ("round-robin", "kernel", "reuseport"):
            self.assertEqual(parse(["--balance", mode]).balance, mode)
        self.assertIn(parse(["--balance", "auto"]).balance, ("round-robin", "reuseport"))
        self.assertUsageError(["--balance", "random"], "--balance", "'random'", "reuseport")

    def test_balance_auto_is_the_default(self):
        """Where the kernel steers connections by CPU and --listen is TCP:
        reuseport, each worker pinned to a CPU, and the log says so."""
        for argv, environ in (([], {}), (["--balance", "auto"], {}),
                              ([], {"TXCLUSTER_BALANCE": "auto"})):
            settings = parse_steering(argv, environ, steers=True, cpus=3)
            self.assertEqual((settings.balance, settings.cpu_affinity), ("reuseport", True))
            self.assertEqual(settings.notes,
                             ("balance auto: reuseport, with each worker pinned to a CPU",))

    def test_balance_auto_elsewhere_is_round_robin(self):
        """An older kernel, or a socket reuseport cannot bind more of."""
        settings = parse_steering([], steers=False)
        self.assertEqual((settings.balance, settings.cpu_affinity), ("round-robin", False))
        self.assertEqual(settings.notes, ("balance auto: round-robin, since the kernel does not "
                                          "steer connections by CPU (Linux 6.2 does)",))
        settings = parse_steering(["-l", "unix:/tmp/t.sock"], steers=True)
        self.assertEqual(settings.balance, "round-robin")
        self.assertEqual(settings.notes, ("balance auto: round-robin, since --listen is not "
                                          "TCP (unix:)",))
        self.assertEqual(parse_steering(["-l", "haproxy:tcp:0"], steers=True).balance,
                         "reuseport")

    def test_balance_auto_pins_only_what_it_can_spread(self):
        """Fewer workers than CPUs, or one CPU: reuseport without pinning."""
        for argv, cpus in ((["-w", "1"], 4), (["-w", "3"], 1), (["-w", "3"], 4)):
            settings = parse_steering(argv, steers=True, cpus=cpus)
            self.assertEqual((settings.balance, settings.cpu_affinity), ("reuseport", False))
        settings = parse_steering(["-w", "1", "--cpu-affinity"], steers=True, cpus=4)
        self.assertTrue(settings.cpu_affinity)

    def test_explicit_modes_are_kept(self):
        for mode in ("round-robin", "kernel", "reuseport"):
            settings = parse_steering(["--balance", mode], steers=True, cpus=4)
            self.assertEqual((settings.balance, settings.cpu_affinity, settings.notes),
                             (mode, False, ()))
        self.assertEqual(parse_steering(["--single"], steers=True).notes, ())

    def test_notes_are_the_master_s_only(self):
        settings = parse_steering([], steers=True, cpus=4)
        self.assertEqual(Settings.from_json(settings.to_json()).notes, ())

    def test_reuseport_needs_a_tcp_endpoint(self):
        for endpoint in ("tcp:0", "tcp6:0:interface=\\:\\:1"):
            self.assertEqual(parse(["--balance", "reuseport", "-l", endpoint]).listen, endpoint)
        self.assertUsageError(["--balance", "reuseport", "-l", "unix:/tmp/t.sock"],
                              "--balance reuseport needs a tcp:", "'unix:/tmp/t.sock'")
        settings = parse(["-l", "unix:/tmp/t.sock"], environ={"TXCLUSTER_BALANCE": "reuseport"})
        self.assertEqual(settings.balance, "round-robin")
        self.assertEqual(settings.warnings, (
            "ignoring TXCLUSTER_BALANCE='reuseport': it needs a tcp:, tcp6: or ssl: --listen, "
            "not 'unix:/tmp/t.sock'; using the default",))
        # --single has one socket anyway
        self.assertTrue(parse(["--single", "--balance", "reuseport", "-l", "unix:/tmp/t.sock"]).single)


class EnvironmentTests(unittest.TestCase):
    def test_web_concurrency(self):
        self.assertEqual(parse(environ={"WEB_CONCURRENCY": "5"}).workers, 5)

    def test_bad_web_concurrency_warns_and_uses_default(self):
        for value in ["-1", "abc", "0"]:
            settings = parse(environ={"WEB_CONCURRENCY": value}, cpus=2)
            self.assertEqual(settings.workers, 2)
            self.assertEqual(len(settings.warnings), 1)
            self.assertIn("WEB_CONCURRENCY", settings.warnings[0])
            self.assertIn(repr(value), settings.warnings[0])

    def test_clustering_enabled(self):
        for value in ["false", "0", "no", "off", "FALSE"]:
            self.assertTrue(parse(environ={"CLUSTERING_ENABLED": value}).single, value)
        for value in ["true", "1", "yes", "on"]:
            self.assertFalse(parse(environ={"CLUSTERING_ENABLED": value}).single, value)

    def test_bad_clustering_enabled_warns(self):
        settings = parse(environ={"CLUSTERING_ENABLED": "maybe"})
        self.assertFalse(settings.single)
        self.assertIn("CLUSTERING_ENABLED", settings.warnings[0])

    def test_port_means_tcp_port(self):
        self.assertEqual(parse(environ={"PORT": "5000"}).listen, "tcp:5000")

    def test_txcluster_listen_beats_port(self):
        settings = parse(environ={"PORT": "5000", "TXCLUSTER_LISTEN": "tcp:6000"})
        self.assertEqual(settings.listen, "tcp:6000")

    def test_unparseable_listen_variable_warns(self):
        for value in ["tcp:abc", "nonsense"]:
            settings = parse(environ={"TXCLUSTER_LISTEN": value})
            self.assertEqual(settings.listen, "tcp:8080")
            self.assertIn("TXCLUSTER_LISTEN", settings.warnings[0])

    def test_bad_port_warns(self):
        settings = parse(environ={"PORT": "http"})
        self.assertEqual(settings.listen, "tcp:8080")
        self.assertIn("PORT", settings.warnings[0])

    def test_other_variables(self):
        settings = parse(environ={
            "TXCLUSTER_APP": "a.b:c", "REDIS_URL": "redis://localhost:6379/2",
            "TXCLUSTER_SHUTDOWN_TIMEOUT": "7.5", "TXCLUSTER_ACCESS_LOG": "-",
        })
        self.assertEqual(settings.app, "a.b:c")
        self.assertEqual(settings.redis, "redis://localhost:6379/2")
        self.assertEqual(settings.shutdown_timeout, 7.5)
        self.assertEqual(settings.access_log, "-")

    def test_command_line_beats_environment(self):
        settings = parse(["--workers", "4"], environ={"WEB_CONCURRENCY": "9"})
        self.assertEqual(settings.workers, 4)

    def test_single_flag_beats_clustering_enabled(self):
        self.assertTrue(parse(["--single"], environ={"CLUSTERING_ENABLED": "true"}).single)

    def test_cpu_affinity_is_off_unless_asked(self):
        """(Or unless --balance auto chose it: test_balance_auto_is_the_default.)"""
        rr = ["--balance", "round-robin"]
        self.assertFalse(parse(rr).cpu_affinity)
        self.assertTrue(parse([*rr, "--cpu-affinity"]).cpu_affinity)
        self.assertTrue(parse(rr, environ={"TXCLUSTER_CPU_AFFINITY": "yes"}).cpu_affinity)
        settings = parse(rr, environ={"TXCLUSTER_CPU_AFFINITY": "sometimes"})
        self.assertFalse(settings.cpu_affinity)
        self.assertIn("TXCLUSTER_CPU_AFFINITY='sometimes'", settings.warnings[0])

    def test_cpu_affinity_with_single_warns(self):
        settings = parse(["--single"], environ={"TXCLUSTER_CPU_AFFINITY": "1"})
        self.assertEqual(settings.warnings, (
            "ignoring cpu-affinity (from TXCLUSTER_CPU_AFFINITY): "
            "there are no workers to pin with --single",))

    def test_what_single_ignores_is_one_warning_each(self):
        given = {
            "--metrics": ("tcp:9100", "ignoring metrics (from --metrics): the master serves "
                          "them, and there is none with --single"),
            "--control": ("/run/t.sock", "ignoring control (from --control): the txcluster "
                          "command talks to a master, and there is none with --single"),
            "--max-requests": ("1000", "ignoring max-requests (from --max-requests): there are "
                               "no workers to recycle with --single"),
            "--max-memory": ("500", "ignoring max-memory (from --max-memory): there are no "
                             "workers to recycle with --single"),
        }
        for option, (value, warning) in given.items():
            self.assertEqual(parse(["--single", option, value]).warnings, (warning,), option)
            self.assertEqual(parse([option, value]).warnings, (), option)

    def test_single_under_systemd_does_not_warn_about_the_implied_control_socket(self):
        settings = parse(["--single"], environ={"RUNTIME_DIRECTORY": "/run/txcluster"})
        self.assertEqual(settings.warnings, ())

    def test_control_defaults_to_systemds_runtime_directory(self):
        self.assertIsNone(parse().control)
        self.assertEqual(parse(environ={"RUNTIME_DIRECTORY": "/run/txcluster"}).control,
                         "/run/txcluster/txcluster.sock")
        # RuntimeDirectory= with several directories: the first one
        self.assertEqual(parse(environ={"RUNTIME_DIRECTORY": "/run/a:/run/b"}).control,
                         "/run/a/txcluster.sock")
        for given in (["--control", "/tmp/c.sock"], []):
            environ = {"RUNTIME_DIRECTORY": "/run/txcluster"}
            if not given:
                environ["TXCLUSTER_CONTROL"] = "/tmp/c.sock"
            self.assertEqual(parse(given, environ=environ).control, "/tmp/c.sock")


class ConfigFileTests(unittest.TestCase):
    def write(self, text):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "txcluster.ini")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_values(self):
        path = self.write("[txcluster]\nworkers = 6\nshutdown-timeout = 3\n"
                          "single = yes\naccess_log = /tmp/access.log\ncpu-affinity = on\n")
        settings = parse(["--config", path])
        self.assertTrue(settings.cpu_affinity)
        self.assertEqual(settings.workers, 6)
        self.assertEqual(settings.shutdown_timeout, 3.0)
        self.assertTrue(settings.single)
        self.assertEqual(settings.access_log, "/tmp/access.log")
        self.assertEqual(settings.config, path)

    def test_bad_config_from_environment_warns(self):
        settings = parse(environ={"TXCLUSTER_CONFIG": "/no/such/file.ini"})
        self.assertEqual(settings.workers, 3)
        self.assertIn("TXCLUSTER_CONFIG", settings.warnings[0])
        self.assertIsNone(settings.config)

    def test_config_from_environment(self):
        path = self.write("[txcluster]\nworkers = 6\n")
        self.assertEqual(parse(environ={"TXCLUSTER_CONFIG": path}).workers, 6)

    def test_precedence(self):
        path = self.write("[txcluster]\nworkers = 6\nlisten = tcp:7000\napp = from.config:app\n")
        settings = parse(["--config", path, "--workers", "2"],
                         environ={"TXCLUSTER_LISTEN": "tcp:7100"})
        self.assertEqual(settings.workers, 2)  # command line
        self.assertEqual(settings.listen, "tcp:7100")  # environment
        self.assertEqual(settings.app, "from.config:app")  # config file
        self.assertEqual(settings.shutdown_timeout, 30.0)  # default

    def test_bad_environment_falls_back_to_config_file(self):
        path = self.write("[txcluster]\nworkers = 6\n")
        settings = parse(["--config", path], environ={"WEB_CONCURRENCY": "lots"})
        self.assertEqual(settings.workers, 6)
        self.assertIn("WEB_CONCURRENCY", settings.warnings[0])

    def test_unknown_key(self):
        path = self.write("[txcluster]\nwrokers = 6\n")
        error = self.assertRaises(usage.UsageError, parse, ["--config", path])
        self.assertIn("wrokers", str(error))
        self.assertIn(path, str(error))

    def test_bad_endpoint_in_config_file(self):
        path = self.write("[txcluster]\nlisten = tcp:abc\n")
        error = self.assertRaises(usage.UsageError, parse, ["--config", path])
        self.assertIn("listen = 'tcp:abc'", str(error))

    def test_reuseport_with_a_unix_socket_in_config_file(self):
        path = self.write("[txcluster]\nbalance = reuseport\nlisten = unix:/tmp/t.sock\n")
        error = self.assertRaises(usage.UsageError, parse, ["--config", path])
        self.assertIn(f"--config {path}: balance = reuseport needs a tcp:", str(error))

    def test_bad_value_names_key_and_value(self):
        path = self.write("[txcluster]\nworkers = -3\n")
        error = self.assertRaises(usage.UsageError, parse, ["--config", path])
        self.assertIn("workers", str(error))
        self.assertIn("'-3'", str(error))

    def test_missing_file_and_missing_section(self):
        self.assertRaises(usage.UsageError, parse, ["--config", "/no/such/file.ini"])
        path = self.write("[other]\nworkers = 2\n")
        self.assertRaises(usage.UsageError, parse, ["--config", path])
        path = self.write("workers = 2\n")
        self.assertRaises(usage.UsageError, parse, ["--config", path])

    def test_shipped_twistd_conf_is_valid(self):
        settings = parse(["--config", os.path.join(ROOT, "twistd.conf")])
        self.assertEqual(settings.app, "txcluster.demo:cluster")


class EnvFileTests(unittest.TestCase):
    def test_loaded_into_environment_which_wins(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, ".env")
        with open(path, "w") as f:
            f.write("WEB_CONCURRENCY=5\nexport PORT=9100\nAPP_SECRET='s3 cret'\n")
        environ = {"PORT": "9200"}
        settings = parse(["--env-file", path], environ=environ)
        self.assertEqual(settings.workers, 5)
        self.assertEqual(settings.listen, "tcp:9200")
        self.assertEqual(environ["APP_SECRET"], "s3 cret")

    def test_missing_env_file(self):
        error = self.assertRaises(usage.UsageError, parse, ["--env-file", "/no/.env"])
        self.assertIn("/no/.env", str(error))


class SettingsTests(unittest.TestCase):
    def test_defaults_agree_with_the_table(self):
        """(Except --balance: the table's auto is resolved by choose_balance,
        and a Settings holds what it chose.)"""
        defaults = Settings()
        self.assertEqual(defaults.balance, "round-robin")
        for setting in SETTINGS:
            if setting.default is not None and setting.name != "balance":
                self.assertEqual(getattr(defaults, setting.attribute), setting.default,
                                 setting.name)

    def test_json_round_trip(self):
        settings = Settings(workers=3, redis="redis://x", warnings=("w",))
        copy = Settings.from_json(settings.to_json())
        self.assertEqual(copy.workers, 3)
        self.assertEqual(copy.redis, "redis://x")
        self.assertEqual(copy.warnings, ())


class HttpEdgeOptionTests(unittest.TestCase):
    """The contract's table of HTTP edge options: defaults, every layer,
    and a one-line error for each bad value."""

    EDGE = {
        # option: (environment variable, default, a good value, its result, bad values)
        "forwarded-allow-ips": ("FORWARDED_ALLOW_IPS", "127.0.0.1", "10.0.0.0/8, ::1",
                                "10.0.0.0/8,::1/128", ["proxy.local", "10.0.0.300", "10.0.0.1/99"]),
        "keep-alive": ("TXCLUSTER_KEEP_ALIVE", 5.0, "0", 0.0, ["-1", "forever"]),
        "header-timeout": ("TXCLUSTER_HEADER_TIMEOUT", 10.0, "2.5", 2.5, ["0", "soon"]),
        "limit-request-line": ("TXCLUSTER_LIMIT_REQUEST_LINE", 8190, "4094", 4094, ["-1", "4k"]),
        "limit-request-fields": ("TXCLUSTER_LIMIT_REQUEST_FIELDS", 100, "0", 0, ["many"]),
        "limit-request-field-size": ("TXCLUSTER_LIMIT_REQUEST_FIELD_SIZE", 8190, "100", 100,
                                     ["1.5"]),
        "limit-request-body": ("TXCLUSTER_LIMIT_REQUEST_BODY", 0, "1048576", 1048576, ["1MB"]),
        "backlog": ("TXCLUSTER_BACKLOG", 2048, "128", 128, ["0", "lots"]),
    }

    def test_defaults(self):
        settings = parse()
        for option, (_, default, *_) in self.EDGE.items():
            self.assertEqual(getattr(settings, option.replace("-", "_")), default, option)

    def test_command_line_and_environment(self):
        for option, (variable, _, good, result, _) in self.EDGE.items():
            attribute = option.replace("-", "_")
            self.assertEqual(getattr(parse([f"--{option}", good]), attribute), result, option)
            self.assertEqual(getattr(parse(environ={variable: good}), attribute), result, option)

    def test_bad_values_are_one_line_usage_errors_naming_the_option(self):
        for option, (_, _, _, _, bad_values) in self.EDGE.items():
            for bad in bad_values:
                error = self.assertRaises(usage.UsageError, parse, [f"--{option}", bad])
                self.assertNotIn("\n", str(error))
                self.assertIn(f"--{option}", str(error))
                self.assertIn(repr(bad), str(error))

    def test_everyone(self):
        self.assertEqual(parse(["--forwarded-allow-ips", "*"]).forwarded_allow_ips, "*")

    def test_haproxy_endpoints_may_use_reuseport(self):
        settings = parse(["--listen", "haproxy:tcp:0", "--balance", "reuseport"])
        self.assertEqual(settings.balance, "reuseport")
