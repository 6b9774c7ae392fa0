"""The master's state machine, with fake processes and a fake clock."""

import signal

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from twisted.logger import formatEvent, globalLogPublisher

from txcluster.master.supervisor import ExitInfo, RecyclePolicy, RestartPolicy, Supervisor
from txcluster.wire import ExitStatus


class FakeProcess:
    """What spawn returns in these tests: records what it was asked."""

    next_pid = 1000

    def __init__(self, worker, count):
        FakeProcess.next_pid += 1
        self.pid = FakeProcess.next_pid
        self.worker = worker
        self.count = count
        self.signals = []
        self.cron_started = 0
        self.counts_told = []

    def signal(self, signum):
        self.signals.append(signum)

    def start_cron(self):
        self.cron_started += 1

    def tell_count(self, count):
        self.counts_told.append(count)

    def output_tail(self):
        return [f"Traceback of {self.pid}", "ImportError: no module named nope"]


class Harness:
    def __init__(self, count=2, recycling=RecyclePolicy(), **policy):
        self.clock = Clock()
        self.spawned = []
        self.crash_loops = 0
        self.all_ready = 0
        #: what the master was told serves, after each change
        self.serving = []

        def spawn(worker, count):
            process = FakeProcess(worker, count)
            self.spawned.append(process)
            return process

        self.supervisor = Supervisor(
            self.clock, spawn, count, RestartPolicy(**policy),
            on_crash_loop=self._crash_loop, on_all_ready=self._all_ready,
            on_serving=lambda workers: self.serving.append([w.id for w in workers]),
            recycling=recycling,
        )

    def _crash_loop(self):
        self.crash_loops += 1

    def _all_ready(self):
        self.all_ready += 1

    def current(self, worker_id):
        return self.supervisor.slots[worker_id]

    def start_all_ready(self):
        self.supervisor.start()
        for worker in list(self.supervisor.processes):
            worker.ready()

    def die(self, worker_id, status=1, after=0.0):
        self.clock.advance(after)
        worker = self.current(worker_id)
        worker.exited(ExitInfo(status=status))
        return worker


class StartTests(unittest.TestCase):
    def test_spawns_ids_one_to_n(self):
        h = Harness(count=3)
        h.supervisor.start()
        self.assertEqual([p.worker.id for p in h.spawned], [1, 2, 3])
        self.assertEqual([p.count for p in h.spawned], [3, 3, 3])

    def test_all_ready_once(self):
        h = Harness(count=2)
        h.supervisor.start()
        h.current(1).ready()
        self.assertEqual(h.all_ready, 0)
        h.current(2).ready()
        self.assertEqual(h.all_ready, 1)
        h.die(2, after=10)
        h.clock.advance(0)
        h.current(2).ready()
        self.assertEqual(h.all_ready, 1)

    def test_cron_goes_to_worker_one_when_ready(self):
        h = Harness(count=2)
        h.supervisor.start()
        h.current(2).ready()
        self.assertEqual([p.cron_started for p in h.spawned], [0, 0])
        h.current(1).ready()
        self.assertEqual([p.cron_started for p in h.spawned], [1, 0])


