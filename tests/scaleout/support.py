"""The real Redis the scale-out tests run against."""

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


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
