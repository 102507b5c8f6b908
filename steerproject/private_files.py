"""The data directory and the SQLite database are the owner's alone: 0700 and 0600.

They hold the lab's runs, presets, API token hashes and password hashes; with the usual umask (022) the
directory and the database would be readable by every account on the machine.
"""

import os
from pathlib import Path

SQLITE_COMPANIONS = ("", "-wal", "-shm", "-journal")


def make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _chmod_if_owned(path, 0o700)


def make_sqlite_files_private(sender, connection, **kwargs) -> None:
    """connection_created receiver: chmod the database file and its WAL companions on every new connection."""
    if connection.vendor != "sqlite" or connection.is_in_memory_db():
        return
    name = str(connection.settings_dict["NAME"])
    for suffix in SQLITE_COMPANIONS:
        path = Path(name + suffix)
        if path.exists():
            _chmod_if_owned(path, 0o600)


def _chmod_if_owned(path: Path, mode: int) -> None:
    # A directory an administrator shares on purpose (another owner) is left as it is.
    status = path.stat()
    if status.st_uid == os.getuid() and status.st_mode & 0o777 != mode:
        path.chmod(mode)
