"""A host's worker locks an operation's target before claiming it, from what the portal's message says
(`OPERATION_HEADER`); the claim's answer is what counts: a message that names another target or other
parameters than the claimed operation's (only a forged one can) runs nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from compute.host.broker import OPERATION_HEADER, SPEC_HEADER
from compute.host.tasks import ClaimedOperation, create_workload

OP = "0d6e2a36-55f1-4a57-9d0c-8c1f6f4a0a11"
MINE = "5b0f1c52-9d6a-4f0b-8f43-3f7d7b1f2c01"
OTHER = "9a1e2f3c-1111-4c2b-9a57-2d7c3b4e5f60"


@pytest.fixture
def task() -> Iterator[Any]:
    yield create_workload
    create_workload.peeked = {}


def claimed(target: str, **params: Any) -> ClaimedOperation:
    params = params or {"start": True}
    return ClaimedOperation(
        id=OP, kind="workload.create", target_type="workload", target_id=target, params=params
    )


def sent(task: Any, header: Any) -> dict[str, Any] | None:
    task.push_request(**{OPERATION_HEADER: header})
    try:
        return task.sent_peek(OP)  # type: ignore[no-any-return]
    finally:
        task.pop_request()


def test_it_takes_what_the_message_says_about_its_own_operation_only(task: Any) -> None:
    header = {"id": OP, "target_type": "workload", "target_id": MINE, "params": {"start": True}}
    assert sent(task, header) == header
    assert sent(task, {**header, "id": OTHER}) is None  # about another operation: asked instead
    assert sent(task, "workload:" + MINE) is None


def test_it_runs_nothing_when_the_claim_names_another_workload_than_the_message(task: Any) -> None:
    task.peeked = {"id": OP, "target_type": "workload", "target_id": MINE, "params": {"start": True}}
    task.check_claim(claimed(MINE))  # they agree: it runs
    with pytest.raises(RuntimeError):
        task.check_claim(claimed(OTHER))


def test_it_runs_nothing_when_the_claim_has_other_parameters_than_the_message(task: Any) -> None:
    task.peeked = {"id": OP, "target_type": "workload", "target_id": MINE, "params": {"start": True}}
    with pytest.raises(RuntimeError):
        task.check_claim(claimed(MINE, start=False))


def test_it_takes_a_redelivered_commit_message_as_its_operations_once_its_layer_was_uploaded() -> None:
    """The portal notes the uploaded layer on the running commit (`params["layer"]`): a message sent
    before, delivered again after its worker was lost, is not a forged one."""
    from compute.host.tasks import commit_workload

    params = {"name": "snap", "tag": "1"}
    commit_workload.peeked = {"id": OP, "target_type": "workload", "target_id": MINE, "params": params}
    try:
        uploaded = {**params, "layer": {"digest": "sha256:" + "a" * 64, "size": 10}}
        commit_workload.check_claim(
            ClaimedOperation(
                id=OP, kind="workload.commit", target_type="workload", target_id=MINE, params=uploaded
            )
        )
        with pytest.raises(RuntimeError):  # any other parameter still has to agree
            commit_workload.check_claim(
                ClaimedOperation(
                    id=OP,
                    kind="workload.commit",
                    target_type="workload",
                    target_id=MINE,
                    params={**uploaded, "tag": "2"},
                )
            )
    finally:
        commit_workload.peeked = {}


def spec_of(workload_id: str) -> dict[str, Any]:
    """A workload's spec as the portal puts it in a create's message (`host_reports.new_workload_spec`)."""
    return {
        "id": workload_id,
        "runtime_id": "bh-" + workload_id.replace("-", ""),
        "name": "web",
        "tenant": OTHER,
        "isolation": "namespace",
        "state": "pending",
        "desired_running": True,
        "restart_policy": "no",
        "exit_code": None,
        "started": False,
        "image": {"id": OTHER, "repository": "acme/web", "layers": []},
        "process": {"args": ["/bin/true"], "env": ["PATH=/bin"], "cwd": "/", "user": "0:0"},
        "limits": {"vcpus": "1", "memory_mib": 64, "disk_gib": 1},
        "privileged": False,
        "network": None,
        "volumes": [],
    }


def sent_spec(task: Any, spec: Any, **params: Any) -> Any:
    params = params or {"start": True}
    task.peeked = {"id": OP, "target_type": "workload", "target_id": MINE, "params": params}
    task.push_request(**{SPEC_HEADER: spec})
    try:
        return task.sent_spec()
    finally:
        task.pop_request()


def test_it_creates_ahead_only_from_a_wellformed_spec_of_the_messages_own_workload(task: Any) -> None:
    assert str(sent_spec(task, spec_of(MINE)).id) == MINE
    assert sent_spec(task, spec_of(OTHER)) is None  # another workload than the one it locks: claim first
    assert sent_spec(task, {**spec_of(MINE), "isolation": "chroot"}) is None  # not understood: claim first
    assert sent_spec(task, "namespace:" + MINE) is None
    assert sent_spec(task, spec_of(MINE), start=False) is None  # a create that does not start
