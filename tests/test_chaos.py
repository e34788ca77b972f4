"""The chaos run of issue 7 at CI size (tests/chaos.py does the work).

A fleet of worker processes, SIGKILLed and restarted at random, and producer
processes run a backlog to the end through the fault proxy (503, 500, 409,
connection resets before and after the server applied a request, latency,
stalled replies) on SeaweedFS; the invariants are then checked from the
bucket.  The size comes from the environment, so CI can choose:

    BUQUET_CHAOS_TASKS     tasks (default 600; 0 skips the test)
    BUQUET_CHAOS_WORKERS   worker processes (default 3)
    BUQUET_CHAOS_SEED      seed of the plan, the killer and the proxy (default: random, printed)

The long run (thousands of tasks) is the script itself:

    .venv/bin/python tests/chaos.py --tasks 3000 --workers 4 --producers 2 --seed 7
"""

import os
import random

import pytest

import chaos

TASKS = int(os.environ.get("BUQUET_CHAOS_TASKS", "600"))
WORKERS = int(os.environ.get("BUQUET_CHAOS_WORKERS", "3"))
SEED = int(os.environ.get("BUQUET_CHAOS_SEED") or random.randrange(1 << 30))

pytestmark = pytest.mark.skipif(TASKS <= 0, reason="BUQUET_CHAOS_TASKS=0")


@pytest.fixture(scope="module")
def report(seaweedfs_server, tmp_path_factory):
    options = chaos.Options(
        tasks=TASKS, workers=WORKERS, producers=2, seed=SEED, concurrency=4,
        # Producers spread the submits over ~12 s (at least 10): with a kill
        # every ~2 s that is about six kills while the fleet is busy.
        duration=max(10.0, TASKS / 50.0), kill_interval=2.0,
        # The version history of tasks that ran more than once: where a double
        # completion could hide, at a fraction of the cost of reading them all.
        history="reruns", drain_timeout=120.0, verbose=False,
        # No rescue passes, and the workers' sweeper at its production interval
        # (300 s, so it never runs here): the monitor alone must find the tasks
        # of killed workers (transitions write the index entry first).
        rescue=False)
    result = chaos.run(options, server=seaweedfs_server, workdir=tmp_path_factory.mktemp("chaos"))
    print(chaos.format_summary(result))
    return result


def test_a_fleet_under_faults_and_kills_keeps_every_invariant(report):
    failed = [i["name"] for i in report["invariants"] if not i["ok"]]
    assert not failed, "invariants failed (seed %d): %s\n%s" % (SEED, failed, chaos.format_summary(report))


def test_every_fault_kind_was_injected(report):
    injected = report["faults"]
    missing = [kind for kind, p in chaos.DEFAULT_FAULTS.items() if p > 0 and not injected.get(kind)]
    assert not missing, "never injected: %s (injected: %s)" % (missing, injected)


def test_workers_were_killed_and_restarted(report):
    assert report["kills"] >= 3, chaos.format_summary(report)


def test_the_run_did_the_work_it_was_sized_for(report):
    stats = report["stats"]
    assert stats["tasks"] >= TASKS
    assert stats["tasks_by_status"].get("completed", 0) > 0.8 * TASKS
    assert stats["tasks_by_status"].get("failed", 0) > 0  # the permanent failures
