"""The broker as a compromised host would use it: host A joined like any host (its broker URL and
credential from the join), and with that connection it tries to read and take the work sent to host B,
what B holds unacknowledged, the portal's own queue, the portal's questions to B and their answers, to
run administrative commands, and to keep using a credential that was rotated or revoked. Real Redis with
ACLs; each attempt is refused by Redis and lands in the audit log."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import redis
from django.conf import settings
from kombu import Connection
from rest_framework.test import APIClient

from compute import broker_access, host_rpc, hosts, services
from compute.host import rpc
from compute.host.broker import url_with_credential
from compute.host_reports import InProcessLink
from compute.models import Host, Workload
from tenants.actors import Actor
from tenants.models import AuditEntry
from tests.conftest import World, client_for
from tests.imaging.images import db_image
from tests.processes import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

FACTS = {"cpus": 2, "memory_mib": 2048, "disk_gib": 20, "cgroup_mode": "hybrid", "oci_runtimes": ["runc"]}


def join(world: World, name: str) -> tuple[Host, dict[str, str]]:
    """A host joins with a token, as `make agent` does; returns its row and the settings it was given."""
    token = client_for(world, "oscar").post("/api/v1/hosts/join-tokens/", {"host_name": name}, format="json")
    assert token.status_code == 201, token.json()
    joined = APIClient().post(
        "/api/v1/hosts/join/", {"token": token.json()["token"], "facts": FACTS}, format="json"
    )
    assert joined.status_code == 201, joined.json()
    return Host.objects.get(pk=joined.json()["host"]), joined.json()["env"]


def broker_as(env: dict[str, str]) -> redis.Redis:
    """The broker connection the host's agent makes from its settings (compute.host.broker)."""
    url = url_with_credential(env["REDIS_URL"], env["BULKHEAD_HOST_CREDENTIAL"])
    return redis.Redis.from_url(url, socket_timeout=5)


def worker_connection(env: dict[str, str], prefix: str | None = None) -> Connection:
    """The kombu connection the host's Celery worker makes (its settings: URL and key prefix)."""
    url = url_with_credential(env["REDIS_URL"], env["BULKHEAD_HOST_CREDENTIAL"])
    options: dict[str, Any] = {"visibility_timeout": 3600}
    options["global_keyprefix"] = prefix or env["BULKHEAD_BROKER_KEYPREFIX"]
    return Connection(url, transport_options=options)


def portal_broker() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def keys_holding(text: str) -> list[bytes]:
    """Every key (as the portal sees Redis) whose value mentions `text`: where a message landed."""
    client = portal_broker()
    found = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"hash":
            values = client.hvals(key)
        elif kind == b"string":
            values = [client.get(key) or b""]
        else:
            continue
        if any(text.encode() in value for value in values):
            found.append(key)
    return found


def place(world: World, host: Host, name: str) -> tuple[Workload, str]:
    """A workload of acme on `host`; its create task is sent to the host's queue (nobody consumes it)."""
    op = services.create_workload(
        actor=Actor(user=world.user("oscar")),
        tenant=world.acme,
        spec=services.WorkloadSpec(name=name, image=db_image(world.acme, f"img-{name}"), host=host),  # type: ignore[arg-type]
        compartments=[],
    )
    return Workload.objects.get(tenant=world.acme, name=name), str(op.pk)


@pytest.fixture
def joined(world: World) -> dict[str, Any]:
    a, env_a = join(world, "bht-broker-a")
    b, env_b = join(world, "bht-broker-b")
    yield {"a": a, "env_a": env_a, "b": b, "env_b": env_b}
    for host in (a, b):
        broker_access.revoke(host.pk)
        prefix = f"h.{host.pk.hex}:*"
        for key in portal_broker().scan_iter(match=prefix):
            portal_broker().delete(key)


def refused(attempt: Any) -> bool:
    try:
        attempt()
    except redis.exceptions.NoPermissionError:
        return True
    return False


def test_host_a_cannot_read_or_take_the_work_sent_to_host_b(world: World, joined: dict[str, Any]) -> None:
    b = joined["b"]
    _, op_id = place(world, b, "for-b")
    holding = wait_until(lambda: keys_holding(op_id), timeout=10, what="the task in B's queue")
    a = broker_as(joined["env_a"])
    for key in holding:
        assert refused(lambda key=key: a.llen(key)), key
        assert refused(lambda key=key: a.rpop(key)), key
        assert refused(lambda key=key: a.delete(key)), key
    # A's worker told to consume B's queue finds nothing (its keys are its own) ...
    with (
        worker_connection(joined["env_a"]) as connection,
        connection.SimpleQueue(b.queue) as queue,
        pytest.raises(queue.Empty),
    ):
        queue.get(block=True, timeout=1)
    # ... and cannot read B's keys even when it names B's prefix.
    b_prefix = joined["env_b"]["BULKHEAD_BROKER_KEYPREFIX"]

    def take_with_bs_prefix() -> None:
        with worker_connection(joined["env_a"], b_prefix) as connection:
            connection.SimpleQueue(b.queue).get(block=False)

    assert refused(take_with_bs_prefix)
    assert keys_holding(op_id) == holding  # B's work is still there for B


def test_host_a_cannot_read_what_b_holds_unacknowledged_nor_the_portals_queue(
    world: World, joined: dict[str, Any]
) -> None:
    b = joined["b"]
    _, op_id = place(world, b, "unacked-b")
    wait_until(lambda: keys_holding(op_id), timeout=10, what="the task in B's queue")
    # B's worker takes the task and holds it unacknowledged (acks_late): kombu keeps it in its
    # `unacked` hash until the ack, to hand it out again if B dies.
    with worker_connection(joined["env_b"]) as connection, connection.SimpleQueue(b.queue) as queue:
        message = queue.get(block=True, timeout=5)
        assert op_id in str(message.headers) + str(message.body)
        unacked = wait_until(lambda: keys_holding(op_id), timeout=5, what="B's unacked entry")
        a = broker_as(joined["env_a"])
        for key in unacked:
            assert refused(lambda key=key: a.hgetall(key)), key
            assert refused(lambda key=key: a.hkeys(key)), key
        message.ack()
    for attempt in (
        lambda: a.llen("default"),
        lambda: a.lrange("default", 0, -1),
        lambda: a.lpush("default", "{}"),  # work injected into the portal's own worker
        lambda: a.hgetall("unacked"),
        lambda: a.get("bulkhead:ws:anything"),
    ):
        assert refused(attempt)


def test_host_a_cannot_read_or_answer_the_portals_questions_to_host_b(
    world: World, joined: dict[str, Any]
) -> None:
    a_host, b_host = joined["a"], joined["b"]
    on_b, _ = place(world, b_host, "asked-b")
    Workload.objects.filter(pk=on_b.pk).update(state="running")
    on_b.refresh_from_db()
    b = broker_as(joined["env_b"])
    a = broker_as(joined["env_a"])
    b.set(rpc.alive_key(b_host.pk), "1", px=10_000)  # B's agent says it answers
    answers: list[Any] = []
    asking = threading.Thread(target=lambda: answers.append(host_rpc.ask(on_b, "logs", timeout=5)))
    asking.start()
    try:
        wait_until(lambda: portal_broker().llen(rpc.requests_key(b_host.pk)), timeout=5, what="the question")
        # A reads B's question, answers it in B's place, or claims to be B's agent: all refused.
        assert refused(lambda: a.lrange(rpc.requests_key(b_host.pk), 0, -1))
        assert refused(lambda: a.blpop([rpc.requests_key(b_host.pk)], timeout=0.1))
        assert refused(
            lambda: a.rpush(rpc.reply_key(b_host.pk, "0" * 32), '{"ok": true, "result": "forged"}')
        )
        assert refused(lambda: a.set(rpc.alive_key(b_host.pk), "1"))
        # A's own answerer, listening on its own list, never sees B's question.
        assert rpc.Answerer(a, a_host.pk, {}, lambda target: True).serve(0.2) == 0
        # B's agent answers on its own connection.
        answerer = rpc.Answerer(
            b,
            b_host.pk,
            {"logs": lambda t, p: "b's own logs"},
            rpc.PlacedWorkloads(InProcessLink(b_host)).holds,
        )
        assert answerer.serve(1.0) == 1
    finally:
        asking.join(timeout=10)
    assert answers == ["b's own logs"]


def test_a_host_cannot_run_administrative_commands_on_the_broker(joined: dict[str, Any]) -> None:
    portal_broker().set("bht-broker-marker", "1")
    a = broker_as(joined["env_a"])
    user = f"h.{joined['a'].pk.hex}"
    for command in (
        ("ACL", "LIST"),
        ("ACL", "SETUSER", user, "allkeys", "+@all"),
        ("CONFIG", "GET", "requirepass"),
        ("CONFIG", "SET", "appendonly", "no"),
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CLIENT", "LIST"),
        ("CLIENT", "KILL", "USER", "default"),
        ("REPLICAOF", "NO", "ONE"),
        ("MODULE", "LIST"),
        ("SHUTDOWN", "NOSAVE"),
        ("EVAL", "return redis.call('get', 'bht-broker-marker')", "0"),
    ):
        assert refused(lambda command=command: a.execute_command(*command)), command
    assert portal_broker().get("bht-broker-marker") == b"1"
    portal_broker().delete("bht-broker-marker")


def test_a_rotated_credential_is_refused_by_the_broker_at_once(world: World, joined: dict[str, Any]) -> None:
    host, env = joined["a"], joined["env_a"]
    connected = broker_as(env)
    assert connected.ping()
    answer = client_for(world, "oscar").post(f"/api/v1/hosts/{host.pk}/credential/", {}, format="json")
    assert answer.status_code in (200, 201), answer.json()
    new_secret = answer.json()["credential"]
    # The open connection is cut and cannot come back with the old password; a new one neither.
    with pytest.raises(redis.exceptions.AuthenticationError):
        connected.ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        broker_as(env).ping()
    assert broker_as({**env, "BULKHEAD_HOST_CREDENTIAL": new_secret}).ping()


def test_a_revoked_host_is_refused_by_the_broker_at_once(world: World, joined: dict[str, Any]) -> None:
    host, env = joined["a"], joined["env_a"]
    connected = broker_as(env)
    assert connected.ping()
    hosts.revoke_host_credentials(actor=Actor(user=world.user("oscar")), host=host)
    with pytest.raises(redis.exceptions.AuthenticationError):
        connected.ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        broker_as(env).ping()


def test_the_brokers_refusals_of_a_host_are_audited(joined: dict[str, Any]) -> None:
    host = joined["a"]
    broker_access.audit_broker_denials()  # what earlier tests left
    a = broker_as(joined["env_a"])
    assert refused(lambda: a.rpop(f"host.{joined['b'].pk}"))
    assert refused(lambda: a.execute_command("CONFIG", "GET", "*"))
    assert broker_access.audit_broker_denials() == 2
    entries = AuditEntry.objects.filter(action="host.broker.denied", object_id=str(host.pk), outcome="denied")
    assert {entry.details["reason"] for entry in entries} == {"key", "command"}
    assert all(entry.actor_label == f"host {host.name}" for entry in entries)


def test_it_costs_a_question_no_more_than_its_timeout_when_a_host_says_forever_it_starts(
    world: World, joined: dict[str, Any]
) -> None:
    """A's agent may say it is starting (`rpc-starting`, meant to last 60 s): a host that sets it without
    an expiry and never answers makes each question wait its own timeout, never longer, the unanswered
    questions expire, and A cannot say so for B."""
    import time

    a_host, b_host = joined["a"], joined["b"]
    on_a, _ = place(world, a_host, "silent-a")
    Workload.objects.filter(pk=on_a.pk).update(state="running")
    on_a.refresh_from_db()
    a = broker_as(joined["env_a"])
    a.set(rpc.starting_key(a_host.pk), "1")  # no expiry
    assert portal_broker().ttl(rpc.starting_key(a_host.pk)) == -1
    started = time.monotonic()
    with pytest.raises(host_rpc.HostNotAnswering):
        host_rpc.ask(on_a, "logs", timeout=1)
    assert time.monotonic() - started < 2.5
    assert 0 < portal_broker().ttl(rpc.requests_key(a_host.pk)) <= 1 + host_rpc.REPLY_TTL_SECONDS
    assert refused(lambda: a.set(rpc.starting_key(b_host.pk), "1"))
    assert refused(lambda: a.set(rpc.alive_key(b_host.pk), "1"))


def forged_answers(client: redis.Redis, host: Host, reply: bytes, stop: threading.Event) -> None:
    """A hostile agent: it takes each question from its own list and answers `reply`."""
    while not stop.is_set():
        item = rpc.pop_one(client, rpc.requests_key(host.pk), 0.1)
        if item is None:
            continue
        request_id = json.loads(item)["id"]
        client.rpush(rpc.reply_key(host.pk, request_id), reply)


FORGED = [
    ("logs", b"not json"),
    ("logs", b'["ok"]'),
    ("logs", b'{"ok": true, "result": {"lines": 1}}'),
    ("logs", b'{"ok": false, "error": {"nested": true}}'),
    ("stats", b'{"ok": true, "result": ["memory_bytes"]}'),
    ("stats", b'{"ok": true, "result": {"memory_bytes": "a lot"}}'),
    ("stats", b'{"ok": true, "result": {"memory_bytes": NaN}}'),
    ("changes", b'{"ok": true, "result": {"kind": "A"}}'),
    ("changes", b'{"ok": true, "result": [{"kind": "A", "path": 7}]}'),
]


@pytest.mark.parametrize(("query", "reply"), FORGED, ids=[f"{q}-{i}" for i, (q, _) in enumerate(FORGED)])
def test_it_refuses_and_audits_a_hosts_malformed_answer_instead_of_a_server_error(
    world: World, joined: dict[str, Any], query: str, reply: bytes
) -> None:
    a_host = joined["a"]
    on_a, _ = place(world, a_host, "lying-a")
    Workload.objects.filter(pk=on_a.pk).update(state="running", runtime_id="bh-lying")
    a = broker_as(joined["env_a"])
    a.set(rpc.alive_key(a_host.pk), "1", px=10_000)
    stop = threading.Event()
    hostile = threading.Thread(target=forged_answers, args=(a, a_host, reply, stop))
    hostile.start()
    try:
        api = client_for(world, "alice")
        answer = api.get(f"/api/v1/workloads/{on_a.pk}/{query}/")
    finally:
        stop.set()
        hostile.join(timeout=5)
    assert answer.status_code == 502, answer.content[:300]
    entries = AuditEntry.objects.filter(action="host.rpc.answer", outcome="denied")
    assert [entry.actor_label for entry in entries] == [f"host {a_host.name}"]


def test_it_refuses_a_hosts_malformed_output_for_a_console(world: World, joined: dict[str, Any]) -> None:
    from compute.consumers import OutputFollower

    a_host = joined["a"]
    on_a, _ = place(world, a_host, "lying-out")
    Workload.objects.filter(pk=on_a.pk).update(state="running", runtime_id="bh-lying-out")
    on_a.refresh_from_db()
    a = broker_as(joined["env_a"])
    a.set(rpc.alive_key(a_host.pk), "1", px=10_000)
    for reply in (
        b'{"ok": true, "result": {"data": "%%%not base64", "position": 3}}',
        b'{"ok": true, "result": {"data": "", "position": -1}}',
        b'{"ok": true, "result": "text"}',
    ):
        stop = threading.Event()
        hostile = threading.Thread(target=forged_answers, args=(a, a_host, reply, stop))
        hostile.start()
        try:
            with pytest.raises(host_rpc.HostAnswerInvalid):
                OutputFollower(on_a).read_new()
        finally:
            stop.set()
            hostile.join(timeout=5)


def test_it_never_puts_a_secret_value_in_a_hosts_queue(world: World, joined: dict[str, Any]) -> None:
    """A create's message carries the workload's spec (its host creates the container while the claim is
    answered), but never for a workload with secret values: those reach a host only in answers to its
    own requests. A plain value of the same create does travel: the look at the broker can fail."""
    from tenants import services as tenant_services

    oscar = Actor(user=world.user("oscar"))
    tenant_services.create_secret(actor=oscar, tenant=world.acme, name="db", value="hunter2-in-the-broker")
    for name, env, secret_env in (
        ("plain", {"MARKER": "plain-value-in-the-broker"}, {}),
        ("secret", {"OTHER": "secret-workloads-plain-value"}, {"DB_PASSWORD": "db"}),
    ):
        services.create_workload(
            actor=oscar,
            tenant=world.acme,
            spec=services.WorkloadSpec(
                name=name,
                image=db_image(world.acme, f"img-{name}"),  # type: ignore[arg-type]
                host=joined["a"],
                env=env,
                secret_env=secret_env,
            ),
            compartments=[],
        )
    queue_keys = keys_holding("plain-value-in-the-broker")
    assert queue_keys and all(key.startswith(b"h.") for key in queue_keys)  # in host A's own queue
    assert keys_holding("hunter2-in-the-broker") == []
    assert keys_holding("secret-workloads-plain-value") == []  # no spec at all for it
