"""The data directory, the SQLite database and the generated secret key are the owner's alone: 0700 and 0600.

They hold the lab's runs, presets, API token hashes and password hashes; with the usual umask (022) the
directory and the database would be readable by every account on the machine.
"""

import os
import secrets
import tempfile
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


def read_or_create_secret(path: Path) -> str:
    """The secret kept in path (0600), written there first, at random, when the file does not exist yet."""
    if not path.exists():
        # mkstemp makes the file 0600 before a byte is written. It is linked into place, not renamed: two
        # processes starting at once (daphne and a runworker) then both use the key that got there first.
        handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "w") as file:
                file.write(secrets.token_urlsafe(50) + "\n")
            os.link(staging, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(staging)
    _chmod_if_owned(path, 0o600)
    return path.read_text().strip()


def _chmod_if_owned(path: Path, mode: int) -> None:
    # A directory an administrator shares on purpose (another owner) is left as it is.
    status = path.stat()
    if status.st_uid == os.getuid() and status.st_mode & 0o777 != mode:
        path.chmod(mode)
