"""A real daphne server (embedded worker, its own SQLite file) and Debian's chromium driven by Playwright.

Skips with the reason when chromium or Playwright is missing; REQUIRE_BROWSER=1 turns the skip into a failure.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import processes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


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
    # The user's cookies once the run's first log_in has signed in through the form; later ones reuse them.
    session_cookies: list[dict] = field(default_factory=list)

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


# One server for the whole run: its start (migrate, seed, daphne) and the model its embedded worker loads on the
# first run cost more than most browser tests. A test that changes shared rows puts them back.
@pytest.fixture(scope="session")
def server(chromium_path, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("browser-server")
    env = server_environment(workdir)
    # With the tiny model that test_model_loading's first run loads (made by the seed, which imports torch anyway).
    seed_env = {**env, "STEERLAB_SEED_LOADING_MODEL": str(workdir / "tiny-loading")}
    seed = processes.seed(seed_env, workdir, "alice", "pw-alice-123")
    port, log = processes.free_port(), workdir / "daphne.log"
    process = processes.start_daphne(env, log, port)
    try:
        yield Server(
            url=f"http://127.0.0.1:{port}", username="alice", password="pw-alice-123", seed=seed, log=log
        )
    finally:
        processes.stop(process)


# Per module, unlike the server: Playwright's sync API keeps an event loop running in this thread while it is
# open, and the Django tests after the browser's would then refuse to touch the database ("async context").
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