class RespawnTests(unittest.TestCase):
    def test_each_worker_is_made_with_its_own_process_for_life(self):
        h = Harness(count=1)
        h.start_all_ready()
        old = h.die(1, after=10)
        h.clock.advance(0)
        new = h.current(1)
        self.assertEqual([(w.process, w.process.worker) for w in (old, new)],
                         [(h.spawned[0], old), (h.spawned[1], new)])

    def test_crash_respawns_same_id(self):
        h = Harness(count=2)
        h.start_all_ready()
        old = h.die(2, after=10)
        h.clock.advance(0)
        new = h.current(2)
        self.assertIsNot(new, old)
        self.assertEqual(new.id, 2)
        self.assertEqual(len(h.spawned), 3)
        self.assertEqual(h.supervisor.fast_crashes, 0)

    def test_killed_by_signal_respawns(self):
        h = Harness(count=1)
        h.start_all_ready()
        h.clock.advance(10)
        h.current(1).exited(ExitInfo(signal=signal.SIGKILL))
        h.clock.advance(0)
        self.assertEqual(len(h.spawned), 2)

    def test_fast_crashes_back_off(self):
        # Binary fractions, so that Clock's float arithmetic is exact.
        h = Harness(count=4, min_delay=0.25, max_delay=0.75)
        h.start_all_ready()
        for spawns, delay in [(5, 0.25), (6, 0.5), (7, 0.75)]:  # doubles, capped
            h.die(1, after=1)
            h.clock.advance(delay - 0.125)
            self.assertEqual(len(h.spawned), spawns - 1)
            h.clock.advance(0.125)
            self.assertEqual(len(h.spawned), spawns)

    def test_crash_loop_after_n_fast_crashes_in_a_row(self):
        h = Harness(count=3, min_delay=0, max_delay=0)
        h.supervisor.start()
        for expected_spawns in (4, 5):
            h.die(1, after=0.5)
            h.clock.advance(0)
            self.assertEqual(len(h.spawned), expected_spawns)
            self.assertEqual(h.crash_loops, 0)
        h.die(1, after=0.5)
        h.clock.advance(10)
        self.assertEqual(h.crash_loops, 1)
        self.assertEqual(len(h.spawned), 5)  # no respawn after giving up

    def test_long_lived_worker_resets_the_count(self):
        h = Harness(count=2, min_delay=0, max_delay=0)
        h.supervisor.start()
        h.die(1, after=1)
        h.clock.advance(0)
        self.assertEqual(h.supervisor.fast_crashes, 1)
        h.die(2, after=6)  # lived 7s
        self.assertEqual(h.supervisor.fast_crashes, 0)
        h.clock.advance(0)
        h.die(2, after=1)  # the respawned worker 2 lived 1s
        self.assertEqual(h.supervisor.fast_crashes, 1)
        self.assertEqual(h.crash_loops, 0)

    def test_no_respawn_while_stopping(self):
        h = Harness(count=2)
        h.start_all_ready()
        h.supervisor.stop()
        h.die(1, status=0, after=1)
        h.clock.advance(60)
        self.assertEqual(len(h.spawned), 2)

    def test_pending_respawn_cancelled_by_stop(self):
        h = Harness(count=2, min_delay=1, max_delay=1)
        h.start_all_ready()
        h.die(1, after=1)
        h.supervisor.stop()
        h.clock.advance(60)
        self.assertEqual(len(h.spawned), 2)


class StopTests(unittest.TestCase):
    def test_sigterm_then_sigkill_after_timeout(self):
        h = Harness(count=2, shutdown_timeout=10, kill_grace=2)
        h.start_all_ready()
        stopped = h.supervisor.stop()
        self.assertEqual([p.signals for p in h.spawned],
                         [[signal.SIGTERM], [signal.SIGTERM]])
        h.die(1, status=0, after=5)
        self.assertNoResult(stopped)
        h.clock.advance(6.9)
        self.assertEqual(h.spawned[1].signals, [signal.SIGTERM])
        h.clock.advance(0.1)
        self.assertEqual(h.spawned[1].signals, [signal.SIGTERM, signal.SIGKILL])
        h.current(2).exited(ExitInfo(signal=signal.SIGKILL))
        self.successResultOf(stopped)

    def test_fast_stop_even_after_a_graceful_one_began(self):
        h = Harness(count=1, shutdown_timeout=30, kill_grace=2)
        h.start_all_ready()
        h.supervisor.stop()
        h.clock.advance(5)
        h.supervisor.stop(fast=True)  # SIGQUIT after SIGTERM
        self.assertEqual(h.spawned[0].signals, [signal.SIGTERM, signal.SIGQUIT])
        h.clock.advance(2)
        self.assertEqual(h.spawned[0].signals[-1], signal.SIGKILL)

    def test_kill_all(self):
        h = Harness(count=2)
        h.start_all_ready()
        h.supervisor.stop()
        h.supervisor.kill_all()
        self.assertEqual([p.signals[-1] for p in h.spawned], [signal.SIGKILL] * 2)

    def test_stop_with_no_workers(self):
        h = Harness(count=1)
        self.successResultOf(h.supervisor.stop())


