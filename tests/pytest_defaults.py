"""pytest plugin loaded with -p before pytest-django sets Django up (see pyproject.toml addopts)."""

import os
from collections import Counter
from pathlib import Path

import pytest

# The suite must never depend on the developer's shell: a key, no hub access (a miss fails fast instead of
# hanging on the network), and runs executed in the submitting thread unless a test picks another mode.
os.environ.setdefault("SECRET_KEY", "test-only-secret-key")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("STEERLAB_WORKER_MODE", "inline")


# `make test` runs the suite in two pytest-xdist workers. Tests that start servers and workers (tests/browser,
# tests/crash, tests/scaleout: their session fixtures seed databases and start daphne, and the Redis ones pick an
# empty Redis database) all run on one worker, each module's tests on one worker (its module-scoped fixtures are
# computed once), and every worker has a data dir, a Redis database and a share of the cores of its own.
PROCESS_TESTS = ("tests/browser/", "tests/crash/", "tests/scaleout/")
# The Redis database of worker gwN's own Django (its cache and channel layer, when REDIS_URL is set):
# 15 - N, which tests/scaleout's redis_db fixture never picks for its processes.
REDIS_DB_OF_WORKER = 15


def worker_redis_db(worker: str) -> int:
    return REDIS_DB_OF_WORKER - int(worker.removeprefix("gw"))


def _isolate_xdist_worker() -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    from tests.processes import share_model_cache

    base = Path(os.environ.get("STEERLAB_DATA_DIR") or Path(__file__).resolve().parents[1] / "var").resolve()
    own = base / "xdist" / worker
    if not (own / "models").exists():  # the dequantized models, linked as the servers' data dirs link them
        share_model_cache(own)
    os.environ["STEERLAB_DATA_DIR"] = str(own)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    url = os.environ.get("REDIS_URL", "").strip()
    if url:  # the login throttle's counts, say, would otherwise meet the other worker's
        os.environ["REDIS_URL"] = f"{url.rsplit('/', 1)[0]}/{worker_redis_db(worker)}"


_isolate_xdist_worker()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Whole modules to a worker, and every test that starts processes to the same one (pytest-xdist's own
    `--dist loadgroup` marks cannot do it under pytest 9, which no longer lets it rename a test)."""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndProcesses(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "processes" if path.startswith(PROCESS_TESTS) else path

    return ModulesAndProcesses(config, log)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """pytest-xdist schedules tests by id: two tests with one id would silently become one."""
    ids = Counter(item.nodeid for item in items)
    shared = [nodeid for nodeid, count in ids.items() if count > 1]
    if shared:
        raise pytest.UsageError(f"{len(shared)} test ids are shared by several tests, e.g. {shared[0]}")
