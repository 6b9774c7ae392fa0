"""Loading --app in its four forms, and calling hooks of every kind."""

import sys
import types

from klein import Klein
from twisted.internet.defer import succeed
from twisted.trial import unittest
from twisted.web.resource import IResource, Resource

from txcluster.app import AppLoadError, Cluster, call_job, load_app


class LoadAppTests(unittest.TestCase):
    def setUp(self):
        module = types.ModuleType("txcluster_test_app_module")
        module.klein_app = Klein()
        module.resource = Resource()
        module.cluster = Cluster(Klein())
        module.factory = lambda: module.cluster
        module.nested = types.SimpleNamespace(app=module.klein_app)
        module.not_an_app = 42
        sys.modules[module.__name__] = module
        self.addCleanup(sys.modules.pop, module.__name__)
        self.module = module

    def load(self, name):
        return load_app(f"txcluster_test_app_module:{name}")

    def test_klein(self):
        cluster = self.load("klein_app")
        self.assertIs(cluster.web, self.module.klein_app)
        self.assertTrue(IResource.providedBy(cluster.resource()))

    def test_resource(self):
        self.assertIs(self.load("resource").resource(), self.module.resource)

    def test_cluster_and_factory(self):
        self.assertIs(self.load("cluster"), self.module.cluster)
        self.assertIs(self.load("factory"), self.module.cluster)

    def test_dotted_attribute(self):
        self.assertIs(self.load("nested.app").web, self.module.klein_app)

    def test_errors(self):
        self.assertRaises(AppLoadError, self.load, "missing")
        error = self.assertRaises(AppLoadError, self.load, "not_an_app")
        self.assertIn("int", str(error))
        self.assertRaises(ImportError, load_app, "no_such_module_here:app")

    def test_demo_is_a_cluster(self):
        self.assertIsInstance(load_app("txcluster.demo:cluster"), Cluster)


class CallJobTests(unittest.TestCase):
    def test_kinds(self):
        async def coroutine():
            return 1

        self.assertEqual(self.successResultOf(call_job(lambda: 2)), 2)
        self.assertEqual(self.successResultOf(call_job(lambda: succeed(3))), 3)
        self.assertEqual(self.successResultOf(call_job(coroutine)), 1)

    def test_exception_becomes_failure(self):
        def boom():
            raise ValueError("x")

        self.failureResultOf(call_job(boom), ValueError)