class SilenceTests(unittest.TestCase):
    def test_silent_worker_is_killed_and_replaced(self):
        h = Harness(count=2, silence_timeout=5)
        h.start_all_ready()
        for _ in range(8):
            h.clock.advance(1)
            h.current(1).heartbeat()
        self.assertEqual(h.spawned[0].signals, [])
        # First its stack (faulthandler answers SIGUSR2), then the kill.
        self.assertEqual(h.spawned[1].signals, [signal.SIGUSR2, signal.SIGKILL])
        h.current(2).exited(ExitInfo(signal=signal.SIGKILL))
        h.clock.advance(0)
        self.assertEqual(len(h.spawned), 3)
        self.assertEqual(h.current(2).pid, h.spawned[2].pid)


    def test_a_hung_worker_has_a_moment_to_write_its_stack(self):
        h = Harness(count=1, silence_timeout=5, stack_dump_grace=1.0)
        h.start_all_ready()
        h.clock.pump([1] * 6)
        self.assertEqual(h.spawned[0].signals, [signal.SIGUSR2])
        h.clock.advance(1.0)
        self.assertEqual(h.spawned[0].signals, [signal.SIGUSR2, signal.SIGKILL])


class RollingRestartTests(unittest.TestCase):
    def test_one_at_a_time_new_ready_before_old_stops(self):
        h = Harness(count=2)
        h.start_all_ready()
        old1, old2 = h.current(1), h.current(2)
        done = ensureDeferred(h.supervisor.rolling_restart())
        self.assertEqual(len(h.spawned), 3)  # only worker 1's replacement
        new1 = h.spawned[2].worker
        self.assertEqual(new1.id, 1)
        self.assertEqual(old1.process.signals, [])  # old keeps serving
        new1.ready()
        self.assertEqual(old1.process.signals, [signal.SIGTERM])
        self.assertIs(h.current(1), new1)
        self.assertEqual(new1.process.cron_started, 0)  # old still runs cron
        self.assertEqual(len(h.spawned), 3)  # worker 2 waits its turn
        old1.exited(ExitInfo(status=0))
        self.assertEqual(new1.process.cron_started, 1)
        self.assertEqual(len(h.spawned), 4)
        new2 = h.spawned[3].worker
        new2.ready()
        old2.exited(ExitInfo(status=0))
        self.assertTrue(self.successResultOf(done))
        self.assertEqual(h.supervisor.slots, {1: new1, 2: new2})
        self.assertEqual(len(h.spawned), 4)  # retired workers are not respawned

    def test_new_worker_dies_keeps_old_and_stops(self):
        h = Harness(count=2)
        h.start_all_ready()
        old1 = h.current(1)
        done = ensureDeferred(h.supervisor.rolling_restart())
        h.spawned[2].worker.exited(ExitInfo(status=4))
        self.assertFalse(self.successResultOf(done))
        self.assertIs(h.current(1), old1)
        self.assertEqual(old1.process.signals, [])
        self.assertEqual(len(h.spawned), 3)  # worker 2 untouched, nothing respawned
        self.assertFalse(h.supervisor.reloading)

    def test_new_worker_never_ready_is_killed(self):
        h = Harness(count=1, ready_timeout=10)
        h.start_all_ready()
        done = ensureDeferred(h.supervisor.rolling_restart())
        new = h.spawned[1]
        h.clock.advance(10)
        self.assertEqual(new.signals, [signal.SIGKILL])
        new.worker.exited(ExitInfo(signal=signal.SIGKILL))
        self.assertFalse(self.successResultOf(done))
        self.assertEqual(h.current(1).pid, h.spawned[0].pid)

    def test_second_reload_while_reloading_is_ignored(self):
        h = Harness(count=1)
        h.start_all_ready()
        ensureDeferred(h.supervisor.rolling_restart())
        second = ensureDeferred(h.supervisor.rolling_restart())
        self.assertFalse(self.successResultOf(second))
        self.assertEqual(len(h.spawned), 2)


