"""A workload's state and the outcome of the operation that made it never disagree (issue 16).

Seen under `make run`: a pool process died a moment after `runc create`; its task, redelivered to the
next pool process, found the workload `creating`, took that for "someone else is on it" and said
`succeeded`, and the workload stayed `creating` with half a container. And the agent loop, starting
while the host's worker had just claimed an operation but not yet locked its workload, failed that live
operation as interrupted (session 12's claim-before-lock race).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from compute import host_rpc
from compute.models import Workload
from portal.models import Operation
from tests.compute.conftest import cleanup_host, create, finished, make_host
from tests.conftest import World
from tests.processes import celery_worker, host_agent, process, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

CLAIM_PAUSE_S = 15


def test_a_creation_whose_pool_process_died_after_runc_create_is_finished_by_the_next_one(
    world: World, busybox: Any, store_dir: Path, tmp_path: Path
) -> None:
    from tests.compute.runtimes import oci_runtime

    h = make_host("bht-poolkill")
    killed_once = tmp_path / "pool-process-killed"
    point = {"BULKHEAD_FAILPOINT": "create.created", "BULKHEAD_FAILPOINT_ONCE": str(killed_once)}
    try:
        with host_agent(h, point, resynced=True, pool="prefork", BULKHEAD_STORE_DIR=str(store_dir)):
            response = create(
                world, "mia", name="reborn", image=str(busybox.pk), command=["/bin/sleep", "300"]
            )
            assert response.status_code == 202, response.json()
            op = finished(response.json()["id"], timeout=120)
            assert killed_once.exists(), "no pool process died at the failpoint"
            workload = Workload.objects.get(pk=op.target_id)
            assert (op.state, workload.state) == ("succeeded", "running"), (op.error, workload.status_message)
            assert oci_runtime(h).state(workload.runtime_id).status == "running"
    finally:
        cleanup_host(h)


def test_an_agent_starting_while_a_worker_has_just_claimed_a_creation_leaves_it_to_the_worker(
    world: World, busybox: Any, store_dir: Path
) -> None:
    h = make_host("bht-claimrace")
    host_rpc.forget_answering(h.pk)
    # The worker stops right after its claim, long enough for an agent loop to start and re-sync.
    paused = {
        "BULKHEAD_PAUSEPOINT": f"operation.claimed:{CLAIM_PAUSE_S}",
        "BULKHEAD_STORE_DIR": str(store_dir),
    }
    try:
        with celery_worker(queues=h.queue, name=h.name, **paused):
            response = create(
                world, "mia", name="claimed", image=str(busybox.pk), command=["/bin/sleep", "300"]
            )
            assert response.status_code == 202, response.json()
            op_id = response.json()["id"]
            wait_until(
                lambda: Operation.objects.filter(pk=op_id, state="running").exists(),
                timeout=60,
                what="the worker to claim the creation",
            )
            loop = ["manage.py", "agent", "--host", str(h.pk)]
            with process(loop, f"test-agent-{h.name}.log", BULKHEAD_STORE_DIR=str(store_dir)):
                wait_until(
                    lambda: host_rpc.is_answering(h.pk),
                    timeout=60,
                    what="the agent loop's re-sync at start",
                )
                # The re-sync ran while the worker was paused after its claim (else this proves nothing).
                claimed_at = Operation.objects.get(pk=op_id).started_at
                assert timezone.now() < claimed_at + timedelta(seconds=CLAIM_PAUSE_S)
                op = finished(op_id, timeout=120)
                workload = Workload.objects.get(pk=op.target_id)
                assert (op.state, workload.state) == ("succeeded", "running"), (
                    op.error,
                    workload.status_message,
                )
    finally:
        cleanup_host(h)
