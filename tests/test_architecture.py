"""
The layout's rules, read from the code (a few lines of C{ast}):

- no import cycles inside the package;
- the master's side (L{txcluster.master}) never imports the worker's side,
  the app, klein or OpenSSL, and the worker's side never imports the
  master's; what they share is in L{txcluster.wire};
- and, in a real master process, none of those is loaded after it has
  parsed its options and bound its port.
"""

import ast
import json
import os
import subprocess
import sys
from typing import Dict, Set

from twisted.trial import unittest

import txcluster

PACKAGE = os.path.dirname(os.path.abspath(txcluster.__file__))

#: What the master process must never load (a test below also runs one).
NEVER_IN_THE_MASTER = ("klein", "OpenSSL", "txredisapi", "txcluster.worker", "txcluster.app",
                       "txcluster.demo", "txcluster.single", "txcluster.redis",
                       "txcluster.cron")


def module_name(path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-len(".py")]
    parts = relative.split(os.sep)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: str) -> Set[str]:
    """Every module C{path} imports, anywhere in it (lazy imports count),
    absolute, with each imported name that may be a module too."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def package_graph() -> Dict[str, Set[str]]:
    """txcluster module -> the txcluster modules it imports."""
    paths = {}
    for directory, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(directory, file)
                paths[module_name(path)] = path
    return {name: {m for m in imports_of(path) if m in paths and m != name}
            for name, path in paths.items()}


def find_cycle(graph: Dict[str, Set[str]]):
    """One import cycle as a list of modules, or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def side(name: str) -> str:
    for prefix in ("txcluster.master", "txcluster.worker"):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return ""


class LayoutTests(unittest.TestCase):
    def test_no_import_cycles(self):
        self.assertIsNone(find_cycle(package_graph()))

    def test_the_cycle_finder_finds_one(self):
        self.assertEqual(find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}), ["a", "b", "c", "a"])
        self.assertIsNone(find_cycle({"a": {"b"}, "b": set()}))

    def test_each_side_imports_only_itself_and_what_is_shared(self):
        graph = package_graph()
        for name in graph:
            for imported in graph[name]:
                if side(name) and side(imported) and side(imported) != side(name):
                    self.fail(f"{name} imports {imported}: across the process boundary")

    def test_the_master_side_never_imports_the_apps_side(self):
        for directory, _, files in os.walk(os.path.join(PACKAGE, "master")):
            for file in (f for f in files if f.endswith(".py")):
                path = os.path.join(directory, file)
                for imported in imports_of(path):
                    for banned in NEVER_IN_THE_MASTER:
                        if imported == banned or imported.startswith(banned + "."):
                            self.fail(f"{module_name(path)} imports {imported}")

    def test_the_import_reader_sees_relative_and_lazy_imports(self):
        found = imports_of(os.path.join(PACKAGE, "tap.py"))
        self.assertIn("txcluster.master.service", found)  # inside a function
        self.assertIn("txcluster.options", found)


#: Run in a fresh interpreter: parse options and build the master the way
#: twistd does, then list what of NEVER_IN_THE_MASTER got loaded.
_MASTER_PROCESS = """
import json, sys
from txcluster.tap import Options, makeService
options = Options(environ={})
options.parseOptions(sys.argv[2:])  # as twistd: options first, then the reactor
from twisted.internet import reactor
service = makeService(options)
banned = json.loads(sys.argv[1])
print(json.dumps(sorted(m for m, module in sys.modules.items() if module is not None
                        and any(m == b or m.startswith(b + ".") for b in banned))))
"""


class MasterProcessTests(unittest.TestCase):
    def loaded_by_a_master(self, *argv):
        result = subprocess.run(
            [sys.executable, "-c", _MASTER_PROCESS, json.dumps(NEVER_IN_THE_MASTER),
             "--listen", "tcp:0:interface=127.0.0.1", "--workers", "2", *argv],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout.splitlines()[-1])

    def test_a_master_loads_none_of_the_apps_side(self):
        for argv in ([], ["--balance", "kernel"], ["--balance", "reuseport", "--cpu-affinity"]):
            self.assertEqual(self.loaded_by_a_master(*argv), [], argv)

    def test_the_check_sees_a_single_process_load_the_app_side(self):
        self.assertIn("txcluster.worker", self.loaded_by_a_master("--single"))
