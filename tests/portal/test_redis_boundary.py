"""Redis is behind a password in every profile, and nothing read from it is unpickled."""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

import pytest
import redis
from django.core.cache import cache

from portal.stack import Stack, ensure_redis


class PlantFile:
    """What an attacker who can write into Redis would plant: a pickle that runs code when loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.path),))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_it_refuses_a_write_without_the_password() -> None:
    url = redis.connection.parse_url(os.environ["REDIS_URL"])
    assert url.get("password"), "the test services' Redis must have a password like every profile"
    anonymous = redis.Redis(host=url["host"], port=url["port"])
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.set("bulkhead:planted", "x")


def test_it_starts_the_embedded_redis_with_a_password_kept_off_the_command_line(tmp_path: Path) -> None:
    port = _free_port()
    password = "a" * 64
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    stack = Stack()
    try:
        ensure_redis(stack, tmp_path, url)
        assert redis.Redis.from_url(url).set("bulkhead:ok", "1")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).set("bulkhead:planted", "x")
        (_name, proc), *_ = stack.children
        assert password.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert (tmp_path / "redis" / "redis.conf").stat().st_mode & 0o077 == 0
    finally:
        stack.stop()


def test_it_refuses_to_share_a_redis_that_does_not_know_its_password(tmp_path: Path) -> None:
    port = _free_port()
    stack = Stack()
    try:
        ensure_redis(stack, tmp_path / "first", f"redis://:{'b' * 64}@127.0.0.1:{port}/0")
        with pytest.raises(SystemExit):
            ensure_redis(Stack(), tmp_path / "second", f"redis://:{'c' * 64}@127.0.0.1:{port}/0")
    finally:
        stack.stop()


def test_it_never_unpickles_what_it_reads_from_the_cache(tmp_path: Path) -> None:
    canary = tmp_path / "pickle-ran"
    cache.set("planted", "placeholder")
    # Overwrite the cache's own key with a pickle, as whoever could write into Redis would.
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    keys = client.keys("*planted*")
    assert len(keys) == 1
    client.set(keys[0], pickle.dumps(PlantFile(canary)))
    with pytest.raises(ValueError):
        cache.get("planted")
    assert not canary.exists()


def test_it_round_trips_the_values_the_portal_caches() -> None:
    cache.set("counter", 1)
    assert cache.incr("counter") == 2
    cache.set("usage", (5, 1.5, 2))
    assert cache.get("usage") == [5, 1.5, 2]
    cache.set("token", {"user": 1, "workload": "w"})
    assert cache.get("token") == {"user": 1, "workload": "w"}
