"""The embedded deployment's seeded data dir, made once for the crash tests and copied for each of them.

Migrating and seeding (tests/browser/seed_server.py) starts Django and writes the demo training: seconds of
CPU that every test would spend again on the same rows. Each test gets its own copy of the data dir (the
SQLite file, and the link to the shared model cache), so no test sees another's runs.
"""

import shutil
from pathlib import Path

import pytest

from tests.processes import embedded_environment, seed, share_model_cache

USER, PASSWORD = "alice", "pw-alice-123"
MEMBERS = ("bob", "carol", "dave", "erin")  # the load test's other members


@pytest.fixture(scope="session")
def seeded_embedded(tmp_path_factory) -> tuple[Path, dict]:
    """A migrated and seeded data dir (USER with PASSWORD, the MEMBERS, a completed SmolLM2 training), and the
    seed's JSON (the training, a feature, each user's API token)."""
    workdir = tmp_path_factory.mktemp("embedded-seed")
    data_dir = workdir / "data"
    share_model_cache(data_dir)
    seeded = seed(embedded_environment(data_dir), workdir, USER, PASSWORD, members=MEMBERS)
    return data_dir, seeded


@pytest.fixture
def embedded(seeded_embedded, tmp_path) -> tuple[Path, dict, dict]:
    """This test's own copy of the seeded data dir: (data dir, its environment, the seed's JSON)."""
    template, seeded = seeded_embedded
    data_dir = tmp_path / "data"
    shutil.copytree(template, data_dir, symlinks=True)  # the seed process has exited: the file is whole
    return data_dir, embedded_environment(data_dir), seeded
