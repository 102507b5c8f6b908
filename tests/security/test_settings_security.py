"""Security settings from the environment; private data files; SQLite in WAL mode; API token writes."""

import stat
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.db.backends.sqlite3.base import DatabaseWrapper
from django.utils import timezone

from steering_app.models import ApiToken
from steerproject import env
from steerproject.private_files import make_private_dir
from tests.steering.test_settings import load_settings


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- STEERLAB_SECURE_COOKIES, STEERLAB_HSTS_SECONDS, caches


def test_it_keeps_cookies_plain_and_hsts_off_by_default(tmp_path):
    result = load_settings(
        tmp_path,
        {"SECRET_KEY": "k"},
        show="s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, getattr(s, 'SECURE_PROXY_SSL_HEADER', None), "
        "s.SECURE_HSTS_SECONDS",
    )

    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == (False, False, None, 0)


def test_it_turns_on_secure_cookies_and_hsts(tmp_path):
    result = load_settings(
        tmp_path,
        {"SECRET_KEY": "k", "STEERLAB_SECURE_COOKIES": "yes", "STEERLAB_HSTS_SECONDS": "31536000"},
        show="s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_PROXY_SSL_HEADER, s.SECURE_HSTS_SECONDS",
    )

    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == (True, True, ("HTTP_X_FORWARDED_PROTO", "https"), 31536000)


@pytest.mark.parametrize(
    ("variables", "name"),
    [
        ({"STEERLAB_SECURE_COOKIES": "sometimes"}, "STEERLAB_SECURE_COOKIES"),
        ({"STEERLAB_HSTS_SECONDS": "a year"}, "STEERLAB_HSTS_SECONDS"),
        ({"STEERLAB_HSTS_SECONDS": "-1"}, "STEERLAB_HSTS_SECONDS"),
        ({"STEERLAB_LOGIN_MAX_FAILURES": "0"}, "STEERLAB_LOGIN_MAX_FAILURES"),
        ({"STEERLAB_LOGIN_MAX_ADDRESS_FAILURES": "many"}, "STEERLAB_LOGIN_MAX_ADDRESS_FAILURES"),
        ({"STEERLAB_LOGIN_WINDOW_SECONDS": "soon"}, "STEERLAB_LOGIN_WINDOW_SECONDS"),
    ],
)
def test_it_refuses_a_bad_security_value_naming_the_variable(tmp_path, variables, name):
    result = load_settings(tmp_path, {"SECRET_KEY": "k", **variables})

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and name in result.stderr


def test_it_parses_the_security_variables():
    assert env.env_bool({"STEERLAB_SECURE_COOKIES": "on"}, "STEERLAB_SECURE_COOKIES", False) is True
    assert env.env_int({"STEERLAB_HSTS_SECONDS": "0"}, "STEERLAB_HSTS_SECONDS", 0, minimum=0) == 0
    with pytest.raises(ImproperlyConfigured, match="STEERLAB_HSTS_SECONDS"):
        env.env_int({"STEERLAB_HSTS_SECONDS": "1.5"}, "STEERLAB_HSTS_SECONDS", 0, minimum=0)


def test_it_caches_in_memory_by_default_and_in_redis_with_redis_url():
    assert env.caches({})["default"]["BACKEND"] == "django.core.cache.backends.locmem.LocMemCache"
    shared = env.caches({"REDIS_URL": "redis://cache:6379/1"})["default"]
    assert (shared["BACKEND"], shared["LOCATION"]) == (
        "django.core.cache.backends.redis.RedisCache",
        "redis://cache:6379/1",
    )
    with pytest.raises(ImproperlyConfigured, match="REDIS_URL"):
        env.caches({"REDIS_URL": "http://cache"})


# --- STEERLAB_DATASET_DIRS


def test_it_lists_the_extra_dataset_roots(tmp_path):
    (tmp_path / "corpora").mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "shared")

    result = load_settings(
        tmp_path,
        {"SECRET_KEY": "k", "STEERLAB_DATASET_DIRS": f"{tmp_path / 'corpora'}, {tmp_path / 'link'},"},
        show="[str(path) for path in s.STEERLAB_DATASET_DIRS]",
    )

    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == ([str(tmp_path / "corpora"), str(tmp_path / "shared")],)
    assert env.dataset_dirs({}) == []


@pytest.mark.parametrize(
    "entry", ["corpora", "{tmp}/missing", "{tmp}/a-file"], ids=["relative", "missing", "a file"]
)
def test_it_refuses_a_dataset_root_that_is_not_an_absolute_directory(tmp_path, entry):
    (tmp_path / "corpora").mkdir()
    (tmp_path / "a-file").write_text("")

    result = load_settings(tmp_path, {"SECRET_KEY": "k", "STEERLAB_DATASET_DIRS": entry.format(tmp=tmp_path)})

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and "STEERLAB_DATASET_DIRS" in result.stderr


# --- SECRET_KEY under DEBUG


