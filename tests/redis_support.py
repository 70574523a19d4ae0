"""Shared by the tests that need a real Redis (fleet mode): where it is, and cleaning up."""

from __future__ import annotations

import os

import pytest

#: the Redis the fleet tests use; a database of their own by default
REDIS_URL = os.environ.get("CAPGATE_REDIS_URL", "redis://127.0.0.1:6379/15")


def reachable(url: str = REDIS_URL) -> bool:
    """Whether a Redis answers PING at ``url`` within a second."""
    try:
        import redis
    except ImportError:
        return False
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


#: skip a test (or module) when no Redis answers
needs_redis = pytest.mark.skipif(
    not reachable(), reason=f"no Redis at {REDIS_URL} (set CAPGATE_REDIS_URL)"
)


def delete_namespace(namespace: str, url: str = REDIS_URL) -> None:
    """Delete every key a test's gates wrote under ``namespace``."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
