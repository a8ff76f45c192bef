"""A committed layer's upload through the real web server (daphne), as a compromised host would send it:
whatever the headers already refuse (the credential, another host's commit, the tenant's quota, a body
length other than the layer's size) is answered before a byte of the body is sent, and a body without
a length is cut off once it grows past the declared size, while the host is still sending. Nothing is
kept and each refusal is audited.

The requests are written on raw sockets: an HTTP client sends the whole body before it reads an answer,
and the point here is the answer that comes first."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from compute import hosts
from imaging.services import get_store
from portal.models import Operation
from tenants.actors import Actor
from tenants.models import AuditEntry, Quota
from tests.conftest import World
from tests.processes import serve_registry
from tests.security.test_host_api import BASE, denied, make_host, place
from tests.security.test_host_api_commit import build_layer, start_commit

pytestmark = pytest.mark.django_db(transaction=True)

MIB = 1024 * 1024
GIB = 1024 * MIB
# An answer that waits for a body never sent does not come within this.
ANSWER_SECONDS = 15


@pytest.fixture
def portal(world: World, settings: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings.BULKHEAD_STORE_DIR = tmp_path / "store"
    a, b = make_host("bht-stream-a"), make_host("bht-stream-b")
    system = Actor.system("test")
    on_a, on_b = place(world, "on-a", a), place(world, "on-b", b)
    commits = {
        "a": a,
        "secret_a": hosts.issue_host_credential(actor=system, host=a),
        "on_a": on_a,
        "on_b": on_b,
        "op_a": start_commit(world, on_a, "from-a"),
        "op_b": start_commit(world, on_b, "from-b"),
    }
    with serve_registry(tmp_path / "store") as address:
        yield {"address": address, **commits}


def layer_path(workload: Any, op: Operation, digest: str, size: int) -> str:
    return f"{BASE}/workloads/{workload.pk}/commit/layer/?operation={op.pk}&digest={digest}&size={size}"


def send_head(address: str, path: str, secret: str, framing: str) -> socket.socket:
    """The request line and headers of a PUT, nothing of its body yet."""
    host, port = address.split(":")
    sock = socket.create_connection((host, int(port)), timeout=ANSWER_SECONDS)
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {secret}\r\n"
        f"Content-Type: application/octet-stream\r\n{framing}\r\n\r\n"
    )
    sock.sendall(head.encode())
    return sock


def answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """The answer the server sends now (a timeout here means it waits for the body)."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    sock.close()
    return response.status, json.loads(body or b"{}")


def nothing_uploaded(op: Operation, digest: str) -> bool:
    op.refresh_from_db()
    return "layer" not in op.params and not get_store().has_blob(digest)


def test_it_refuses_an_upload_beyond_the_quota_from_its_headers_before_the_body(
    world: World, portal: dict[str, Any]
) -> None:
    Quota.objects.filter(tenant=world.acme).update(image_bytes=64 * MIB)
    layer = build_layer("never sent")
    huge = 100 * GIB
    sock = send_head(
        portal["address"],
        layer_path(portal["on_a"], portal["op_a"], layer.digest, huge),
        portal["secret_a"],
        f"Content-Length: {huge}",
    )

    status, body = answer(sock)

    assert status == 409 and body["error"]["code"] == "quota_exceeded"
    assert AuditEntry.objects.filter(action="quota.exceeded", outcome="denied").exists()
    assert nothing_uploaded(portal["op_a"], layer.digest)


def test_it_refuses_a_body_longer_than_the_layers_declared_size_from_its_headers(
    portal: dict[str, Any],
) -> None:
    layer = build_layer("a small layer, a long body")
    sock = send_head(
        portal["address"],
        layer_path(portal["on_a"], portal["op_a"], layer.digest, len(layer.blob)),
        portal["secret_a"],
        f"Content-Length: {10 * GIB}",
    )

    status, body = answer(sock)

    assert status == 400 and body["error"]["fields"] == {"size": [body["error"]["message"]]}
    assert denied("host.commit.upload", portal["a"])
    assert nothing_uploaded(portal["op_a"], layer.digest)


def test_it_refuses_an_upload_for_another_hosts_commit_from_its_headers(portal: dict[str, Any]) -> None:
    layer = build_layer("for b")
    for workload, op in ((portal["on_b"], portal["op_b"]), (portal["on_a"], portal["op_b"])):
        sock = send_head(
            portal["address"],
            layer_path(workload, op, layer.digest, GIB),
            portal["secret_a"],
            f"Content-Length: {GIB}",
        )
        status, _ = answer(sock)
        assert status == 404
    assert len(denied("host.commit.upload", portal["a"])) == 2
    assert nothing_uploaded(portal["op_b"], layer.digest)


def test_it_refuses_an_unknown_credential_from_its_headers(portal: dict[str, Any]) -> None:
    layer = build_layer("from nobody")
    sock = send_head(
        portal["address"],
        layer_path(portal["on_a"], portal["op_a"], layer.digest, GIB),
        "bhh_" + "x" * 43,
        f"Content-Length: {GIB}",
    )

    status, _ = answer(sock)

    assert status == 401
    assert AuditEntry.objects.filter(action="auth.token", outcome="denied").exists()
    assert nothing_uploaded(portal["op_a"], layer.digest)


def test_it_cuts_off_a_body_without_length_that_grows_past_the_declared_size_while_it_is_sent(
    portal: dict[str, Any],
) -> None:
    size, piece = MIB, b"z" * MIB
    digest = "sha256:" + hashlib.sha256(piece).hexdigest()
    sock = send_head(
        portal["address"],
        layer_path(portal["on_a"], portal["op_a"], digest, size),
        portal["secret_a"],
        "Transfer-Encoding: chunked",
    )
    for _ in range(4):  # four times the declared size, and the body never ends
        sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")

    status, body = answer(sock)

    assert status == 400 and "digest" in body["error"]["fields"]
    assert denied("host.commit.upload", portal["a"])
    assert nothing_uploaded(portal["op_a"], digest)


def test_it_takes_a_hosts_own_layer_streamed_with_or_without_a_length(portal: dict[str, Any]) -> None:
    layer = build_layer("the real thing")
    url = f"http://{portal['address']}" + layer_path(
        portal["on_a"], portal["op_a"], layer.digest, len(layer.blob)
    )
    auth = {"Authorization": f"Bearer {portal['secret_a']}"}

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(layer.blob), 7):
            yield layer.blob[start : start + 7]

    with_length = httpx.put(url, content=layer.blob, headers=auth, timeout=30)
    without_length = httpx.put(url, content=pieces(), headers=auth, timeout=30)

    for answered in (with_length, without_length):
        assert answered.status_code == 200, answered.text
        assert answered.json() == {"digest": layer.digest, "size": len(layer.blob)}
    assert get_store().blob_path(layer.digest).read_bytes() == layer.blob
    assert not denied("host.commit.upload", portal["a"])
