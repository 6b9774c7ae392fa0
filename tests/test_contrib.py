"""The files in contrib/ agree with each other."""

import os
import re

from twisted.trial import unittest

CONTRIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "contrib")


def read(name):
    with open(os.path.join(CONTRIB, name)) as f:
        return f.read()


class ContribTests(unittest.TestCase):
    def test_logrotate_falls_back_on_the_pid_file_the_unit_writes(self):
        unit = read("txcluster.service")
        [pidfile] = re.findall(r"^ExecStart=.*--pidfile[= ](\S+)", unit, re.MULTILINE)
        [runtime] = re.findall(r"^RuntimeDirectory=(\S+)", unit, re.MULTILINE)
        self.assertEqual(os.path.dirname(pidfile), f"/run/{runtime}")  # writable there
        self.assertEqual(re.findall(r'kill -USR1 "\$\(cat (\S+) ', read("txcluster.logrotate")),
                         [pidfile])
