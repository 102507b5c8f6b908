import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from steerproject import env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("variables", "name"),
    [
        ({"DEBUG": "maybe"}, "DEBUG"),
        ({"STEERLAB_MAX_NEW_TOKENS": "many"}, "STEERLAB_MAX_NEW_TOKENS"),
        ({"STEERLAB_MAX_NEW_TOKENS": "0"}, "STEERLAB_MAX_NEW_TOKENS"),
        ({"STEERLAB_DEVICE": "tpu"}, "STEERLAB_DEVICE"),
        ({"STEERLAB_DTYPE": "fp8"}, "STEERLAB_DTYPE"),
        ({"DATABASE_URL": "mysql://db/x"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://127.0.0.1:6379"}, "REDIS_URL"),
        ({"STEERLAB_RUN_TIMEOUT": "-5"}, "STEERLAB_RUN_TIMEOUT"),
    ],
)
def test_it_refuses_a_bad_value_naming_the_variable(tmp_path, variables, name):
    result = load_settings(tmp_path, {"SECRET_KEY": "k", **variables})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and name in result.stderr


def test_it_requires_a_secret_key_unless_debug(tmp_path):
    result = load_settings(tmp_path, {"SECRET_KEY": ""})
    assert result.returncode != 0 and "SECRET_KEY" in result.stderr
    assert load_settings(tmp_path, {"SECRET_KEY": "", "DEBUG": "1"}).returncode == 0


def test_it_defaults_to_sqlite_and_the_in_memory_layer_under_the_data_dir(tmp_path):
    result = load_settings(
        tmp_path,
        {"SECRET_KEY": "k"},
        show=(
            "s.DATABASES['default']['ENGINE'], str(s.DATABASES['default']['NAME']), "
            "s.CHANNEL_LAYERS['default']['BACKEND'], s.STEERLAB_MAX_NEW_TOKENS, s.STEERLAB_DEVICE"
        ),
    )
    assert result.returncode == 0, result.stderr
    engine, name, layer, cap, device = eval(result.stdout)  # a tuple literal printed by the child
    assert engine == "django.db.backends.sqlite3"
    assert name == str(tmp_path / "steerlab.sqlite3")
    assert layer == "channels.layers.InMemoryChannelLayer"
    assert (cap, device) == (512, "auto")


def test_it_switches_to_postgres_and_redis_from_urls(tmp_path):
    result = load_settings(
        tmp_path,
        {"SECRET_KEY": "k", "DATABASE_URL": "postgres://u@db:5432/lab", "REDIS_URL": "redis://cache:6379/1"},
        show="s.DATABASES['default']['ENGINE'], s.DATABASES['default']['NAME'], s.CHANNEL_LAYERS['default']",
    )
    assert result.returncode == 0, result.stderr
    engine, name, layer = eval(result.stdout)
    assert engine == "django.db.backends.postgresql" and name == "lab"
    assert layer["BACKEND"] == "channels_redis.core.RedisChannelLayer"
    assert layer["CONFIG"]["hosts"] == [{"address": "redis://cache:6379/1", "socket_timeout": None}]


def test_it_parses_lists_booleans_and_devices():
    assert env.env_list({"ALLOWED_HOSTS": "a.lab, b.lab,"}, "ALLOWED_HOSTS", []) == ["a.lab", "b.lab"]
    assert env.env_bool({"DEBUG": "Yes"}, "DEBUG", False) is True
    assert env.device({"STEERLAB_DEVICE": "cuda:1"}) == "cuda:1"
    with pytest.raises(ImproperlyConfigured, match="STEERLAB_DEVICE"):
        env.device({"STEERLAB_DEVICE": "cuda:x"})


def test_it_parses_the_dtype_defaulting_to_auto():
    assert env.dtype({}) == "auto" and env.dtype({"STEERLAB_DTYPE": " BFloat16 "}) == "bfloat16"
    with pytest.raises(ImproperlyConfigured, match="STEERLAB_DTYPE"):
        env.dtype({"STEERLAB_DTYPE": "half"})


def load_settings(data_dir: Path, variables: dict, show: str = "None") -> subprocess.CompletedProcess:
    """Import the settings in a fresh interpreter, as a server start would."""
    clean = {
        k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY"}
    }
    clean.update({"STEERLAB_DATA_DIR": str(data_dir), **variables})
    if "STEERLAB_DEVICE" not in variables:
        clean.pop("STEERLAB_DEVICE", None)
    code = f"from steerproject import settings as s; print(repr(({show},)))"
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )
