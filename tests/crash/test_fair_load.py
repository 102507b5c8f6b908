"""A bounded load test of the embedded default deployment (daphne with its worker inside, SQLite, the real
SmolLM2 and the demo SAE): three members each send 4 async sweeps at once, twice the queue cap of 2 a member
may have waiting, while two others send 6 single runs, each one after another, as a member at the panel does
(Generate, read, Generate again).

What a lab depends on, asserted on the real server: no 500, no run failed while the worker lived (a busy
worker is no missing worker), every run completed, and a single run waits no longer than the runs that were
in the batch when it arrived take to end: another member's backlog does not stand in front of it. The queue
cap answers 429 with Retry-After, and a client that honours it gets every sweep in.
"""

import threading
import time
from collections import Counter
from datetime import datetime

import pytest
import requests

from tests.processes import (
    FINISHED,
    HTTP_SECONDS,
    free_port,
    start_daphne,
    stop,
    tails,
)

pytestmark = pytest.mark.slow

SWEEPERS = ("alice", "bob", "carol")
SINGLERS = ("dave", "erin")
# The cap a member may have queued (STEERLAB_MAX_QUEUED_PER_MEMBER, 8 by default), set low so that a small load
# both meets it and still puts a backlog of every sweeper's in front of each single run: with 6 sweeps queued,
# a first-come order would start more of them before a single run (6, and the other single runner's) than the
# fair share's one turn of each other member (4).
QUEUE_CAP = 2
SWEEPS_EACH, SINGLES = 2 * QUEUE_CAP, 6  # the singles shared out between the SINGLERS
SWEEP = [0.5, 1.0, 2.0]  # 4 rows of the CPU's 8: two sweeps share a step
TOKENS = 8
LOAD_SECONDS = 120  # the whole load, submissions and completions, is bounded by this
# A single run may wait for the in-flight runs to end, plus the worker's reaction: one claim after a step.
REACTION_SECONDS = 1.0
# The clients poll gently: every request is served by the daphne process that also generates, and a poll
# storm would slow the steps it measures.
POLL_SECONDS = 0.5


class Client:
    """One member's script: async generates, honouring 429's Retry-After, every status code counted."""

    def __init__(self, url: str, token: str, body: dict, statuses: Counter, lock: threading.Lock):
        self.url, self.body = url, body
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.statuses, self.lock = statuses, lock
        self.run_ids: list[int] = []

    def submit(self, deadline: float, **changes) -> None:
        while time.monotonic() < deadline:
            response = self.session.post(
                f"{self.url}/api/steering/generate?async=true",
                json={**self.body, **changes},
                timeout=HTTP_SECONDS,
            )
            with self.lock:
                self.statuses[response.status_code] += 1
            if response.status_code == 202:
                self.run_ids.append(response.json()["run_id"])
                return
            if response.status_code != 429:
                return
            time.sleep(min(float(response.headers["Retry-After"]), max(0.0, deadline - time.monotonic())))

    def run(self, run_id: int) -> dict:
        response = self.session.get(f"{self.url}/api/steering/runs/{run_id}", timeout=HTTP_SECONDS)
        with self.lock:
            self.statuses[response.status_code] += 1
        return response.json()

    def runs(self) -> list[dict]:
        return [self.run(run_id) for run_id in self.run_ids]

    def await_last(self, deadline: float) -> None:
        while self.run_ids and time.monotonic() < deadline:
            if self.run(self.run_ids[-1])["status"] in FINISHED:
                return
            time.sleep(POLL_SECONDS)


def moment(value: str | None) -> float:
    return datetime.fromisoformat(value).timestamp() if value else float("inf")


def longest_fair_wait(single: dict, every_run: list[dict]) -> float:
    """The most `single` may wait: until the last run that held the batch while it waited, started before it
    (in flight when it came, or ahead of it in turn), has ended. It never waits while those have ended."""
    created, started = moment(single["created_at"]), moment(single["started_at"])
    ahead = [
        moment(run["finished_at"])
        for run in every_run
        if run is not single and moment(run["started_at"]) < started and moment(run["finished_at"]) > created
    ]
    return max([created, *ahead]) - created


