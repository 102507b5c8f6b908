"""Scale-out against the real Redis: two `runworker steering-worker` processes share six runs.

The lab deployment: PostgreSQL (a fresh database on 127.0.0.1:5432, or a shared SQLite file when PostgreSQL is
not there) and channels_redis on 127.0.0.1:6379, in a Redis database no one else is using. Skips with the
reason when Redis is missing; REQUIRE_REDIS=1 turns the skip into a failure.
"""

import json
import time

import pytest

from tests.processes import PYTHON, ROOT, start, start_runworker, stop
from tests.scaleout.support import environment, redis_client, wait_for_listeners

pytestmark = pytest.mark.redis

RUNS = 6
WORKERS = 2
LISTEN_SECONDS = 180
RUN_SECONDS = 480


def test_two_workers_share_six_runs_and_none_is_lost(redis_db, database_url, tmp_path, capsys):
    env = environment(database_url, redis_db)  # seeded: drive_runs.py submits as "alice"

    client, _ = redis_client(redis_db)
    logs = [tmp_path / f"worker-{i}.log" for i in range(WORKERS)]
    workers = []
    try:
        workers += [start_runworker(env, log) for log in logs]
        wait_for_listeners(client, redis_db, workers, logs, LISTEN_SECONDS)

        started = time.monotonic()
        output = tmp_path / "driver.out"
        driver = start(
            [PYTHON, str(ROOT / "tests/scaleout/drive_runs.py"), str(RUNS), str(RUN_SECONDS)], env, output
        )
        try:
            # A worker that dies mid-way would leave runs queued: fail at once, with its log.
            while driver.poll() is None:
                dead = [w.returncode for w in workers if w.poll() is not None]
                assert not dead, f"a worker exited ({dead}):\n" + "\n".join(
                    log.read_text()[-3000:] for log in logs
                )
                assert time.monotonic() - started < RUN_SECONDS + 60, "the driver did not finish"
                time.sleep(0.5)
        finally:
            stop(driver)
        elapsed = time.monotonic() - started
        worker_logs = "\n".join(log.read_text()[-3000:] for log in logs)
        assert driver.returncode == 0, output.read_text()[-4000:] + worker_logs
        runs = json.loads(output.read_text().strip().splitlines()[-1])
    finally:
        stop(*workers)
        client.flushdb()

    assert len(runs) == RUNS
    assert [run["status"] for run in runs] == ["completed"] * RUNS, (runs, worker_logs)
    assert all(run["steered"] for run in runs)
    pids = {worker.pid for worker in workers}
    ran_by = [run["worker"] for run in runs]
    assert all(ran_by), f"runs do not record their worker (timings['worker'] = 'host:pid'): {runs}"
    assert {int(name.rsplit(":", 1)[1]) for name in ran_by} == pids, ran_by
    with capsys.disabled():
        counts = {pid: sum(name.endswith(f":{pid}") for name in ran_by) for pid in pids}
        print(f"\n[scale-out] {RUNS} runs completed in {elapsed:.1f} s by {WORKERS} workers: {counts}")