def test_it_generates_a_private_random_key_for_debug_without_a_secret_key(tmp_path):
    first = load_settings(tmp_path / "a", {"SECRET_KEY": "", "DEBUG": "1"}, show="s.SECRET_KEY")
    again = load_settings(tmp_path / "a", {"SECRET_KEY": "", "DEBUG": "1"}, show="s.SECRET_KEY")
    elsewhere = load_settings(tmp_path / "b", {"SECRET_KEY": "", "DEBUG": "1"}, show="s.SECRET_KEY")

    assert first.returncode == again.returncode == elsewhere.returncode == 0, first.stderr
    (key,) = eval(first.stdout)
    assert key == (tmp_path / "a" / "secret_key").read_text().strip() and len(key) >= 50
    assert mode(tmp_path / "a" / "secret_key") == 0o600
    assert eval(again.stdout) == (key,)
    assert eval(elsewhere.stdout) != (key,)
    assert list((tmp_path / "a").glob("*secret_key*")) == [tmp_path / "a" / "secret_key"]  # no staging left


def test_it_uses_the_key_make_serve_generated_and_makes_it_private(tmp_path):
    (tmp_path / "secret_key").write_text("generated-by-make\n")
    (tmp_path / "secret_key").chmod(0o644)

    result = load_settings(tmp_path, {"SECRET_KEY": "", "DEBUG": "1"}, show="s.SECRET_KEY")

    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == ("generated-by-make",)
    assert mode(tmp_path / "secret_key") == 0o600


def test_it_still_requires_a_secret_key_without_debug_and_writes_none(tmp_path):
    result = load_settings(tmp_path, {"SECRET_KEY": ""})

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and "SECRET_KEY" in result.stderr
    assert not (tmp_path / "secret_key").exists()


def test_a_secret_key_from_the_environment_wins_over_the_file(tmp_path):
    (tmp_path / "secret_key").write_text("from-the-file")

    assert env.secret_key({"SECRET_KEY": "from-env"}, True, tmp_path) == "from-env"


# --- private data directory and database file


def test_it_makes_the_data_directory_private_at_startup(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)

    assert load_settings(data_dir, {"SECRET_KEY": "k"}).returncode == 0

    assert mode(data_dir) == 0o700


def test_it_creates_a_missing_data_directory_private(tmp_path):
    make_private_dir(tmp_path / "new" / "data")

    assert mode(tmp_path / "new" / "data") == 0o700


@pytest.fixture
def file_database(tmp_path, django_db_blocker):
    """A second connection, configured as the embedded default (whatever DATABASE_URL the suite runs on),
    to a SQLite file under tmp_path."""
    embedded = env.database({}, tmp_path)
    wrapper = DatabaseWrapper(
        {**connection.settings_dict, **embedded, "NAME": str(tmp_path / "steerlab.sqlite3")},
        alias="file-database",
    )
    with django_db_blocker.unblock():
        yield wrapper, tmp_path / "steerlab.sqlite3"
        wrapper.close()


def test_it_makes_the_database_and_its_wal_files_private(file_database):
    wrapper, path = file_database

    with wrapper.cursor() as cursor:
        cursor.execute("CREATE TABLE t (x INTEGER)")
        cursor.execute("INSERT INTO t VALUES (1)")
    wrapper.close()
    wrapper.connect()  # each new connection tightens the files it finds

    companions = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
    assert path in companions
    assert {p.name: mode(p) for p in companions} == {p.name: 0o600 for p in companions}


# --- SQLite WAL, busy timeout, immediate transactions


def test_the_embedded_database_uses_wal_a_busy_timeout_and_immediate_transactions(tmp_path):
    options = env.database({}, tmp_path)["OPTIONS"]

    assert "journal_mode=WAL" in options["init_command"]
    assert options["timeout"] >= 20
    assert options["transaction_mode"] == "IMMEDIATE"


def test_a_sqlite_database_url_gets_the_same_options(tmp_path):
    options = env.database({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.sqlite3'}"}, tmp_path)["OPTIONS"]

    assert options["transaction_mode"] == "IMMEDIATE" and "journal_mode=WAL" in options["init_command"]


def test_a_postgres_database_gets_no_sqlite_options(tmp_path):
    assert "init_command" not in env.database({"DATABASE_URL": "postgres://u@db/lab"}, tmp_path).get(
        "OPTIONS", {}
    )


def test_a_file_database_is_in_wal_mode_with_the_busy_timeout(file_database):
    wrapper, _ = file_database

    with wrapper.cursor() as cursor:
        journal_mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
        busy_timeout = cursor.execute("PRAGMA busy_timeout").fetchone()[0]

    assert (journal_mode, busy_timeout) == ("wal", 20_000)


# --- ApiToken.last_used_at


@pytest.mark.django_db
def test_a_token_records_its_first_use(owner):
    token, raw = ApiToken.issue(owner)

    assert ApiToken.user_for(raw) == owner

    token.refresh_from_db()
    assert token.last_used_at is not None


@pytest.mark.django_db
def test_a_token_writes_last_used_at_at_most_once_a_minute(owner, django_assert_num_queries):
    token, raw = ApiToken.issue(owner)
    ApiToken.user_for(raw)
    token.refresh_from_db()
    first = token.last_used_at

    with django_assert_num_queries(1):  # the lookup only: no UPDATE
        ApiToken.user_for(raw)
    token.refresh_from_db()
    assert token.last_used_at == first

    ApiToken.objects.filter(pk=token.pk).update(last_used_at=first - timedelta(seconds=61))
    ApiToken.user_for(raw)
    token.refresh_from_db()
    assert timezone.now() - token.last_used_at < timedelta(seconds=5)
