"""kill -9 of a `runworker steering-worker` process in the lab deployment (PostgreSQL + Redis).

Two workers listen; a long run submitted through a daphne web process's API is claimed by one of them,
which is SIGKILLed and reaped while the run is generating. The other worker's sweep fails the run ("its
process is gone") within its sweep interval, no run is left queued or running, the run's page says so,
and the surviving worker completes the next run.
"""

import time

import pytest

from steering_app.runs import WORKER_GONE
from steering_app.worker import SWEEP_SECONDS
from tests.processes import (
    ACTIVE,
    FINISHED,
    Api,
    beating,
    free_port,
    kill9,
    log_in,
    run_result,
    runs_in_database,
    start_daphne,
    start_runworker,
    stop,
    tails,
    worker_name,
)
from tests.scaleout.conftest import PASSWORD, USER
from tests.scaleout.support import environment, redis_client, wait_for_listeners

pytestmark = pytest.mark.redis

WORKERS = 2
LISTEN_SECONDS = 180
LONG_TOKENS = 500  # within the 512-token slots with its prompt; long enough that the run is still generating when its worker is killed
RUNNING_SECONDS = 180  # until a worker claimed the run and its heartbeat advanced
SWEPT_SECONDS = SWEEP_SECONDS + 10  # the survivor's sweep interval, and a margin
SHORT_RUN_SECONDS = 240  # the survivor loads the model (it never ran one) and generates a few tokens


def test_a_killed_worker_fails_its_run_and_the_other_worker_carries_on(
    redis_db, database_url, seeded, tmp_path, capsys
):
    env = environment(database_url, redis_db)
    token = seeded["tokens"][USER]
    client, _ = redis_client(redis_db)
    worker_logs = [tmp_path / f"worker-{i}.log" for i in range(WORKERS)]
    web_log = tmp_path / "daphne.log"
    logs = (*worker_logs, web_log)
    processes = []
    try:
        workers = [start_runworker(env, log) for log in worker_logs]
        processes += workers
        port = free_port()  # the web process starts while the workers do: channel mode, no worker in it
        processes.append(start_daphne(env, web_log, port))
        wait_for_listeners(client, redis_db, workers, worker_logs, LISTEN_SECONDS)
        url = f"http://127.0.0.1:{port}"
        api = Api(url, token)

        run_id = api.generate_async(
            seeded["training"], seeded["feature"], "Tell me a long story about the weather.", LONG_TOKENS
        )
        run = api.wait_for(run_id, beating, RUNNING_SECONDS, logs)
        by_name = {worker_name(process): process for process in workers}
        assert run["worker"] in by_name, (run, list(by_name))
        victim = by_name.pop(run["worker"])
        (survivor,) = by_name.values()

        kill9(victim)
        reaped = time.monotonic()
        ended = api.wait_for(run_id, lambda r: r["status"] in FINISHED, SWEPT_SECONDS, logs)
        swept_in = time.monotonic() - reaped
        assert ended["status"] == "failed" and ended["error"] == WORKER_GONE, (
            f"{ended['status']}: {ended['error']!r} (worker {ended['worker']})\n{tails(*logs)}"
        )
        stored = runs_in_database(database_url)
        assert [r for r in stored if r[1] in ACTIVE] == [], stored

        page = log_in(url, USER, PASSWORD).get(f"{url}/steering/runs/{run_id}/", timeout=60)
        assert page.status_code == 200 and f"Steering run #{run_id}" in page.text, (
            page.status_code,
            page.url,
        )
        assert "Run failed" in page.text and WORKER_GONE in page.text, run_result(page.text)
        assert 'data-state="failed"' in page.text, run_result(page.text)

        started = time.monotonic()
        next_id = api.generate_async(seeded["training"], seeded["feature"], "The weather today is", 6, seed=2)
        done = api.wait_for(next_id, lambda r: r["status"] in FINISHED, SHORT_RUN_SECONDS, logs)
        next_seconds = time.monotonic() - started
        assert done["status"] == "completed" and done["steered_output"], (
            f"{done['status']}: {done['error']!r} (worker {done['worker']})\n{tails(*logs)}"
        )
        assert done["worker"] == worker_name(survivor), done
        assert survivor.poll() is None, tails(*logs)
        stored = runs_in_database(database_url)
        assert [r for r in stored if r[1] in ACTIVE] == [], stored
    finally:
        stop(*processes)
        client.flushdb()
    with capsys.disabled():
        print(
            f"\n[crash] runworker: run {run_id} failed {swept_in:.1f} s after its worker was killed;"
            f" the survivor completed the next run in {next_seconds:.1f} s"
        )
