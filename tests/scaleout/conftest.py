"""Redis for the scale-out tests: skipped with the reason when it is missing, a failure under REQUIRE_REDIS=1;
and a fresh, seeded PostgreSQL database for their processes.

Migrating and seeding (tests/browser/seed_server.py) is done once, into a template database; each test's
database is a copy of it (CREATE DATABASE ... TEMPLATE), so no test sees another's runs.
"""

import os
import shutil
import uuid

import pytest

from tests.processes import seed
from tests.pytest_defaults import worker_redis_db
from tests.scaleout.support import POSTGRES, environment, redis_client

USER, PASSWORD = "alice", "pw-alice-123"


@pytest.fixture(scope="module")
def redis_db():
    """An empty Redis database number, so that no other process shares the steering-worker channel."""
    client, reason = redis_client()
    if client is None:
        if os.environ.get("REQUIRE_REDIS") == "1":
            pytest.fail(f"REQUIRE_REDIS=1 but {reason}")
        print(f"\nSKIP scale-out test: {reason}")
        pytest.skip(reason)
    databases = int(client.config_get("databases").get("databases", 16))
    # Never a pytest-xdist worker's own database (tests/pytest_defaults.py): its cache may be empty right now.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    taken = {worker_redis_db(f"gw{index}") for index in range(workers)}
    start = os.getpid() % (databases - 1)
    for offset in range(databases - 1):
        number = 1 + (start + offset) % (databases - 1)
        if number not in taken and not redis_client(number)[0].dbsize():
            return number
    pytest.fail("no empty Redis database to run the scale-out test in")


def _seed(database_url: str, workdir) -> dict:
    """Migrate and seed the database; the seed's JSON (the training, a feature, USER's API token)."""
    env = environment(database_url, redis_db=0)
    env.pop("REDIS_URL")  # the seed sends no message to a worker, and must not touch a test's Redis database
    return seed(env, workdir, USER, PASSWORD)


@pytest.fixture(scope="session")
def seeded_template(tmp_path_factory):
    """(A migrated and seeded PostgreSQL template database, or SQLite file; the seed's JSON), dropped at the end."""
    import psycopg

    workdir = tmp_path_factory.mktemp("scaleout-seed")
    name = f"steerlab_scaleout_template_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(f"{POSTGRES}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        database_url = f"sqlite:///{workdir / 'db.sqlite3'}"
        yield database_url, _seed(database_url, workdir)
        return
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{POSTGRES}/{name}", _seed(f"{POSTGRES}/{name}", workdir)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def database_url(seeded_template, tmp_path_factory):
    """A fresh copy of the seeded template, dropped afterwards: a PostgreSQL database, or a SQLite file when
    PostgreSQL is not there."""
    template, _seeded = seeded_template
    if template.startswith("sqlite:///"):
        copy = tmp_path_factory.mktemp("scaleout") / "db.sqlite3"
        shutil.copyfile(template.removeprefix("sqlite:///"), copy)  # the seed process has exited
        yield f"sqlite:///{copy}"
        return
    import psycopg

    name, template_name = f"steerlab_scaleout_{uuid.uuid4().hex[:12]}", template.rsplit("/", 1)[1]
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True, connect_timeout=3) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"')
        try:
            yield f"{POSTGRES}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def seeded(seeded_template) -> dict:
    """What the seed made in every test's database: the training, a feature and USER's API token."""
    return seeded_template[1]
