"""
The steering guard: steer connections by CPU while the workers hand on
little of what the kernel gives them; else spread them by hash for a while,
and try again later.  Driven by a Clock; the counts are the test's.
"""

from twisted.internet.task import Clock
from twisted.trial import unittest

from txcluster.master.steering import (
    CHECK_SECONDS, ENOUGH_PER_WORKER, FIRST_HOLD_SECONDS, LAST_HOLD_SECONDS, SteeringGuard,
)


class GuardTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.kept = 0
        self.handed_on = 0
        self.steered = []
        self.serving = 2
        self.guard = SteeringGuard(self.clock, kept=lambda: self.kept,
                                   handed_on=lambda: self.handed_on,
                                   serving=lambda: self.serving,
                                   steer=self.steered.append)
        self.guard.startService()
        self.addCleanup(self.guard.stopService)

    def second(self, kept, handed_on):
        """One check's worth of new connections."""
        self.kept += kept
        self.handed_on += handed_on
        self.clock.advance(CHECK_SECONDS)

    def test_spread_clients_keep_it_on(self):
        for _ in range(5):
            self.second(kept=970, handed_on=30)
        self.assertEqual(self.steered, [])
        self.assertTrue(self.guard.steering)

    def test_clients_on_one_cpu_turn_it_off_for_a_while(self):
        """Two busy seconds in a row that hand on too much; then, once the
        wait is over, the next busy second tries again."""
        self.second(kept=600, handed_on=400)
        self.assertEqual(self.steered, [])  # one second may be a burst
        self.second(kept=600, handed_on=400)
        self.assertEqual(self.steered, [False])
        for _ in range(int(FIRST_HOLD_SECONDS)):
            self.second(kept=900, handed_on=0)  # meanwhile nothing is judged
        self.assertEqual(self.steered, [False, True])

    def test_no_judgement_below_the_rate_that_earns_slack(self):
        """Fewer new connections per serving worker than earn a worker
        slack in the ledger: the workers hand on what puts them ahead,
        and those hand-offs say little of steering."""
        self.assertEqual(ENOUGH_PER_WORKER, 320)
        for _ in range(3):
            self.second(kept=300, handed_on=300)  # 2 workers: 600 < 640
        self.assertEqual(self.steered, [])
        self.serving = 1
        for _ in range(2):
            self.second(kept=300, handed_on=300)
        self.assertEqual(self.steered, [False])

    def test_no_worker_serving_decides_nothing(self):
        """Every worker gone (a crash loop): a quiet second, not a
        division by zero."""
        self.serving = 0
        self.second(kept=0, handed_on=0)
        self.second(kept=0, handed_on=0)
        self.assertEqual(self.steered, [])

    def test_one_bad_second_is_not_enough(self):
        self.second(kept=600, handed_on=400)
        self.second(kept=990, handed_on=10)
        self.second(kept=600, handed_on=400)
        self.assertEqual(self.steered, [])

    def test_quiet_seconds_decide_nothing(self):
        """A person, a test, keep-alive clients, the tail of a load: too few
        new connections to judge, however many were handed on; and no try
        (and no log line) while the cluster is idle."""
        self.second(kept=10, handed_on=80)
        self.second(kept=10, handed_on=80)
        self.assertEqual(self.steered, [])
        self.second(kept=500, handed_on=500)
        self.second(kept=500, handed_on=500)
        self.clock.advance(FIRST_HOLD_SECONDS * 3)
        self.second(kept=5, handed_on=5)
        self.assertEqual(self.steered, [False])

    def test_each_failed_try_doubles_the_wait(self):
        holds = []
        for _ in range(8):
            self.second(kept=500, handed_on=500)
            self.second(kept=500, handed_on=500)
            holds.append(self.guard.hold)
            self.clock.advance(self.guard.hold)
            self.second(kept=500, handed_on=500)  # tries again
        self.assertEqual(holds[:3], [FIRST_HOLD_SECONDS * 2, FIRST_HOLD_SECONDS * 4,
                                     FIRST_HOLD_SECONDS * 8])
        self.assertEqual(holds[-1], LAST_HOLD_SECONDS)

    def test_a_try_that_pays_starts_afresh(self):
        self.second(kept=500, handed_on=500)
        self.second(kept=500, handed_on=500)
        self.clock.advance(FIRST_HOLD_SECONDS)
        self.second(kept=990, handed_on=10)  # tries again
        self.second(kept=990, handed_on=10)  # and it pays
        self.assertEqual(self.guard.hold, FIRST_HOLD_SECONDS)
        self.assertTrue(self.guard.steering)

    def test_a_replaced_worker_skips_a_check(self):
        """A worker process replaced takes its count with it: the total
        kept may go down, and that check is skipped."""
        self.second(kept=5000, handed_on=0)
        self.second(kept=500, handed_on=500)
        self.kept -= 4000
        self.second(kept=0, handed_on=600)
        self.assertEqual(self.steered, [])

    def test_stop_stops_checking(self):
        self.guard.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
