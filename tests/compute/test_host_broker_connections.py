"""The portal's connections for publishing to hosts' queues (`broker_access.producer_for_queue`): a bounded
number stay open, and one that is let go (the least recently used beyond the bound, or a removed or
revoked host's) is closed entirely, its descriptors with it; a host published to again gets a new one
and its worker takes the message. Real Redis, real host ACL users."""

from __future__ import annotations

import gc
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
import redis
from django.conf import settings
from django.utils import timezone
from kombu import Connection, Exchange, Queue

from compute import broker_access, hosts
from compute.host.broker import key_prefix, url_with_credential
from compute.models import Host, HostCredential
from portal import events
from tenants.actors import Actor
from tests.conftest import World

pytestmark = pytest.mark.django_db(transaction=True)

SYSTEM = Actor.system("test")


def joined_host(name: str) -> tuple[Host, str]:
    """A host row with a credential in force: its broker ACL user is written (on commit)."""
    host = hosts.register_host(actor=SYSTEM, name=name, facts={"cpus": 2, "memory_mib": 2048})
    return host, hosts.issue_host_credential(actor=SYSTEM, host=host)


def publish(producer: Any, host: Host, payload: dict[str, Any]) -> None:
    queue = host.queue
    producer.publish(
        payload,
        exchange=queue,
        routing_key=queue,
        declare=[Queue(queue, Exchange(queue), routing_key=queue)],
        serializer="json",
    )


def publish_to(host: Host, payload: dict[str, Any]) -> None:
    with broker_access.producer_for_queue(host.queue) as producer:
        publish(producer, host, payload)


def taken_by_worker(host: Host, secret: str) -> list[Any]:
    """What the host's worker takes from its queue, connected as the host's own broker user."""
    url = url_with_credential(broker_access.agent_broker_url(host.pk), secret)
    with Connection(url, transport_options={"global_keyprefix": key_prefix(host.pk)}) as connection:
        queue = connection.SimpleQueue(host.queue)
        taken: list[Any] = []
        while True:
            try:
                message = queue.get(block=True, timeout=0.5)
            except queue.Empty:
                return taken
            taken.append(message.payload)
            message.ack()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def no_cycle_collector() -> Iterator[None]:
    """Only explicit closing (and reference counts) may free a descriptor while the test counts them."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def fleet() -> Iterator[list[tuple[Host, str]]]:
    """This test's hosts, revoked after it; no connection of an earlier test's host is open before it
    (one let go during a count would be counted as this test's)."""
    for prefix in list(broker_access._connections):
        broker_access.close_host_connection(uuid.UUID(prefix[2:-1]))
    made: list[tuple[Host, str]] = []
    yield made
    admin = redis.Redis.from_url(settings.REDIS_URL)
    for host, _ in made:
        broker_access.revoke(host.pk)
        for key in admin.scan_iter(match=f"{key_prefix(host.pk)}*"):
            admin.delete(key)


def test_it_keeps_a_bounded_number_of_host_connections_and_closes_the_others_entirely(
    world: World, fleet: list[tuple[Host, str]]
) -> None:
    size = broker_access.HOST_CONNECTIONS
    fleet.extend(joined_host(f"bht-fd-{index}") for index in range(3 * size))
    with no_cycle_collector():
        for host, _ in fleet[:size]:  # the cache full of this test's hosts
            publish_to(host, {"n": 1})
        start = open_descriptors()
        for host, _ in fleet[size:]:  # each one more host lets the least recently used one go
            publish_to(host, {"n": 1})
        grown = open_descriptors() - start
    assert grown <= 4, f"{grown} descriptors more after publishing to {2 * size} more hosts"
    # The first host's connection was let go long ago: a new one publishes, its worker takes both.
    first, secret = fleet[0]
    publish_to(first, {"n": 2})
    assert taken_by_worker(first, secret) == [{"n": 1}, {"n": 2}]


def test_it_closes_the_connection_of_a_removed_host(world: World, fleet: list[tuple[Host, str]]) -> None:
    host, _ = joined_host("bht-fd-removed")
    fleet.append((host, ""))
    # A removal publishes an event: the process's event sender (its loop and bus connection) is running
    # before the count, as it is in a portal that has sent one.
    events.publish(None, {"type": "host", "id": str(host.pk), "state": host.state})
    events.flush()
    with no_cycle_collector():
        before = open_descriptors()
        publish_to(host, {"n": 1})
        assert open_descriptors() > before  # its connection stays open between publishes

        hosts.remove_host(actor=Actor(user=world.user("oscar")), host=host)

        assert open_descriptors() == before


def test_it_closes_the_connection_of_a_host_whose_credential_is_revoked(
    world: World, fleet: list[tuple[Host, str]]
) -> None:
    host, _ = joined_host("bht-fd-revoked")
    fleet.append((host, ""))
    with no_cycle_collector():
        before = open_descriptors()
        publish_to(host, {"n": 1})

        hosts.revoke_host_credentials(actor=Actor(user=world.user("oscar")), host=host)

        assert open_descriptors() == before


def test_it_closes_the_connection_of_a_host_whose_broker_user_the_sweep_removes(
    world: World, fleet: list[tuple[Host, str]]
) -> None:
    host, _ = joined_host("bht-fd-swept")
    fleet.append((host, ""))
    with no_cycle_collector():
        before = open_descriptors()
        publish_to(host, {"n": 1})
        # Its credential revoked where the broker did not hear of it (away then): the sweep removes the user.
        HostCredential.objects.filter(host=host).update(revoked_at=timezone.now())

        assert broker_access.sync_broker_users()["removed"] >= 1  # and any a test before left

        assert open_descriptors() == before


def test_it_closes_a_connection_let_go_while_in_use_when_its_publish_ends(
    world: World, fleet: list[tuple[Host, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker_access, "HOST_CONNECTIONS", 1)
    (busy, secret), (other, _) = joined_host("bht-fd-busy"), joined_host("bht-fd-other")
    fleet.extend([(busy, secret), (other, "")])
    with no_cycle_collector():
        before = open_descriptors()
        with broker_access.producer_for_queue(busy.queue) as producer:
            publish_to(other, {"n": 1})  # the busy host's connection leaves the cache...
            publish(producer, busy, {"n": 1})  # ...but is not closed under its publisher
        publish_to(other, {"n": 2})
        broker_access.close_host_connection(other.pk)
        assert open_descriptors() == before
    assert taken_by_worker(busy, secret) == [{"n": 1}]


def test_it_publishes_from_many_threads_to_more_hosts_than_it_keeps(
    world: World, fleet: list[tuple[Host, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker_access, "HOST_CONNECTIONS", 3)
    fleet.extend(joined_host(f"bht-fd-thread-{index}") for index in range(8))
    failures: list[BaseException] = []

    def publisher(offset: int) -> None:
        try:
            for step in range(24):
                host, _ = fleet[(offset + step) % len(fleet)]
                publish_to(host, {"from": offset, "step": step})
        except BaseException as error:  # the assertion below shows it
            failures.append(error)

    with no_cycle_collector():
        before = open_descriptors()
        threads = [threading.Thread(target=publisher, args=(offset,)) for offset in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for host, _ in fleet:
            broker_access.close_host_connection(host.pk)
        assert failures == []
        assert open_descriptors() == before
    admin = redis.Redis.from_url(settings.REDIS_URL)
    # kombu keeps a queue's messages in a list at the queue's name, under the host's prefix.
    queued = [cast("int", admin.llen(f"{key_prefix(host.pk)}{host.queue}")) for host, _ in fleet]
    assert sum(queued) == 6 * 24