class ScaleTests(unittest.TestCase):
    def test_scale_up_uses_lowest_free_id(self):
        h = Harness(count=2)
        h.start_all_ready()
        self.assertEqual(h.supervisor.scale_up(), 3)
        self.assertEqual(h.spawned[-1].count, 3)
        self.assertEqual(h.supervisor.scale_down(), 3)
        self.assertEqual(h.spawned[-1].signals, [signal.SIGTERM])
        h.spawned[-1].worker.exited(ExitInfo(status=0))
        h.clock.advance(60)
        self.assertEqual(len(h.spawned), 3)  # a removed worker is not respawned
        self.assertEqual(h.supervisor.count, 2)

    def test_workers_learn_the_new_count(self):
        h = Harness(count=2)
        h.start_all_ready()
        h.supervisor.scale_up()
        self.assertEqual([p.counts_told for p in h.spawned[:2]], [[3], [3]])
        h.supervisor.scale_down()
        self.assertEqual([p.counts_told for p in h.spawned[:2]], [[3, 2], [3, 2]])

    def test_never_removes_last_worker(self):
        h = Harness(count=1)
        h.start_all_ready()
        self.assertIsNone(h.supervisor.scale_down())
        self.assertEqual(h.spawned[0].signals, [])


class RobustnessTests(unittest.TestCase):
    def test_spawn_failure_counts_as_a_fast_crash_and_is_retried(self):
        h = Harness(count=2, min_delay=0.25, max_delay=0.25)
        real_spawn = h.supervisor._spawn
        failures = [OSError(24, "Too many open files")]

        def flaky(worker, count):
            if worker.id == 2 and failures:
                raise failures.pop()
            return real_spawn(worker, count)

        h.supervisor._spawn = flaky
        h.supervisor.start()
        failed = h.current(2)
        self.assertIsNone(failed.process)
        self.assertEqual(str(failed.start_error), "[Errno 24] Too many open files")
        h.clock.advance(0)
        self.assertEqual(failed.exit, ExitInfo(error="[Errno 24] Too many open files"))
        self.assertEqual(h.supervisor.fast_crashes, 1)
        self.assertIsNone(h.supervisor.slots[2])
        h.clock.advance(0.25)
        self.assertEqual(h.current(2).pid, h.spawned[-1].pid)
        self.assertEqual([p.worker.id for p in h.spawned], [1, 2])

    def test_a_respawn_that_lives_resets_the_count(self):
        h = Harness(count=3, min_delay=0, max_delay=0)
        h.start_all_ready()
        h.die(1, after=1)
        h.clock.advance(0)
        self.assertEqual(h.supervisor.fast_crashes, 1)
        h.clock.advance(4.9)
        self.assertEqual(h.supervisor.fast_crashes, 1)
        h.clock.advance(0.1)  # the respawned worker 1 has lived 5 s
        self.assertEqual(h.supervisor.fast_crashes, 0)

    def test_workers_started_before_the_crash_do_not_reset_it(self):
        h = Harness(count=3, min_delay=1, max_delay=1)
        h.start_all_ready()
        h.die(1, after=1)
        h.clock.advance(4.5)  # workers 2 and 3 pass 5 s; worker 1 waits to respawn
        self.assertEqual(h.supervisor.fast_crashes, 1)

    def test_a_leaving_worker_gets_no_new_connections(self):
        h = Harness(count=2)
        h.start_all_ready()
        self.assertEqual(len(h.supervisor.serving()), 2)
        h.current(2).leaving()
        self.assertEqual(h.supervisor.serving(), [h.current(1)])

    def test_no_scaling_while_stopping(self):
        h = Harness(count=2)
        h.start_all_ready()
        h.supervisor.stop()
        self.assertIsNone(h.supervisor.scale_up())
        self.assertIsNone(h.supervisor.scale_down())
        self.assertEqual(len(h.spawned), 2)

    def test_crash_loop_stops_respawning(self):
        h = Harness(count=1, min_delay=0, max_delay=0)
        h.supervisor.start()
        h.die(1, after=0.5)
        self.assertEqual(h.crash_loops, 1)
        self.assertTrue(h.supervisor.stopping)
        h.clock.advance(10)
        self.assertEqual(len(h.spawned), 1)