def served_first(single: dict, every_run: list[dict]) -> int:
    """How many runs started while `single` waited: under the fair share, one turn of each other member at
    most (three sweepers and the other single runner), never another member's backlog."""
    created, started = moment(single["created_at"]), moment(single["started_at"])
    return sum(1 for run in every_run if created < moment(run["started_at"]) < started)


def test_three_backlogs_and_a_stream_of_single_runs_all_complete_fairly(embedded, tmp_path, capsys):
    _data_dir, env, seeded = embedded
    env = {**env, "STEERLAB_MAX_QUEUED_PER_MEMBER": str(QUEUE_CAP)}
    tokens = {name: seeded["tokens"][name] for name in (*SWEEPERS, *SINGLERS)}
    log = tmp_path / "daphne.log"
    server = start_daphne(env, log, port := free_port())
    try:
        url = f"http://127.0.0.1:{port}"
        requests.get(f"{url}/login/", timeout=HTTP_SECONDS)  # the first connection starts the embedded worker
        training = requests.get(
            f"{url}/api/trainings/{seeded['training']}",
            headers={"Authorization": f"Bearer {tokens[SINGLERS[0]]}"},
            timeout=HTTP_SECONDS,
        ).json()
        body = {
            "training_id": training["id"],
            "model_id": training["model_id"],
            "prompt": "The weather today is",
            "features": [{"feature_id": seeded["feature"], "coefficient": 1.0}],
            "intervention_layers": [training["hook_layer"]],
            "temperature": 0.7,
            "max_tokens": TOKENS,
        }
        statuses, lock = Counter(), threading.Lock()
        clients = {name: Client(url, tokens[name], body, statuses, lock) for name in tokens}
        deadline = time.monotonic() + LOAD_SECONDS

        def backlog(client: Client) -> None:
            for seed_value in range(SWEEPS_EACH):
                client.submit(deadline, sweep=SWEEP, seed=seed_value)

        def singles(client: Client) -> None:
            for seed_value in range(SINGLES // len(SINGLERS)):
                client.submit(deadline, seed=seed_value)
                client.await_last(deadline)

        threads = [threading.Thread(target=backlog, args=(clients[name],)) for name in SWEEPERS]
        threads += [threading.Thread(target=singles, args=(clients[name],)) for name in SINGLERS]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))
        every_run: list[dict] = []
        while time.monotonic() < deadline:
            every_run = [run for client in clients.values() for run in client.runs()]
            if all(run["status"] in FINISHED for run in every_run):
                break
            time.sleep(4 * POLL_SECONDS)
        elapsed = time.monotonic() - started
    finally:
        stop(server)

    outcomes = Counter(run["status"] for run in every_run)
    failures = [(run["id"], run["error"]) for run in every_run if run["status"] == "failed"]
    singles_done = [run for run in every_run if run["owner"] in SINGLERS]
    waits = [moment(run["started_at"]) - moment(run["created_at"]) for run in singles_done]
    excess = [
        (run["id"], round(wait - longest_fair_wait(run, every_run), 2))
        for run, wait in zip(singles_done, waits, strict=True)
        if wait > longest_fair_wait(run, every_run) + REACTION_SECONDS
    ]
    overtaken = [served_first(run, every_run) for run in singles_done]
    with capsys.disabled():
        print(
            f"\n[load] {elapsed:.0f} s: HTTP {dict(sorted(statuses.items()))}, runs {dict(outcomes)}, "
            f"longest single-run wait {max(waits, default=0):.2f} s, "
            f"most runs started while one waited {max(overtaken, default=0)}"
        )
    assert not any(thread.is_alive() for thread in threads), "the clients did not finish within the bound"
    assert statuses[500] == 0, (statuses, tails(log))
    assert statuses[429] > 0, f"no sweep met the queue cap of {QUEUE_CAP}: {statuses}"
    assert failures == [], tails(log)
    assert len(every_run) == len(SWEEPERS) * SWEEPS_EACH + SINGLES, (outcomes, statuses)
    assert outcomes == {"completed": len(every_run)}, (outcomes, tails(log))
    assert excess == [], f"single runs that waited past the runs in flight ahead of them: {excess}"
    other_members = len(SWEEPERS) + len(SINGLERS) - 1
    assert max(overtaken) <= other_members, f"runs started while a single run waited: {overtaken}"
