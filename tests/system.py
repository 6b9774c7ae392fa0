"""
The system's programs some integration tests drive (haproxy, nginx, curl):
a test that needs one that is missing fails, in one line naming the Debian
package that brings it, and never passes as skipped.  README.rst's test
command installs them first (C{.ci/system-packages}).
"""

import shutil

from twisted.trial import unittest


def installed(command: str, package: str) -> str:
    """The path of C{command} (on the C{PATH} or in the sbin folders), or
    the test fails naming C{package}."""
    found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
    if found is None:
        raise unittest.FailTest(f"{command} is not installed: .ci/system-packages installs "
                                f"it (Debian package {package})")
    return found
