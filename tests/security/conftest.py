"""Security fixtures. Users come from tests/conftest.py."""

import pytest
from django.core.cache import cache


@pytest.fixture(autouse=True)
def fresh_cache():
    """Login failures live in the cache, which outlives a test's database transaction."""
    cache.clear()
    yield
    cache.clear()
