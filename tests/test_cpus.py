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
