"""kill -9 of the embedded default deployment (daphne with its worker inside, SQLite in its own data dir).

A run is generating when daphne is SIGKILLed; the restarted daphne's embedded worker sweeps before it
serves its first request, so the very first page asked for already says the run failed, and no run is
left queued or running. No chromium: the page is fetched over HTTP with a session logged in via /login/.
"""

import time

import pytest

from steering_app.runs import WORKER_GONE
from tests.crash.conftest import PASSWORD, USER
from tests.processes import (
    ACTIVE,
    Api,
    beating,
    free_port,
    kill9,
    log_in,
    run_result,
    runs_in_database,
    start_daphne,
    stop,
    tails,
    worker_name,
)

pytestmark = pytest.mark.slow

LONG_TOKENS = 500  # within the 512-token slots with its prompt; long enough that the run is still generating when it is killed
RUNNING_SECONDS = 180  # until the run is claimed and its heartbeat advanced (the model loads meanwhile)


def test_a_killed_daphne_fails_its_run_before_the_restarted_one_serves_a_page(embedded, tmp_path, capsys):
    data_dir, env, seeded = embedded
    database = f"sqlite:///{data_dir / 'steerlab.sqlite3'}"  # where the default settings put it
    token = seeded["tokens"][USER]
    logs = (tmp_path / "daphne-1.log", tmp_path / "daphne-2.log")
    processes = []
    try:
        port = free_port()
        first = start_daphne(env, logs[0], port)
        processes.append(first)
        url = f"http://127.0.0.1:{port}"
        browser = log_in(url, USER, PASSWORD)  # the first connection starts the embedded worker
        api = Api(url, token)
        run_id = api.generate_async(
            seeded["training"], seeded["feature"], "Tell me a long story about the weather.", LONG_TOKENS
        )
        run = api.wait_for(run_id, beating, RUNNING_SECONDS, logs)
        assert run["worker"] == worker_name(first), run

        kill9(first)
        killed_at = time.monotonic()
        left = runs_in_database(database)
        assert [(r[0], r[1]) for r in left] == [(run_id, "running")], (
            f"the run should still be running in the database after the kill (the restart sweeps): {left}"
        )

        port = free_port()
        second = start_daphne(env, logs[1], port)
        processes.append(second)
        url = f"http://127.0.0.1:{port}"
        # The restarted server's first HTTP request: the stored session of the killed server still holds.
        page = browser.get(f"{url}/steering/runs/{run_id}/", timeout=60)
        restarted_in = time.monotonic() - killed_at
        assert page.status_code == 200 and f"Steering run #{run_id}" in page.text, (
            page.status_code,
            page.url,
            tails(*logs),
        )
        assert "Run failed" in page.text and WORKER_GONE in page.text, (
            run_result(page.text) + "\n" + tails(*logs)
        )
        assert 'data-state="failed"' in page.text, run_result(page.text)

        final = runs_in_database(database)
        assert [r for r in final if r[1] in ACTIVE] == [], final
        assert final == [(run_id, "failed", worker_name(first), WORKER_GONE)], final
        assert Api(url, token).run(run_id)["status"] == "failed"
    finally:
        stop(*processes)
    with capsys.disabled():
        print(f"\n[crash] embedded: killed daphne's run shown failed {restarted_in:.1f} s after the kill")
