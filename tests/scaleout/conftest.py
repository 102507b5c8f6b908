"""Redis for the scale-out tests: skipped with the reason when it is missing, a failure under REQUIRE_REDIS=1."""

import os

import pytest

from tests.scaleout.support import redis_client


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
