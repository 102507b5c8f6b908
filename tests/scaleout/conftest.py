"""Redis for the scale-out tests: skipped with the reason when it is missing, a failure under REQUIRE_REDIS=1;
and a fresh PostgreSQL database for their processes."""

import os
import uuid

import pytest

from tests.scaleout.support import POSTGRES, redis_client


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
    start = os.getpid() % (databases - 1)
    for offset in range(databases - 1):
        number = 1 + (start + offset) % (databases - 1)
        if not redis_client(number)[0].dbsize():
            return number
    pytest.fail("no empty Redis database to run the scale-out test in")


@pytest.fixture(scope="module")
def database_url(tmp_path_factory):
    """A fresh PostgreSQL database, dropped afterwards; a shared SQLite file when PostgreSQL is not there."""
    import psycopg

    name = f"steerlab_scaleout_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(f"{POSTGRES}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        yield f"sqlite:///{tmp_path_factory.mktemp('scaleout') / 'db.sqlite3'}"
        return
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{POSTGRES}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
