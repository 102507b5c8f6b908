"""Resume on the Redis deployment: an experiment whose worker is killed mid-cell ends failed, and a resume
completes it with every output stored exactly once.

Two `runworker steering-worker` processes share an experiment's cells (each holds two 3-row cells in its
8 rows) on the demo model. Once some cells have completed, the worker of a running cell is SIGKILLed; the
survivor's sweep fails that worker's cells ("its process is gone"), finishes the rest, and the experiment
ends failed. A fresh worker starts, the experiment is resumed, and it completes: one output per (condition,
prompt, seed, strength), the outputs stored before the kill untouched, no run left queued or running.
"""

import json
import sqlite3
import subprocess
import time

import pytest

from steering_app.runs import WORKER_GONE
from steering_app.worker import SWEEP_SECONDS
from tests.processes import (
    ACTIVE,
    PYTHON,
    ROOT,
    kill9,
    runs_in_database,
    start_runworker,
    stop,
    tails,
    worker_name,
)
from tests.scaleout.conftest import USER
from tests.scaleout.support import environment, redis_client, wait_for_listeners

pytestmark = pytest.mark.redis

DRIVER = ROOT / "tests/scaleout/drive_experiment.py"
PROMPTS = [
    "Tell me about the night sky.",
    "What should I cook tonight?",
    "Describe a walk by the sea.",
    "Write a short note to a friend.",
    "What is your favourite season?",
    "Explain how rain forms.",
]
STRENGTHS = [0, 1, 2]
EXPERIMENT = {
    "coefficient": 2.0,
    "strengths": STRENGTHS,
    "prompts": PROMPTS,
    "seeds": 1,
    # Long enough that a cell claimed after another completed is still generating a poll later.
    "max_tokens": 24,
    "temperature": 0.7,
}
OUTPUTS = len(PROMPTS) * len(STRENGTHS)  # one condition, one seed
WORKER_ENV = {
    # 8 rows hold two 3-row cells: each worker runs two at a time, so later cells start after others end.
    # (One thread per worker, OMP_NUM_THREADS, comes with the deployment's environment.)
    "STEERLAB_SLOT_ROWS": "8",
}
FINISHED = "completed,failed,cancelled"
LISTEN_SECONDS = 180
DRIVER_SECONDS = 120  # one driver process: Django's setup and one service call
KILL_WINDOW_SECONDS = 240  # the first cells complete and more are claimed (the first load may dequantize)
SWEPT_SECONDS = SWEEP_SECONDS + 10  # the survivor's sweep interval, and a margin
FAILED_SECONDS = 180  # the survivor finishes the cells still queued
RESUMED_SECONDS = 240  # the fresh worker loads the model; the two run the missing cells
POLL_SECONDS = 0.2


