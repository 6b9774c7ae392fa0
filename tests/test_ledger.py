"""
The shared ledger of each worker's load (reuseport mode): the rule a worker
keeps a connection by, and the numbers the master and the workers share.
"""

import os

from twisted.trial import unittest

from txcluster.ledger import (
    BURST, MAX_ROWS, MAX_SERVED_SLACK, Ledger, LedgerSlot, Load, keeps, least_loaded, served_slack,
    share,
)


class RuleTests(unittest.TestCase):
    def test_slack_none_while_one_client_at_a_time(self):
        """No more connections open than workers: exactly round-robin,
        however fast they come."""
        self.assertEqual(served_slack(400, {1: Load(1, 0), 2: Load(0, 0)}), 0)
        self.assertEqual(served_slack(400, {1: Load(1, 0), 2: Load(1, 0)}), 0)

    def test_slack_grows_with_the_rate_under_load(self):
        """A quarter of the connections of the last window beyond a burst,
        at most 8 per connection open beyond one per worker, never more
        than the cap."""
        busy = {1: Load(20, 0), 2: Load(20, 0)}
        self.assertEqual(served_slack(0, busy), 0)
        self.assertEqual(served_slack(BURST + 400, busy), 100)
        self.assertEqual(served_slack(BURST + 400, {1: Load(3, 0), 2: Load(1, 0)}), 16)
        self.assertEqual(served_slack(10**6, busy), MAX_SERVED_SLACK)

    def test_no_slack_for_a_burst(self):
        """Up to a burst of connections in the last window (keep-alive
        clients starting, a pool opening) earns no slack: they are shared
        exactly."""
        busy = {1: Load(20, 0), 2: Load(20, 0)}
        self.assertEqual(served_slack(BURST, busy), 0)
        self.assertEqual(served_slack(BURST + 4, busy), 1)

    def test_least_loaded(self):
        """Fewest open connections first, then fewest served, then the lowest id."""
        self.assertEqual(least_loaded({1: Load(3, 0), 2: Load(2, 50)}), 2)
        self.assertEqual(least_loaded({1: Load(2, 9), 2: Load(2, 8)}), 2)
        self.assertEqual(least_loaded({2: Load(0, 0), 1: Load(0, 0)}), 1)
        self.assertIsNone(least_loaded({}))

    def test_idle_cluster_goes_round_robin(self):
        """One connection at a time, each one the kernel gives worker 1 (a
        client on its CPU): it keeps one in two, as round-robin would."""
        loads = {1: Load(0, 0), 2: Load(0, 0)}
        kept = []
        for _ in range(6):
            kept += share(loads, 1, 1, slack=0)
            loads = {row: Load(0, load.served) for row, load in loads.items()}  # closed
        self.assertEqual(kept, [True, False] * 3)
        self.assertEqual(loads, {1: Load(0, 3), 2: Load(0, 3)})

    def test_a_burst_is_shared(self):
        """Six at once: worker 1 keeps some, the rest go on."""
        loads = {1: Load(0, 0), 2: Load(0, 0)}
        kept = share(loads, 1, 6, slack=0)
        self.assertEqual(kept, [True, False, True, False, True, True])
        self.assertEqual(loads, {1: Load(4, 4), 2: Load(2, 2)})

    def test_four_workers_idle(self):
        loads = {i: Load(0, 0) for i in range(1, 5)}
        self.assertEqual(share(loads, 3, 4, slack=0), [True, False, False, False])
        self.assertEqual({load.served for load in loads.values()}, {1})

    def test_under_load_a_passing_unevenness_is_kept(self):
        """Well spread clients: a worker a little ahead, within its slack,
        keeps what the kernel gave it, whatever the open connections."""
        loads = {1: Load(16, 10_040), 2: Load(9, 10_000)}
        self.assertTrue(keeps(loads, 1, slack=100))

    def test_a_lasting_unevenness_is_handed_on(self):
        """Ahead in connections served beyond the slack, and busier beyond
        half again the least loaded's open connections: hand on."""
        loads = {1: Load(30, 10_500), 2: Load(4, 10_000)}
        self.assertFalse(keeps(loads, 1, slack=100))
        self.assertTrue(keeps(loads, 2, slack=100))

    def test_open_connections_within_half_again_are_kept(self):
        """Keep-alive: a client that reconnects to the worker on its CPU
        is kept while the open connections stay within half again, even
        at slack 0 (else connections would go back and forth)."""
        loads = {1: Load(17, 40), 2: Load(15, 30)}
        self.assertTrue(keeps(loads, 1, slack=0))
        self.assertFalse(keeps({1: Load(23, 40), 2: Load(15, 30)}, 1, slack=0))

    def test_a_burst_of_long_lived_connections_stays_within_half_again(self):
        """24 keep-alive clients starting, most of them on one worker's
        CPU, at 4 workers (as the load test has them): no worker ends with
        more than half again the least loaded's, plus one."""
        loads = {i: Load(0, 0) for i in range(1, 5)}
        share(loads, 4, 2, slack=0)
        share(loads, 1, 2, slack=0)
        share(loads, 4, 14, slack=0)
        share(loads, 2, 6, slack=0)
        opened = sorted(load.open for load in loads.values())
        self.assertEqual(sum(opened), 24)
        self.assertLessEqual(opened[-1], opened[0] + opened[0] // 2 + 1, loads)

    def test_not_serving_keeps_everything(self):
        """A worker the master has not marked as serving (still starting),
        or alone, keeps what it accepts."""
        self.assertTrue(keeps({2: Load(0, 0)}, 1, slack=0))
        self.assertTrue(keeps({1: Load(50, 500)}, 1, slack=0))
        self.assertEqual(share({}, 1, 3, slack=0), [True] * 3)


class LedgerTests(unittest.TestCase):
    def setUp(self):
        self.master = Ledger.create()
        self.addCleanup(os.close, self.master.fileno())
        self.addCleanup(self.master.close)
        # A worker maps the same memory from the descriptor it inherits.
        self.worker = Ledger(self.master.fileno())
        self.addCleanup(self.worker.close)

    def test_starts_empty(self):
        self.assertEqual(self.master.loads(), {})
        self.assertEqual(self.master.load(1), Load(0, 0))

    def test_shared_both_ways(self):
        """What the master writes a worker reads at once, and the other way."""
        self.master.set_serving([1, 2])
        self.worker.set_open(1, 5)
        self.worker.add_kept(1, 7)
        self.master.add_dealt(1, 2)
        self.master.add_dealt(2, 4)
        # What the master sent and the worker has not taken counts as open.
        self.assertEqual(self.master.loads(), {1: Load(7, 9), 2: Load(4, 4)})
        self.assertEqual(self.worker.loads(), self.master.loads())

    def test_serving_set_replaces(self):
        """Ids that no longer serve are left out; their counts stay (a
        worker of the same id goes on from them)."""
        self.master.set_serving([1, 2, 3])
        self.worker.add_kept(3, 10)
        self.master.set_serving([1])
        self.assertEqual(self.worker.loads(), {1: Load(0, 0)})
        self.master.set_serving([1, 3])
        self.assertEqual(self.worker.loads(), {1: Load(0, 0), 3: Load(0, 10)})

    def test_pending_counts_as_open(self):
        """What the master sent a worker that it has not taken yet counts as
        open: a hung worker does not look idle for long."""
        self.master.set_serving([1])
        self.master.add_dealt(1, 3)
        self.assertEqual(self.worker.load(1), Load(3, 3))
        self.worker.add_received(1, 2)
        self.worker.set_open(1, 2)
        self.assertEqual(self.worker.load(1), Load(3, 3))
        self.assertEqual(self.master.received(1), 2)

    def test_steering_flag(self):
        self.assertFalse(self.worker.steering())
        self.master.set_steering(True)
        self.assertTrue(LedgerSlot(self.worker, 1).steering())
        self.master.set_steering(False)
        self.assertFalse(self.worker.steering())

    def test_lift_counts_as_served(self):
        self.master.lift(2, 40)
        self.assertEqual(self.worker.load(2), Load(0, 40))

    def test_clear(self):
        """A new process in an old row starts from nothing."""
        self.worker.set_open(3, 5)
        self.worker.add_kept(3, 5)
        self.master.clear(3)
        self.assertEqual(self.worker.load(3), Load(0, 0))

    def test_room_for_rows(self):
        """A row past MAX_ROWS is not counted: it neither serves in the
        ledger nor writes to it."""
        self.assertTrue(Ledger.has(MAX_ROWS))
        self.assertFalse(Ledger.has(MAX_ROWS + 1))
        self.assertFalse(Ledger.has(0))
        self.master.set_serving([1, MAX_ROWS + 1])
        self.assertEqual(set(self.worker.loads()), {1})
        slot = LedgerSlot(self.worker, 0)
        slot.set_open(3)
        slot.add_kept(3)
        slot.add_received(3)
        self.assertEqual(slot.loads(), {})

    def test_slot(self):
        """A worker's own numbers, through its slot."""
        self.master.set_serving([2])
        slot = LedgerSlot(self.worker, 2)
        slot.set_open(4)
        slot.add_kept(6)
        self.assertEqual(self.master.loads(), {2: Load(4, 6)})
        self.assertEqual(slot.loads(), {2: Load(4, 6)})
