"""The name cache behind the protected networks (pure logic, with a look-up the test controls): a new
name is waited for briefly once, a name still being looked up is not waited for again, and a name keeps
its last addresses when a later look-up fails."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address

from compute.resolver import NameCache


class Resolver:
    """A look-up that answers each name only when the test lets it."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.released = threading.Event()
        self.asked: list[str] = []

    def __call__(self, name: str) -> list[IPv4Address]:
        self.asked.append(name)
        self.released.wait(30)
        return [IPv4Address(a) for a in self.answers.get(name, [])]


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.01)


def test_it_waits_briefly_once_for_a_new_name_and_has_its_addresses_once_answered() -> None:
    resolver = Resolver({"db.internal": ["10.5.3.1"]})
    cache = NameCache(resolver, first_wait=0.2)

    started = time.monotonic()
    first = cache.addresses(["db.internal", "10.5.0.7", "[10.5.0.8]", ""])
    waited = time.monotonic() - started
    started = time.monotonic()
    second = cache.addresses(["db.internal"])
    waited_again = time.monotonic() - started
    resolver.released.set()
    wait_for(lambda: cache.addresses(["db.internal"])["db.internal"])

    assert first == {
        "db.internal": [],
        "10.5.0.7": [IPv4Address("10.5.0.7")],
        "10.5.0.8": [IPv4Address("10.5.0.8")],
    }
    assert 0.2 <= waited < 1.0 and waited_again < 0.1
    assert second == {"db.internal": []}
    assert cache.addresses(["db.internal"]) == {"db.internal": [IPv4Address("10.5.3.1")]}
    assert resolver.asked == ["db.internal"]


def test_it_keeps_a_names_last_addresses_when_a_later_look_up_fails() -> None:
    resolver = Resolver({"portal.example": ["203.0.113.80"]})
    resolver.released.set()
    cache = NameCache(resolver, ttl=0.0, first_wait=2.0)
    assert cache.addresses(["portal.example"]) == {"portal.example": [IPv4Address("203.0.113.80")]}

    resolver.answers.clear()  # the resolver stops answering
    # Asked a third time: the second look-up, which failed, has ended.
    wait_for(lambda: bool(cache.addresses(["portal.example"])) and len(resolver.asked) >= 3)

    assert cache.addresses(["portal.example"]) == {"portal.example": [IPv4Address("203.0.113.80")]}
    resolver.answers["portal.example"] = ["203.0.113.81"]  # it answers again, with a new address
    wait_for(lambda: cache.addresses(["portal.example"])["portal.example"] == [IPv4Address("203.0.113.81")])


def test_it_starts_looking_names_up_ahead_of_the_first_request() -> None:
    resolver = Resolver({"redis.internal": ["10.5.2.1"]})
    resolver.released.set()
    cache = NameCache(resolver, first_wait=0.0)
    cache.ask_ahead(["redis.internal", "10.5.0.7"])
    wait_for(lambda: cache.addresses(["redis.internal"])["redis.internal"])
    assert resolver.asked == ["redis.internal"]
