"""Parsing of SteerLab's environment variables.

Each parser takes the environment mapping explicitly so tests can feed it a dict; a bad value raises
ImproperlyConfigured naming the variable, so a misconfigured deployment fails at start-up, not mid-run.
"""

import re
from collections.abc import Mapping
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from steerproject import private_files

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")
WORKER_MODES = ("inline", "embedded", "channel")
# The worker thread and the web requests write to one SQLite file: WAL lets readers run beside a writer,
# IMMEDIATE transactions take the write lock up front (no deadlock upgrading a read lock), and a writer waits
# up to 20 s for the lock instead of failing at once with "database is locked".
SQLITE_OPTIONS = {
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    "transaction_mode": "IMMEDIATE",
    "timeout": 20,
}


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ImproperlyConfigured(f"{name} must be one of 1/0, true/false, yes/no, on/off; got {raw!r}")


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer; got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}; got {value}")
    return value


def env_list(env: Mapping[str, str], name: str, default: list[str]) -> list[str]:
    raw = env.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def secret_key(env: Mapping[str, str], debug: bool, data_path: Path) -> str:
    key = env.get("SECRET_KEY", "")
    if key:
        return key
    if debug:
        # A key written in the code is public: anyone could forge sessions and signed tokens of a server
        # that runs with it. A development server gets a random key of its own, in the file that `make serve`
        # generates, so sessions survive a restart.
        return private_files.read_or_create_secret(data_path / "secret_key")
    raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off")


def device(env: Mapping[str, str]) -> str:
    value = env.get("STEERLAB_DEVICE", "auto").strip().lower() or "auto"
    if not DEVICE_PATTERN.match(value):
        raise ImproperlyConfigured(f"STEERLAB_DEVICE must be auto, cpu, cuda or cuda:N; got {value!r}")
    return value


def dtype(env: Mapping[str, str]) -> str:
    """The models' weights and activations: auto is float32 on a CPU, bfloat16 on a GPU that supports it."""
    value = env.get("STEERLAB_DTYPE", "auto").strip().lower() or "auto"
    if value not in DTYPES:
        raise ImproperlyConfigured(f"STEERLAB_DTYPE must be one of {', '.join(DTYPES)}; got {value!r}")
    return value


def slot_size(env: Mapping[str, str], name: str) -> int | None:
    """STEERLAB_SLOT_ROWS / STEERLAB_SLOT_TOKENS: a worker's batch shape; None (unset): the device's default
    (steering_app/engine_config.py, SLOT_SHAPES)."""
    raw = env.get(name, "").strip()
    return env_int(env, name, default=1) if raw else None


def worker_mode(env: Mapping[str, str]) -> str:
    """STEERLAB_WORKER_MODE: how a run reaches a worker (steering_app/worker.py); unset: a channel message to
    runworker processes with REDIS_URL, else the embedded worker."""
    value = env.get("STEERLAB_WORKER_MODE", "").strip().lower()
    if not value:
        return "channel" if env.get("REDIS_URL", "").strip() else "embedded"
    if value not in WORKER_MODES:
        raise ImproperlyConfigured(
            f"STEERLAB_WORKER_MODE must be one of {', '.join(WORKER_MODES)}; got {value!r}"
        )
    return value


def data_dir(env: Mapping[str, str], base_dir: Path) -> Path:
    raw = env.get("STEERLAB_DATA_DIR", "").strip()
    path = Path(raw) if raw else base_dir / "var"
    if path.exists() and not path.is_dir():
        raise ImproperlyConfigured(f"STEERLAB_DATA_DIR must be a directory; {path} is a file")
    return path.resolve()


def dataset_dirs(env: Mapping[str, str]) -> list[Path]:
    """STEERLAB_DATASET_DIRS: folders, besides <data dir>/datasets, that trainings and calibrations may read."""
    dirs = []
    for item in env_list(env, "STEERLAB_DATASET_DIRS", []):
        path = Path(item).expanduser()
        if not path.is_absolute():
            raise ImproperlyConfigured(f"STEERLAB_DATASET_DIRS must list absolute paths; got {item!r}")
        if not path.is_dir():
            raise ImproperlyConfigured(f"STEERLAB_DATASET_DIRS lists {item!r}, which is not a directory")
        dirs.append(path.resolve())
    return dirs


def database(env: Mapping[str, str], data_path: Path) -> dict:
    url = env.get("DATABASE_URL", "").strip()
    if not url:
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": data_path / "steerlab.sqlite3",
            "OPTIONS": SQLITE_OPTIONS,
        }
    import dj_database_url

    if not url.startswith(("postgres://", "postgresql://", "sqlite://")):
        raise ImproperlyConfigured(f"DATABASE_URL must be a postgres:// or sqlite:// URL; got {url!r}")
    try:
        parsed = dj_database_url.parse(url, conn_max_age=60)
    except ValueError as error:
        raise ImproperlyConfigured(f"DATABASE_URL is malformed: {error}") from None
    if parsed["ENGINE"] == "django.db.backends.sqlite3":
        parsed["OPTIONS"] = {**SQLITE_OPTIONS, **parsed.get("OPTIONS", {})}
    return parsed


def channel_layers(env: Mapping[str, str]) -> dict:
    url = env.get("REDIS_URL", "").strip()
    if not url:
        return {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ImproperlyConfigured(f"REDIS_URL must be a redis:// URL; got {url!r}")
    return {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py 8 reads with a 5 s socket timeout by default; an idle channel receive would hit it and
            # kill runworker processes and websocket streams (redis/redis-py#4091, channels_redis#422).
            "CONFIG": {"hosts": [{"address": url, "socket_timeout": None}], "capacity": 1500, "expiry": 120},
        }
    }


def caches(env: Mapping[str, str]) -> dict:
    """Redis (shared by every process, so login throttling counts across them) when REDIS_URL is set."""
    url = env.get("REDIS_URL", "").strip()
    if not url:
        return {
            "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "steerlab"}
        }
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ImproperlyConfigured(f"REDIS_URL must be a redis:// URL; got {url!r}")
    return {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": url,
            "KEY_PREFIX": "steerlab",
        }
    }


# The engine's StepPolicy choices (engine/serving/plan.py), spelled here: settings must not import the engine.
STEP_CHOICES = {
    "STEERLAB_STEP_LEAN": ("auto", "on", "off"),
    "STEERLAB_STEP_KERNEL": ("auto", "linear", "wxt", "packed"),
    "STEERLAB_STEP_ROWS": ("auto", "occupied", "all"),
}


def step_policy(env: Mapping[str, str]) -> dict[str, str]:
    """How the worker's slot step is chosen, as StepPolicy's fields: auto measures on this machine; any other
    value forces that choice, and a batch that cannot take it fails to build, naming it."""
    policy = {}
    for name, choices in STEP_CHOICES.items():
        value = env.get(name, "").strip().lower() or "auto"
        if value not in choices:
            raise ImproperlyConfigured(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        policy[name.removeprefix("STEERLAB_STEP_").lower()] = value
    return policy
