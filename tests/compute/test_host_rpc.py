"""The portal asks a host's agent about its workloads over Redis (compute.host_rpc, answered by
compute.host.rpc), real Redis."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from compute import host_rpc
from compute.host import rpc
from compute.models import Host, Workload
from portal.errors import Conflict
from tests.compute.host_rpc_helpers import answerer_for, answering
from tests.conftest import World, client_for
from tests.imaging.images import db_image

pytestmark = pytest.mark.django_db(transaction=True)


def a_workload(world: World, host_name: str = "rpc-host") -> Workload:
    host, _ = Host.objects.get_or_create(name=host_name)
    return Workload.objects.create(
        tenant=world.acme,
        name=f"w-{host_name}",
        image=db_image(world.acme, f"img-{host_name}"),
        host=host,
        state="running",
    )


def test_it_answers_a_question_through_the_hosts_agent(world: World) -> None:
    workload = a_workload(world)

    def echo(target: rpc.Target, params: dict[str, Any]) -> dict[str, Any]:
        return {"runtime_id": target.runtime_id, "isolation": target.isolation, **params}

    with answering(workload.host, {"echo": echo}):  # type: ignore[arg-type]
        answer = host_rpc.ask(workload, "echo", size=3)
    assert answer == {"runtime_id": workload.runtime_id, "isolation": "namespace", "size": 3}


def test_it_says_at_once_when_the_host_does_not_answer(world: World) -> None:
    workload = a_workload(world, "silent-host")
    started = time.monotonic()
    with pytest.raises(host_rpc.HostNotAnswering, match="not answering"):
        host_rpc.ask(workload, "logs")
    assert time.monotonic() - started < 1


def test_a_question_asked_while_the_agent_starts_waits_for_its_first_answer(world: World) -> None:
    """An agent in its re-sync at start (before its loop answers) is not a missing one: a workload the
    worker created meanwhile has its logs read once the loop runs, not a 503 (seen in CI: the create
    finished before the new agent's first answer)."""
    from django.db import connection

    workload = a_workload(world, "starting-host")

    def echo(target: rpc.Target, params: dict[str, Any]) -> dict[str, Any]:
        return {"runtime_id": target.runtime_id}

    answerer = answerer_for(workload.host, {"echo": echo})  # type: ignore[arg-type]
    answerer.say_starting()

    def loop_starts_later() -> None:
        try:
            time.sleep(0.5)  # the re-sync
            answerer.serve(2)
        finally:
            connection.close()

    thread = threading.Thread(target=loop_starts_later, daemon=True)
    thread.start()
    try:
        assert host_rpc.ask(workload, "echo") == {"runtime_id": workload.runtime_id}
    finally:
        thread.join(timeout=5)
    assert not host_rpc._redis().exists(rpc.starting_key(workload.host_id))  # answering now, not starting


def test_it_passes_a_refusal_back_and_refuses_unknown_questions(world: World) -> None:
    workload = a_workload(world)

    def refuse(target: rpc.Target, params: dict[str, Any]) -> Any:
        raise Conflict("not today")

    with answering(workload.host, {"refuse": refuse}):  # type: ignore[arg-type]
        with pytest.raises(Conflict, match="not today"):
            host_rpc.ask(workload, "refuse")
        with pytest.raises(Conflict, match="Unknown host query"):
            host_rpc.ask(workload, "rm -rf /")


def forged(target: dict[str, Any], request_id: str, query: str = "stats") -> str:
    return json.dumps({"id": request_id, "query": query, "target": target, "params": {}, "deadline": 1e12})


def test_an_agent_answers_only_for_workloads_on_its_own_host(world: World) -> None:
    mine = a_workload(world, "host-a")
    theirs = a_workload(world, "host-b")
    client = host_rpc._redis()
    # A request for host-b's workload pushed onto host-a's list (as a confused or hostile sender would),
    # naming it exactly as the portal would: host-a reads no row, but it knows what is placed on it.
    client.rpush(rpc.requests_key(mine.host_id), forged(host_rpc.target_of(theirs, "stats").wire(), "0" * 32))
    answerer_for(mine.host).serve(0.2)  # type: ignore[arg-type]
    reply = json.loads(client.blpop([rpc.reply_key(mine.host_id, "0" * 32)], timeout=1)[1])  # type: ignore[index]
    assert reply == {"ok": False, "error": "No such workload on this host."}


def test_it_refuses_a_runtime_id_that_would_leave_its_directory(world: World) -> None:
    workload = a_workload(world)
    client = host_rpc._redis()
    target = {**host_rpc.target_of(workload, "logs").wire(), "runtime_id": "../../etc"}
    client.rpush(rpc.requests_key(workload.host_id), forged(target, "2" * 32, "logs"))
    answerer_for(workload.host).serve(0.2)  # type: ignore[arg-type]
    reply = json.loads(client.blpop([rpc.reply_key(workload.host_id, "2" * 32)], timeout=1)[1])  # type: ignore[index]
    assert reply == {"ok": False, "error": "The request names no workload."}


def test_it_drops_questions_whose_asker_gave_up(world: World) -> None:
    workload = a_workload(world)
    client = host_rpc._redis()
    request = {
        "id": "1" * 32,
        "query": "stats",
        "target": host_rpc.target_of(workload, "stats").wire(),
        "deadline": 1,
    }
    client.rpush(rpc.requests_key(workload.host_id), json.dumps(request), b"not json")
    assert answerer_for(workload.host).serve(0.2) == 0  # type: ignore[arg-type]
    assert client.llen(rpc.reply_key(workload.host_id, "1" * 32)) == 0


def test_the_api_reads_logs_through_the_agent_and_answers_503_without_one(world: World) -> None:
    from tests.compute.runtimes import oci_runtime

    workload = a_workload(world)
    path = oci_runtime(workload.host).log_path(workload.runtime_id)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"2026-01-01T00:00:00Z stdout F hello from the host\n")
    mia = client_for(world, "mia")
    try:
        response = mia.get(f"/api/v1/workloads/{workload.pk}/logs/")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "host_not_answering"
        with answering(workload.host):  # type: ignore[arg-type]
            response = mia.get(f"/api/v1/workloads/{workload.pk}/logs/")
        assert response.status_code == 200
        assert response.json()["logs"] == "hello from the host\n"
    finally:
        path.unlink()
        path.parent.rmdir()
