"""The demo's SQLite side: a batch of page views is applied once only."""

import os
import shutil
import tempfile

from twisted.trial import unittest

from txcluster.demo import ViewStore


class ViewStoreTests(unittest.TestCase):
    async def test_a_batch_is_applied_once(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        store = ViewStore(os.path.join(directory, "views.sqlite"))
        self.addCleanup(store.close)
        await store.create()
        self.assertTrue(await store.apply("batch:1", {"home": 3, "about": 1}))
        # A flush that died after its commit is finished by the next one,
        # which must not count the batch again.
        self.assertFalse(await store.apply("batch:1", {"home": 3, "about": 1}))
        self.assertTrue(await store.apply("batch:2", {"home": 2}))
        self.assertEqual(await store.totals(), {"about": 1, "home": 5})
        self.assertEqual(await store.total("home"), 5)
        self.assertEqual(await store.total("nowhere"), 0)