class ServingTests(unittest.TestCase):
    """The master hears of every change to the workers that get new
    connections, so the dispatcher never deals to one that cannot serve."""

    def test_ready_workers_join_and_leaving_or_dead_ones_go(self):
        h = Harness(count=2)
        h.start_all_ready()
        self.assertEqual(h.serving[-1], [1, 2])
        h.current(2).leaving()
        self.assertEqual(h.serving[-1], [1])
        h.die(1, after=10)
        self.assertEqual(h.serving[-1], [])
        h.clock.advance(0)  # respawned (it lived long: no back-off)
        h.current(1).ready()
        self.assertEqual(h.serving[-1], [1])

    def test_it_hears_too_when_a_process_starts(self):
        # With reuseport a new id's socket is then accepted on by the master
        # until its worker is ready.
        h = Harness(count=2)
        h.start_all_ready()
        changes = len(h.serving)
        h.supervisor.scale_up()
        h.clock.advance(0)
        self.assertEqual(h.serving[changes:], [[1, 2]])

    def test_stopping_serves_nobody(self):
        h = Harness(count=2)
        h.start_all_ready()
        h.supervisor.stop()
        self.assertEqual(h.serving[-1], [])

    def test_a_rolling_restart_swaps_each_worker_in_one_change(self):
        h = Harness(count=1)
        h.start_all_ready()
        old = h.current(1)
        ensureDeferred(h.supervisor.rolling_restart())
        new = h.supervisor.processes[-1]
        new.ready()
        self.assertEqual(h.serving[-1], [1])
        self.assertIs(h.supervisor.serving()[0], new)
        self.assertTrue(old.retiring)


class StartFailureTests(unittest.TestCase):
    """A worker that cannot load the app or boot says why over its channel."""

    def setUp(self):
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def text(self):
        return [formatEvent(e) for e in self.logged if e.get("log_namespace") == "txcluster.master"
                or e.get("log_system", "").startswith("worker")]

    def fail_to_load(self, h, worker_id, error="ImportError: no module named nope"):
        worker = h.current(worker_id)
        worker.failed(ExitStatus.APP_LOAD_ERROR, f"cannot load app x:y: {error}",
                      f"Traceback (most recent call last):\n  File ...\n{error}\n")
        worker.exited(ExitInfo(status=ExitStatus.APP_LOAD_ERROR))

    def test_the_same_error_is_logged_in_full_once(self):
        h = Harness(count=3)
        h.supervisor.start()
        self.fail_to_load(h, 2)
        tracebacks = [line for line in self.text() if line.startswith("Traceback")]
        self.assertEqual(len(tracebacks), 1)

    def test_a_crash_loop_ends_with_one_line_naming_the_error(self):
        h = Harness(count=3)
        h.supervisor.start()
        for worker_id in (1, 2, 3):
            self.fail_to_load(h, worker_id)
        self.assertEqual(h.crash_loops, 1)
        closing = [line for line in self.text() if "giving up" in line]
        self.assertEqual(len(closing), 1)
        self.assertIn("3 workers in a row", closing[0])
        self.assertIn("ImportError: no module named nope", closing[0])
        tracebacks = [line for line in self.text() if line.startswith("Traceback")]
        self.assertEqual(len(tracebacks), 1)

    def test_a_load_error_is_one_fast_crash_like_any_other(self):
        h = Harness(count=2)
        h.start_all_ready()
        self.fail_to_load(h, 1)  # someone deployed broken code, then a worker died
        self.assertEqual(h.crash_loops, 0)
        h.clock.advance(1)
        self.assertEqual(len(h.spawned), 3)

    def test_an_old_error_is_not_blamed_for_a_new_crash_loop(self):
        h = Harness(count=1, min_delay=0, max_delay=0)
        h.supervisor.start()
        h.current(1).failed(4, "cannot load app x:y: ImportError: old", "Traceback...\n")
        h.current(1).ready()  # it was fixed, say
        h.die(1, after=10)  # a long life: no crash loop, respawned
        h.clock.advance(0)
        h.die(1, after=1)  # then one that dies fast, saying nothing
        closing = [line for line in self.text() if "giving up" in line]
        self.assertNotIn("old", closing[0])

    def test_repeated_errors_are_one_line_each(self):
        h = Harness(count=2)
        h.start_all_ready()
        for worker_id in (1, 2):
            self.fail_to_load(h, worker_id)
        again = [line for line in self.text() if "(the same error again)" in line]
        self.assertEqual(len(again), 1)