def drive(env: dict, logs: list, *args: str, seconds: float = 0.0) -> dict:
    """One drive_experiment.py command with the deployment's environment: its JSON."""
    done = subprocess.run(
        [PYTHON, str(DRIVER), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=DRIVER_SECONDS + seconds,
        check=False,
    )
    assert done.returncode == 0, (
        f"drive_experiment.py {args[0]} exited {done.returncode}:\n{done.stderr[-4000:]}\n{tails(*logs)}"
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


CELLS = (
    "SELECT id, status, worker, error, cell_condition, cell_prompt, seed, started_at, finished_at"
    " FROM steering_app_steeringrun WHERE experiment_id = {} ORDER BY id"
)
RESULTS = (
    "SELECT id, run_id, condition, prompt_index, seed, strength, text"
    " FROM steering_app_experimentresult WHERE experiment_id = {} ORDER BY id"
)


def in_database(database_url: str, experiment_id: int) -> tuple[list[dict], dict[tuple, tuple]]:
    """The experiment's cell runs and its stored outputs, read in one snapshot straight from the deployment's
    database (no Django in the test process): (cells, {(condition, prompt_index, seed, strength): (result
    id, run id, text)})."""
    queries = [query.format(int(experiment_id)) for query in (CELLS, RESULTS)]
    if database_url.startswith("sqlite:///"):
        path = database_url.removeprefix("sqlite:///")
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, isolation_level=None) as db:
            db.execute("BEGIN")  # WAL: one read transaction sees one snapshot
            cells, results = (db.execute(query).fetchall() for query in queries)
            db.execute("COMMIT")
    else:
        import psycopg

        with psycopg.connect(database_url, connect_timeout=5) as db:
            db.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # one snapshot for both reads
            cells, results = (db.execute(query).fetchall() for query in queries)
    return (
        [
            {
                "id": pk,
                "status": status,
                "worker": worker,
                "error": error,
                "cell": (condition, prompt, seed),
                "started_at": started_at,
                "finished_at": finished_at,
            }
            for pk, status, worker, error, condition, prompt, seed, started_at, finished_at in cells
        ],
        {
            (condition, prompt, seed, strength): (pk, run, text)
            for pk, run, condition, prompt, seed, strength, text in results
        },
    )


def wait_for_cells(database_url: str, experiment_id: int, until, seconds: float, what: str, logs: list):
    """Poll the experiment's cells until `until(cells)` is truthy: that value; an assertion error with the
    cells and the logs after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        cells, _outputs = in_database(database_url, experiment_id)
        found = until(cells)
        if found:
            return found
        assert time.monotonic() < deadline, f"not {what} within {seconds} s: {cells}\n{tails(*logs)}"
        time.sleep(POLL_SECONDS)


def test_a_killed_worker_fails_its_cells_and_a_resume_completes_every_output_once(
    redis_db, database_url, tmp_path, capsys
):
    began = time.monotonic()
    env = {**environment(database_url, redis_db), **WORKER_ENV}  # the database is seeded
    client, _ = redis_client(redis_db)
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    processes = []
    try:
        workers = [start_runworker(env, log) for log in logs[:2]]
        processes += workers
        wait_for_listeners(client, redis_db, workers, logs[:2], LISTEN_SECONDS)
        names = {worker_name(process): process for process in workers}

        created = drive(env, logs, "create", USER, json.dumps(EXPERIMENT))
        experiment_id = created["experiment"]
        assert (created["cells"], created["outputs"]) == (len(PROMPTS), OUTPUTS), created
        created_at = time.monotonic()

        def claimed_after_a_completion(cells) -> list[dict]:
            """Running cells of our workers claimed after a cell completed: a whole cell left to generate."""
            ends = [cell["finished_at"] for cell in cells if cell["status"] == "completed"]
            return [
                cell
                for cell in cells
                if ends and cell["status"] == "running" and cell["worker"] in names
                and cell["started_at"] >= min(ends)
            ]  # fmt: skip

        fresh_cells = wait_for_cells(
            database_url,
            experiment_id,
            claimed_after_a_completion,
            KILL_WINDOW_SECONDS,
            "a cell claimed after another completed",
            logs,
        )
        victim_name = max(fresh_cells, key=lambda cell: cell["started_at"])["worker"]
        victim = names.pop(victim_name)
        (survivor,) = names.values()
        kill9(victim)
        killed = time.monotonic()

        at_kill, stored_at_kill = in_database(database_url, experiment_id)
        lost = {
            cell["id"]: cell
            for cell in at_kill
            if cell["status"] == "running" and cell["worker"] == victim_name
        }
        completed_at_kill = [cell for cell in at_kill if cell["status"] == "completed"]
        spread = {cell["worker"] for cell in at_kill if cell["worker"]}
        assert spread == {victim_name, worker_name(survivor)}, (
            f"the cells did not spread over both workers before the kill: {at_kill}\n{tails(*logs)}"
        )
        assert lost, f"no cell of {victim_name} was running at the kill: {at_kill}\n{tails(*logs)}"
        assert len(stored_at_kill) == len(completed_at_kill) * len(STRENGTHS), (stored_at_kill, at_kill)

        def lost_cells_ended(cells) -> list[dict]:
            return [] if any(c["status"] in ACTIVE for c in cells if c["id"] in lost) else cells

        swept = wait_for_cells(
            database_url,
            experiment_id,
            lost_cells_ended,
            SWEPT_SECONDS,
            f"the killed worker's cells {sorted(lost)} swept",
            logs,
        )
        swept_in = time.monotonic() - killed
        assert all(c["status"] == "failed" and c["error"] == WORKER_GONE for c in swept if c["id"] in lost), (
            f"{swept}\n{tails(*logs)}"
        )
        # The fresh worker starts now that the survivor's sweep has failed the lost cells: it loads the model
        # while the survivor finishes the queued cells, instead of after the experiment has failed.
        fresh = start_runworker(env, logs[2])
        processes.append(fresh)

        failed = drive(
            env, logs, "status", str(experiment_id), FINISHED, str(FAILED_SECONDS), seconds=FAILED_SECONDS
        )
        assert failed["status"] == "failed", f"{failed['status']}: {failed['error']!r}\n{tails(*logs)}"
        assert WORKER_GONE in failed["error"], failed["error"]
        before_resume, stored_before_resume = in_database(database_url, experiment_id)
        assert stored_at_kill.items() <= stored_before_resume.items(), (stored_at_kill, stored_before_resume)
        missing = {cell["cell"] for cell in lost.values()}
        assert {output[:3] for output in stored_before_resume}.isdisjoint(missing), stored_before_resume
        assert len(stored_before_resume) == OUTPUTS - len(missing) * len(STRENGTHS), (missing, before_resume)

        wait_for_listeners(client, redis_db, [survivor, fresh], logs[1:], LISTEN_SECONDS)
        resumed_at = time.monotonic()
        resumed = drive(env, logs, "resume", str(experiment_id))
        assert resumed["resumed"] == len(missing), (resumed, missing)

        done = drive(
            env, logs, "status", str(experiment_id), FINISHED, str(RESUMED_SECONDS), seconds=RESUMED_SECONDS
        )
        resume_seconds = time.monotonic() - resumed_at
        assert done["status"] == "completed", f"{done['status']}: {done['error']!r}\n{tails(*logs)}"
        cells, stored = in_database(database_url, experiment_id)
        rows = [tuple(row["output"]) for row in done["results"]]  # as the service reads them
        assert len(rows) == len(set(rows)) == OUTPUTS, rows
        assert (
            set(stored)
            == set(rows)
            == {(0, prompt, 0, float(strength)) for prompt in range(len(PROMPTS)) for strength in STRENGTHS}
        ), rows
        assert stored_before_resume.items() <= stored.items(), "an output stored before the resume changed"
        new_runs = {cell["id"]: cell for cell in cells if cell["id"] > max(c["id"] for c in before_resume)}
        assert sorted(cell["cell"] for cell in new_runs.values()) == sorted(missing), new_runs  # each once
        assert all(cell["status"] == "completed" for cell in new_runs.values()), new_runs
        resumed_outputs = {key: value for key, value in stored.items() if key[:3] in missing}
        assert {run for _id, run, _text in resumed_outputs.values()} <= set(new_runs), resumed_outputs
        active = [run for run in runs_in_database(database_url) if run[1] in ACTIVE]
        assert active == [], f"runs left queued or running: {active}\n{tails(*logs)}"
        assert survivor.poll() is None and fresh.poll() is None, tails(*logs)
        roles = {worker_name(survivor): "the survivor", worker_name(fresh): "the fresh worker"}
        resumed_on = " and ".join(
            sorted({roles.get(cell["worker"], cell["worker"]) for cell in new_runs.values()})
        )
    finally:
        stop(*processes)
        client.flushdb()
    with capsys.disabled():
        print(
            f"\n[resume] experiment {experiment_id}: {len(completed_at_kill)} of {len(PROMPTS)} cells completed"
            f" {killed - created_at:.1f} s after it was created, when a worker was killed; its {len(lost)}"
            f" running cell(s) failed {swept_in:.1f} s later; {resumed['resumed']} cell(s) resumed and"
            f" completed in {resume_seconds:.1f} s on {resumed_on}; {time.monotonic() - began:.1f} s in all"
        )
