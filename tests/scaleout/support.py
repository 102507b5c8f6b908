"""The real Redis (and PostgreSQL) the scale-out tests run against, and the environment of their processes."""

import os
import time
from pathlib import Path

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
POSTGRES = "postgresql://postgres@127.0.0.1:5432"


def redis_client(db: int = 0):
    try:
        import redis
    except ImportError:
        return None, "the redis package is not installed"
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as error:
        return None, f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT} ({error})"
    return client, ""


def environment(database_url: str, redis_db: int) -> dict:
    """The lab deployment: DATABASE_URL and REDIS_URL, so web processes hand runs to runworker processes."""
    env = dict(os.environ)
    env.pop("STEERLAB_WORKER_MODE", None)
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}",
        SECRET_KEY="scaleout-test-secret-key",
        PYTHONUNBUFFERED="1",
        # One thread per worker: two workers with a thread per core each, on 2 cores shared with other
        # processes, decoded 48 tokens in 211 s instead of 18 s (measured at a load average of 8); two workers
        # measuring their kernels as they start took 19 s of CPU each instead of 1.7 s (load average 6 to 9).
        OMP_NUM_THREADS="1",
    )
    return env


def listening_workers(client, redis_db: int) -> int:
    """Worker connections blocked on the channel: channels_redis receives with BZPOPMIN."""
    return sum(
        1 for c in client.client_list() if c.get("cmd") == "bzpopmin" and int(c.get("db", -1)) == redis_db
    )


def wait_for_listeners(client, redis_db: int, workers: list, logs: list[Path], seconds: float) -> None:
    """Until every worker process listens on the channel; fails at once, with the logs, if one exits."""
    deadline = time.monotonic() + seconds
    while listening_workers(client, redis_db) < len(workers):
        dead = [w.returncode for w in workers if w.poll() is not None]
        assert not dead, f"a worker exited ({dead}):\n" + "\n".join(log.read_text()[-3000:] for log in logs)
        assert time.monotonic() < deadline, f"workers did not listen within {seconds} s"
        time.sleep(0.2)
