"""How many workers 'auto' means: the CPUs this process may run on, or its
cgroup's CPU quota if lower (v2 cpu.max, v1 cfs quota), on fake trees."""

import os
import shutil
import tempfile

from twisted.trial import unittest

from txcluster.cpus import cgroup_cpu_limit, cpu_for, default_workers, usable_cpus


class CgroupTests(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)

    def write(self, path, text):
        path = os.path.join(self.root, path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def test_v2_quota_rounds_up(self):
        self.write("system.slice/app.service/cpu.max", "150000 100000\n")
        self.assertEqual(cgroup_cpu_limit(self.root, "0::/system.slice/app.service\n"), 2)

    def test_v2_a_parent_limits_too_and_the_lowest_wins(self):
        self.write("kubepods/cpu.max", "100000 100000\n")
        self.write("kubepods/pod1/cpu.max", "max 100000\n")
        self.assertEqual(cgroup_cpu_limit(self.root, "0::/kubepods/pod1\n"), 1)

    def test_v2_no_quota(self):
        self.write("cpu.max", "max 100000\n")
        self.assertIsNone(cgroup_cpu_limit(self.root, "0::/\n"))

    def test_v1_quota(self):
        self.write("cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "200000\n")
        self.write("cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
        membership = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n"
        self.assertEqual(cgroup_cpu_limit(self.root, membership), 2)

    def test_v1_unlimited(self):
        self.write("cpu/cpu.cfs_quota_us", "-1\n")
        self.write("cpu/cpu.cfs_period_us", "100000\n")
        self.assertIsNone(cgroup_cpu_limit(self.root, "1:cpu:/\n"))

    def test_nothing_readable(self):
        self.assertIsNone(cgroup_cpu_limit(self.root, "0::/nowhere\n"))

    def test_a_container_limited_to_2_cpus_on_64_starts_2(self):
        self.assertEqual(default_workers(list(range(64)), 2), 2)
        self.assertEqual(default_workers(list(range(4)), 8), 4)  # affinity is lower
        self.assertEqual(default_workers(list(range(4)), None), 4)


class CpuTests(unittest.TestCase):
    def test_usable_cpus_are_this_process_affinity(self):
        self.assertEqual(usable_cpus(), sorted(os.sched_getaffinity(0)))

    def test_workers_take_the_cpus_in_turn(self):
        self.assertEqual([cpu_for(i, [4, 6]) for i in (1, 2, 3)], [4, 6, 4])


class WithoutAffinityCallsTests(unittest.TestCase):
    """macOS has neither os.sched_getaffinity nor os.sched_setaffinity:
    'auto' falls back to os.cpu_count, and --cpu-affinity pins nothing,
    with a note for each worker, while the worker still starts."""

    def setUp(self):
        for name in ("sched_getaffinity", "sched_setaffinity"):
            self.addCleanup(setattr, os, name, getattr(os, name))
            delattr(os, name)

    def test_workers_auto_is_the_cpu_count(self):
        from txcluster.options import usable_cpu_count

        self.assertFalse(hasattr(os, "sched_getaffinity"))
        self.assertEqual(usable_cpus(), list(range(os.cpu_count())))
        self.assertEqual(usable_cpu_count(), default_workers(usable_cpus(), cgroup_cpu_limit()))

    def test_pinning_is_skipped_with_a_note(self):
        from twisted.logger import formatEvent, globalLogPublisher

        from txcluster.cpus import Pinning
        from txcluster.master.process import WorkerSpawner
        from txcluster.master.supervisor import Worker
        from txcluster.settings import Settings

        class SpawningReactor:
            """Starts nothing; the process gets a pid as a real one would."""

            def spawnProcess(self, protocol, *args, **kwargs):
                protocol.pid = 4242

        class Listeners:
            def steers(self, worker_id):
                return False

        notes = []
        observer = lambda event: notes.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        spawner = WorkerSpawner(SpawningReactor(), Settings(cpu_affinity=True),
                                listeners=Listeners(),
                                pinning=Pinning(usable_cpus()), environ={})
        protocol = Worker(supervisor=None, worker_id=1, now=0.0,
                          spawn=lambda worker: spawner(worker, 1)).process
        self.addCleanup(protocol.channel.socket.close)
        self.assertIsNone(protocol.channel.cpu)  # round-robin deals to it as to any worker
        self.assertEqual([note for note in notes if "pin" in note],
                         ["could not pin worker 1 to CPU 0: "
                          "module 'os' has no attribute 'sched_setaffinity'"])
