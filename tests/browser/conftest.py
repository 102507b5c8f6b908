"""A real daphne server (embedded worker, its own SQLite file) and Debian's chromium driven by Playwright.

Skips with the reason when chromium or Playwright is missing; REQUIRE_BROWSER=1 turns the skip into a failure.
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import ROOT, free_port, wait_for_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_SECONDS = 120
SEED_SECONDS = 600  # the first registration of SmolLM2 dequantizes its GGUF (tens of seconds on a busy CPU)


def unavailable(reason: str):
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(f"REQUIRE_BROWSER=1 but {reason}")
    print(f"\nSKIP browser tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        unavailable(f"chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        unavailable("the playwright package is not installed")
    return CHROMIUM


@dataclass
class Server:
    url: str
    username: str
    password: str
    seed: dict
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text()[-6000:]


def server_environment(workdir: Path) -> dict:
    env = dict(os.environ)
    # The embedded default deployment: in-memory channel layer and the worker inside daphne.
    for name in ("REDIS_URL", "STEERLAB_WORKER_MODE", "DJANGO_SETTINGS_MODULE"):
        env.pop(name, None)
    env.update(
        DATABASE_URL=f"sqlite:///{workdir / 'db.sqlite3'}",
        SECRET_KEY="browser-test-secret-key",
        DEBUG="0",
        ALLOWED_HOSTS="127.0.0.1",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="module")
def server(chromium_path, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("browser-server")
    env = server_environment(workdir)
    python = sys.executable
    subprocess.run(
        [python, "manage.py", "migrate", "--noinput"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=SEED_SECONDS,
    )
    seeded = subprocess.run(
        [python, str(ROOT / "tests/browser/seed_server.py"), str(workdir), "alice", "pw-alice-123"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SEED_SECONDS,
        check=False,
    )
    assert seeded.returncode == 0, seeded.stderr[-4000:]
    seed = json.loads(seeded.stdout.strip().splitlines()[-1])

    port = free_port()
    log = workdir / "daphne.log"
    daphne = shutil.which("daphne", path=str(Path(python).parent)) or "daphne"
    with log.open("w") as out:
        process = subprocess.Popen(
            [daphne, "-b", "127.0.0.1", "-p", str(port), "steerproject.asgi:application"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, process, log, SERVER_START_SECONDS)
        yield Server(
            url=f"http://127.0.0.1:{port}", username="alice", password="pw-alice-123", seed=seed, log=log
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        yield page
    finally:
        context.close()
