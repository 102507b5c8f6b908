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
        ({"STEERLAB_SLOT_ROWS": "0"}, "STEERLAB_SLOT_ROWS"),
        ({"STEERLAB_SLOT_TOKENS": "lots"}, "STEERLAB_SLOT_TOKENS"),
        ({"STEERLAB_CUDA_GRAPHS": "maybe"}, "STEERLAB_CUDA_GRAPHS"),
        ({"STEERLAB_WORKER_MODE": "threads"}, "STEERLAB_WORKER_MODE"),
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


def test_it_picks_the_worker_mode_from_redis_unless_told():
    assert env.worker_mode({}) == "embedded"
    assert env.worker_mode({"REDIS_URL": "redis://cache:6379/1"}) == "channel"
    assert (
        env.worker_mode({"REDIS_URL": "redis://cache:6379/1", "STEERLAB_WORKER_MODE": " Inline "}) == "inline"
    )
    with pytest.raises(ImproperlyConfigured, match="STEERLAB_WORKER_MODE"):
        env.worker_mode({"STEERLAB_WORKER_MODE": "embeded"})


def test_it_leaves_an_unset_slot_size_to_the_device():
    assert env.slot_size({}, "STEERLAB_SLOT_ROWS") is None
    assert env.slot_size({"STEERLAB_SLOT_ROWS": " "}, "STEERLAB_SLOT_ROWS") is None
    assert env.slot_size({"STEERLAB_SLOT_TOKENS": "2048"}, "STEERLAB_SLOT_TOKENS") == 2048
    with pytest.raises(ImproperlyConfigured, match="STEERLAB_SLOT_ROWS"):
        env.slot_size({"STEERLAB_SLOT_ROWS": "-1"}, "STEERLAB_SLOT_ROWS")


def test_the_app_hands_the_engine_its_settings_at_start_without_importing_torch(tmp_path):
    code = (
        "import sys, django; django.setup(); from steering_app import engine_config as e; "
        "c = e.current; print(repr((str(c.data_dir), c.device, c.dtype, c.embedder, c.slot_rows, "
        "c.slot_tokens, c.cuda_graphs, 'torch' in sys.modules)))"
    )
    variables = {
        "SECRET_KEY": "k",
        "DJANGO_SETTINGS_MODULE": "steerproject.settings",
        "STEERLAB_DEVICE": "cpu",
        "STEERLAB_DTYPE": "bfloat16",
        "STEERLAB_EMBEDDER": "/models/embedder",
        "STEERLAB_SLOT_ROWS": "5",
        "STEERLAB_SLOT_TOKENS": "",
        "STEERLAB_CUDA_GRAPHS": "off",
    }
    result = run_python(tmp_path, variables, code)
    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == (
        str(tmp_path),
        "cpu",
        "bfloat16",
        "/models/embedder",
        5,
        None,
        False,
        False,
    )


@pytest.mark.parametrize(
    ("variables", "variants", "tokens"),
    [
        ({}, 7, 512),  # auto: the CPU's shape, the smaller (steering_settings.slot_shape)
        ({"STEERLAB_DEVICE": "cuda:1"}, 8, 1024),
        ({"STEERLAB_DEVICE": "cuda", "STEERLAB_SLOT_ROWS": "4", "STEERLAB_SLOT_TOKENS": "300"}, 3, 300),
    ],
)
def test_the_web_tier_reads_the_workers_batch_shape_from_settings_alone(
    tmp_path, variables, variants, tokens
):
    code = (
        "import sys, django; django.setup(); from steering_app import steering_settings as s; "
        "print(repr((s.max_variants(), s.slot_shape()[1], 'torch' in sys.modules)))"
    )
    variables = {"SECRET_KEY": "k", "DJANGO_SETTINGS_MODULE": "steerproject.settings", **variables}
    result = run_python(tmp_path, variables, code)
    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == (variants, tokens, False)


def load_settings(data_dir: Path, variables: dict, show: str = "None") -> subprocess.CompletedProcess:
    """Import the settings in a fresh interpreter, as a server start would."""
    return run_python(data_dir, variables, f"from steerproject import settings as s; print(repr(({show},)))")


def run_python(data_dir: Path, variables: dict, code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter, as a server start would, with these variables over a clean environment."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY"} and not k.startswith("STEERLAB_SLOT")
    }
    clean.update({"STEERLAB_DATA_DIR": str(data_dir), **variables})
    if "STEERLAB_DEVICE" not in variables:
        clean.pop("STEERLAB_DEVICE", None)
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )
