"""A host whose broker access is its own ACL user: its worker consumes its queue under its own key prefix
and its agent answers the portal's questions on the same connection, with no broker password but its
credential. A container's create, logs and delete run end to end (real runc) and Redis refuses nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compute import broker_access, hosts
from compute.models import Workload
from tenants.actors import Actor
from tenants.models import AuditEntry
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.conftest import World, client_for
from tests.processes import host_agent, serve_registry, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_host_with_its_own_broker_user_runs_a_container_end_to_end(
    world: World, busybox: Any, store_dir: Path
) -> None:
    host = make_host("bht-broker-agent")
    secret = hosts.issue_host_credential(actor=Actor.system("test"), host=host)
    broker_access.audit_broker_denials()  # start from an empty ACL log
    mia = client_for(world, "mia")
    try:
        with (
            serve_registry(store_dir) as portal,
            host_agent(
                host,
                resynced=True,
                # Exactly what a join writes into agent.env: the host's own user, no password in the URL.
                REDIS_URL=broker_access.agent_broker_url(host.pk),
                BULKHEAD_HOST_CREDENTIAL=secret,
                BULKHEAD_PORTAL_URL=f"http://{portal}",
                BULKHEAD_STORE_DIR=str(store_dir),
                BULKHEAD_SAMPLE_SECONDS="1",
            ),
        ):
            response = create(
                world,
                "mia",
                name="own-broker",
                image=str(busybox.pk),
                command=["/bin/sh", "-c", "echo hello from my queue; sleep 300"],
            )
            op = finished(response.json()["id"], timeout=120)
            assert op.state == "succeeded", (op.error, op.operator_details)
            workload = workload_in("own-broker", {"running"})

            def logged() -> bool:
                answer = mia.get(f"/api/v1/workloads/{workload.pk}/logs/")
                return answer.status_code == 200 and "hello from my queue" in answer.json()["logs"]

            wait_until(logged, timeout=30, what="the logs through the host's own broker connection")
            stats = mia.get(f"/api/v1/workloads/{workload.pk}/stats/")
            assert stats.status_code == 200 and stats.json()["memory_bytes"] > 0

            deleted = finished(mia.delete(f"/api/v1/workloads/{workload.pk}/").json()["id"], timeout=60)
            assert deleted.state == "succeeded", (deleted.error, deleted.operator_details)
            assert not Workload.objects.filter(pk=workload.pk).exists()
        # Everything the worker and the agent needed was within the host's grant.
        broker_access.audit_broker_denials()
        refused = AuditEntry.objects.filter(action="host.broker.denied", object_id=str(host.pk))
        assert [entry.details for entry in refused] == []
    finally:
        broker_access.revoke(host.pk)
        cleanup_host(host)


TAKER = """
import sys, time
from kombu import Connection
url, prefix, queue = sys.argv[1:4]
with Connection(url, transport_options={"global_keyprefix": prefix, "visibility_timeout": 1}) as connection:
    message = connection.SimpleQueue(queue).get(block=True, timeout=20)
    print("taken", message.payload, flush=True)
    time.sleep(600)  # killed here, the message unacknowledged
"""


def test_a_message_whose_host_worker_died_is_handed_out_again_within_the_hosts_own_keys(world: World) -> None:
    """acks_late under the ACL user: kombu's unacked hash, its index and mutex (a Lua-released lock) all
    live under the host's prefix, so the restore after a worker's death works with the host's grant."""
    import signal
    import subprocess
    import sys

    from kombu import Connection, Exchange, Queue

    from compute.host.broker import key_prefix, url_with_credential

    host = make_host("bht-broker-redeliver")
    secret = hosts.issue_host_credential(actor=Actor.system("test"), host=host)
    url = url_with_credential(broker_access.agent_broker_url(host.pk), secret)
    queue = host.queue
    broker_access.audit_broker_denials()
    try:
        with broker_access.producer_for_queue(queue) as producer:
            producer.publish(
                {"op": "redeliver me"},
                exchange=queue,
                routing_key=queue,
                declare=[Queue(queue, Exchange(queue), routing_key=queue)],
                serializer="json",
            )
        taker = subprocess.Popen(
            [sys.executable, "-c", TAKER, url, key_prefix(host.pk), queue], stdout=subprocess.PIPE, text=True
        )
        try:
            assert taker.stdout is not None and taker.stdout.readline().startswith("taken")
        finally:
            taker.send_signal(signal.SIGKILL)
            taker.wait()
        options = {"global_keyprefix": key_prefix(host.pk), "visibility_timeout": 1}
        with Connection(url, transport_options=options) as connection:
            waiting = connection.SimpleQueue(queue)

            def handed_out() -> Any:
                # Each empty poll lets kombu look for unacknowledged messages past their visibility.
                try:
                    return waiting.get(block=True, timeout=0.5)
                except waiting.Empty:
                    return None

            message = wait_until(handed_out, timeout=40, interval=0, what="the message handed out again")
            assert message.payload == {"op": "redeliver me"}
            message.ack()
        broker_access.audit_broker_denials()
        assert not AuditEntry.objects.filter(action="host.broker.denied", object_id=str(host.pk)).exists()
    finally:
        broker_access.revoke(host.pk)
