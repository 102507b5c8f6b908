"""Real processes for the browser, scale-out and crash tests: daphne and runworker on 127.0.0.1, a seeded
database, a session logged in through /login/ and the API as a script uses it (a bearer token).

Every wait is bounded; stop() ends a process whatever state it is in, kill9() SIGKILLs one and reaps it.
"""

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SETUP_SECONDS = 600  # migrate, and SmolLM2's GGUF dequantized on a fresh machine (tens of seconds, busy CPU)
SERVER_START_SECONDS = 120
HTTP_SECONDS = 60
ACTIVE = ("queued", "running")
FINISHED = ("completed", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float) -> None:
    """Until something listens on 127.0.0.1:port (a bare TCP connection: no HTTP request reaches the app)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daphne exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(
        f"daphne did not listen on 127.0.0.1:{port} within {seconds} s:\n{log.read_text()[-4000:]}"
    )


def tails(*logs: Path, chars: int = 3000) -> str:
    """The end of each log, for assertion messages."""
    return "\n".join(
        f"--- {log.name} ---\n{log.read_text(errors='replace')[-chars:] if log.exists() else '(none)'}"
        for log in logs
    )


def manage(env: dict, *args: str, timeout: float = SETUP_SECONDS) -> str:
    """`python manage.py ARGS` with env; its stdout, or an assertion error with its stderr."""
    done = subprocess.run(
        [PYTHON, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, (
        f"manage.py {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}"
    )
    return done.stdout


def seed(env: dict, workdir: Path, username: str, password: str, members: tuple[str, ...] = ()) -> dict:
    """Migrate and seed in one process (tests/browser/seed_server.py): a user, other members, a completed
    SmolLM2 training; seeded["tokens"][name] is each user's API token."""
    seeded = subprocess.run(
        [PYTHON, str(ROOT / "tests/browser/seed_server.py"), str(workdir), username, password, *members],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SETUP_SECONDS,
        check=False,
    )
    assert seeded.returncode == 0, seeded.stderr[-4000:]
    return json.loads(seeded.stdout.strip().splitlines()[-1])


def embedded_environment(data_dir: Path) -> dict:
    """The default deployment: no DATABASE_URL, no REDIS_URL; SQLite in the data dir, worker in daphne."""
    env = dict(os.environ)
    for name in ("DATABASE_URL", "REDIS_URL", "STEERLAB_WORKER_MODE", "DJANGO_SETTINGS_MODULE"):
        env.pop(name, None)
    env.update(
        STEERLAB_DATA_DIR=str(data_dir),
        SECRET_KEY="crash-test-secret-key",
        DEBUG="0",
        ALLOWED_HOSTS="127.0.0.1",
        PYTHONUNBUFFERED="1",
        # One torch thread: the worker shares the cores with daphne's requests and the test's clients, and a
        # thread pool as wide as the cores then waits on preempted threads (the load test's 28 runs did not
        # complete in 120 s at a load average of 6 with two threads; they did in 63 s with one).
        OMP_NUM_THREADS="1",
    )
    return env


def share_model_cache(data_dir: Path) -> None:
    """A test's own data dir, with the dequantized models of the repository's default one (var/models):
    dequantizing SmolLM2's GGUF again for every test would cost tens of seconds. The loader writes that
    cache beside its target and renames, so processes sharing it never read a half-written model."""
    shared = ROOT / "var" / "models"
    shared.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (data_dir / "models").symlink_to(shared, target_is_directory=True)


def start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A process whose pid is the program's own (no shell in between), its output in log."""
    with log.open("a") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def start_daphne(env: dict, log: Path, port: int) -> subprocess.Popen:
    daphne = shutil.which("daphne", path=str(Path(PYTHON).parent)) or "daphne"
    process = start([daphne, "-b", "127.0.0.1", "-p", str(port), "steerproject.asgi:application"], env, log)
    try:
        wait_for_port(port, process, log, SERVER_START_SECONDS)
    except BaseException:
        stop(process)
        raise
    return process


def start_runworker(env: dict, log: Path) -> subprocess.Popen:
    return start([PYTHON, "manage.py", "runworker", "steering-worker"], env, log)


def stop(*processes: subprocess.Popen, seconds: float = 15) -> None:
    """Terminate, and kill what is still there after `seconds`; every process is reaped."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=seconds)


def kill9(process: subprocess.Popen) -> None:
    """SIGKILL, as the OOM killer or `kill -9` would, and reap it: its pid then no longer exists."""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.returncode
    try:
        os.kill(process.pid, 0)
    except ProcessLookupError:
        return
    raise AssertionError(f"pid {process.pid} still exists after SIGKILL and wait()")


def worker_name(process: subprocess.Popen) -> str:
    """What wake.worker_name() records for a run claimed by that process."""
    return f"{socket.gethostname()}:{process.pid}"


def log_in(url: str, username: str, password: str) -> requests.Session:
    """A browser-like session: the login form's CSRF token, then POST /login/; the session cookie stays."""
    session = requests.Session()
    form = session.get(f"{url}/login/", timeout=HTTP_SECONDS)
    form.raise_for_status()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
    assert token, form.text[-2000:]
    response = session.post(
        f"{url}/login/",
        data={"username": username, "password": password, "csrfmiddlewaretoken": token.group(1)},
        allow_redirects=False,
        timeout=HTTP_SECONDS,
    )
    assert response.status_code == 302 and "sessionid" in session.cookies, (
        response.status_code,
        response.text,
    )
    return session


def run_result(html: str) -> str:
    """A run page's result area (status, failure notice), for assertion messages."""
    start = html.find('<section id="run-result"')
    return html[start : start + 1500] if start >= 0 else html[-1500:]


class Api:
    """The JSON API with a bearer token, as a script uses it."""

    def __init__(self, url: str, token: str):
        self.url = url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def get(self, path: str) -> dict:
        response = self.session.get(f"{self.url}/api{path}", timeout=HTTP_SECONDS)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    def generate_async(
        self, training_id: int, feature: int, prompt: str, max_tokens: int, seed: int = 1
    ) -> int:
        """POST /api/steering/generate?async=true, steering `feature` at the training's layer: the run's id."""
        training = self.get(f"/trainings/{training_id}")
        payload = {
            "training_id": training_id,
            "model_id": training["model_id"],
            "prompt": prompt,
            "features": [{"feature_id": feature, "coefficient": 2.0}],
            "intervention_layers": [training["hook_layer"]],
            "temperature": 0.7,
            "max_tokens": max_tokens,
            "seed": seed,
        }
        response = self.session.post(
            f"{self.url}/api/steering/generate?async=true", json=payload, timeout=HTTP_SECONDS
        )
        assert response.status_code == 202, (response.status_code, response.text)
        return response.json()["run_id"]

    def run(self, run_id: int) -> dict:
        return self.get(f"/steering/runs/{run_id}")

    def wait_for(self, run_id: int, until, seconds: float, logs: tuple[Path, ...] = ()) -> dict:
        """Poll the run until `until(run)`; an assertion error with the run and the logs after `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            run = self.run(run_id)
            if until(run):
                return run
            assert time.monotonic() < deadline, (
                f"run {run_id} still {run['status']} after {seconds} s: {run}\n{tails(*logs)}"
            )
            time.sleep(0.25)


def runs_in_database(database_url: str) -> list[tuple]:
    """(id, status, worker, error) of every run, read straight from the deployment's database."""
    query = "SELECT id, status, worker, error FROM steering_app_steeringrun ORDER BY id"
    if database_url.startswith("sqlite:///"):
        path = database_url.removeprefix("sqlite:///")
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
            return db.execute(query).fetchall()
    import psycopg

    with psycopg.connect(database_url, connect_timeout=5) as db:
        return db.execute(query).fetchall()


def beating(run: dict) -> bool:
    """Running, and its liveness thread has written the heartbeat at least once since the claim."""
    return (
        run["status"] == "running"
        and run["heartbeat_at"] is not None
        and datetime.fromisoformat(run["heartbeat_at"]) > datetime.fromisoformat(run["started_at"])
    )
