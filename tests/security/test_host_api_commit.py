"""Commit through the host API as a compromised host would try it: host A holds its own credential and
uploads and reports layers for a workload's commit. A host may only upload the layer of a running
commit of a workload placed on it, bytes that match the digest it names, within the tenant's image
quota; the portal records the image only from a layer uploaded for that very commit whose DiffID it
proved itself. Every refusal changes nothing and is audited."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from compute import hosts, services
from compute.models import Workload
from imaging.models import Image
from portal import operations
from portal.models import Operation
from tenants.actors import Actor
from tenants.models import Quota
from tests.conftest import World
from tests.security.test_host_api import BASE, as_host, denied, make_host, place

pytestmark = pytest.mark.django_db

GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class BuiltLayer:
    blob: bytes
    digest: str
    diff_id: str

    def report(self, **override: Any) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "diff_id": self.diff_id,
            "size": len(self.blob),
            "media_type": GZIP_LAYER,
            **override,
        }


def build_layer(text: str) -> BuiltLayer:
    """A real one-file gzip layer, as a host's `diff_upper` would make it."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        data = text.encode()
        info = tarfile.TarInfo("greeting.txt")
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
    raw = tar_bytes.getvalue()
    blob = gzip.compress(raw, mtime=0)
    return BuiltLayer(
        blob=blob,
        digest="sha256:" + hashlib.sha256(blob).hexdigest(),
        diff_id="sha256:" + hashlib.sha256(raw).hexdigest(),
    )


def start_commit(world: World, workload: Workload, tag: str) -> Operation:
    """mia asks for a commit; the host's worker has claimed it (running)."""
    op = services.commit_workload(
        actor=Actor(user=world.user("mia")), workload=workload, name="snap", tag=tag
    )
    assert operations.claim(op.pk) is not None
    return Operation.objects.get(pk=op.pk)


def upload(client: APIClient, workload: Workload, op: Operation, layer: BuiltLayer, **params: Any) -> Any:
    query = {"operation": str(op.pk), "digest": layer.digest, "size": len(layer.blob), **params}
    url = f"{BASE}/workloads/{workload.pk}/commit/layer/?" + "&".join(f"{k}={v}" for k, v in query.items())
    return client.put(url, data=layer.blob, content_type="application/octet-stream")


def report(client: APIClient, workload: Workload, op: Operation, layer: dict[str, Any]) -> Any:
    body = {"operation": str(op.pk), "layer": layer}
    return client.post(f"{BASE}/workloads/{workload.pk}/commit/", body, format="json")


@pytest.fixture
def portal_store(settings: Any, tmp_path: Path) -> Path:
    settings.BULKHEAD_STORE_DIR = tmp_path / "store"
    return Path(settings.BULKHEAD_STORE_DIR)


@pytest.fixture
def commits(world: World, portal_store: Path) -> dict[str, Any]:
    a, b = make_host("bht-commit-a"), make_host("bht-commit-b")
    system = Actor.system("test")
    on_a, on_b = place(world, "on-a", a), place(world, "on-b", b)
    return {
        "a": a,
        "b": b,
        "client_a": as_host(hosts.issue_host_credential(actor=system, host=a)),
        "on_a": on_a,
        "on_b": on_b,
        "op_a": start_commit(world, on_a, "from-a"),
        "op_b": start_commit(world, on_b, "from-b"),
    }


def no_committed_image() -> bool:
    return not Image.objects.filter(source="commit").exists()


def test_it_records_the_image_a_host_uploads_and_reports_for_its_own_workloads_commit(
    world: World, commits: dict[str, Any]
) -> None:
    client, on_a, op_a = commits["client_a"], commits["on_a"], commits["op_a"]
    layer = build_layer("committed")
    assert upload(client, on_a, op_a, layer).status_code == 200
    answer = report(client, on_a, op_a, layer.report())
    assert answer.status_code == 200, answer.json()
    image = Image.objects.get(tenant=world.acme, name="snap", tag="from-a")
    assert answer.json() == {"image": str(image.pk)}
    assert [il.layer.digest for il in image.image_layers.order_by("position")] == [
        *(il.layer.digest for il in on_a.image.image_layers.order_by("position")),
        layer.digest,
    ]
    assert image.image_layers.order_by("position").last().layer.diff_id == layer.diff_id  # type: ignore[union-attr]
    op_a.refresh_from_db()
    assert op_a.state == "succeeded" and op_a.result == {"image": str(image.pk)}
    assert not denied("host.commit.report", commits["a"])


def test_it_refuses_a_host_uploading_or_reporting_the_commit_of_another_hosts_workload(
    commits: dict[str, Any],
) -> None:
    client, a, on_a, on_b, op_b = (commits[k] for k in ("client_a", "a", "on_a", "on_b", "op_b"))
    layer = build_layer("not yours")
    assert upload(client, on_b, op_b, layer).status_code == 404
    assert report(client, on_b, op_b, layer.report()).status_code == 404
    # Its own workload with B's operation: still not a commit on A.
    assert upload(client, on_a, op_b, layer).status_code == 404
    assert report(client, on_a, op_b, layer.report()).status_code == 404
    assert len(denied("host.commit.upload", a)) == 2
    assert len(denied("host.commit.report", a)) == 2
    op_b.refresh_from_db()
    assert op_b.state == "running" and "layer" not in op_b.params
    assert no_committed_image()


def test_it_refuses_a_reported_layer_that_the_commit_never_uploaded(
    world: World, commits: dict[str, Any], portal_store: Path
) -> None:
    """The portal's store already holds the blob (another tenant's image, say): naming its digest gives
    the committing tenant nothing."""
    from imaging.services import get_store

    client, on_a, op_a = commits["client_a"], commits["on_a"], commits["op_a"]
    elsewhere = build_layer("another tenant's layer")
    get_store().ingest_bytes(elsewhere.blob, digest=elsewhere.digest)
    answer = report(client, on_a, op_a, elsewhere.report())
    assert answer.status_code == 400
    assert denied("host.commit.report", commits["a"])
    op_a.refresh_from_db()
    assert op_a.state == "running"
    assert no_committed_image()


def test_it_refuses_an_upload_whose_bytes_do_not_match_its_digest_or_size(
    commits: dict[str, Any], portal_store: Path
) -> None:
    from imaging.services import get_store

    client, on_a, op_a = commits["client_a"], commits["on_a"], commits["op_a"]
    claimed, sent = build_layer("what it says"), build_layer("what it sends")
    lying = BuiltLayer(blob=sent.blob, digest=claimed.digest, diff_id=claimed.diff_id)
    assert upload(client, on_a, op_a, lying).status_code == 400
    assert not get_store().has_blob(claimed.digest)
    longer = upload(client, on_a, op_a, sent, size=len(sent.blob) - 1)
    assert longer.status_code == 400
    assert not get_store().has_blob(sent.digest)
    assert len(denied("host.commit.upload", commits["a"])) == 2
    op_a.refresh_from_db()
    assert "layer" not in op_a.params
    # Nothing was uploaded for it, so nothing can be reported either.
    assert report(client, on_a, op_a, claimed.report()).status_code == 400
    assert no_committed_image()


def test_it_refuses_a_diff_id_that_the_uploaded_layer_does_not_have(commits: dict[str, Any]) -> None:
    """A DiffID names an unpacked layer on every host: a false one could hand a tenant another's files."""
    client, on_a, op_a = commits["client_a"], commits["on_a"], commits["op_a"]
    layer, other = build_layer("mine"), build_layer("someone else's files")
    assert upload(client, on_a, op_a, layer).status_code == 200
    answer = report(client, on_a, op_a, layer.report(diff_id=other.diff_id))
    assert answer.status_code == 400
    assert denied("host.commit.report", commits["a"])
    op_a.refresh_from_db()
    assert op_a.state == "running"
    assert no_committed_image()


def test_it_refuses_a_layer_beyond_the_tenants_image_quota(world: World, commits: dict[str, Any]) -> None:
    from imaging.services import get_store

    client, on_a, op_a = commits["client_a"], commits["on_a"], commits["op_a"]
    layer = build_layer("x" * 4096)
    limits = Quota.objects.get(tenant=world.acme)
    Quota.objects.filter(pk=limits.pk).update(image_bytes=limits.used_image_bytes + len(layer.blob) - 1)
    answer = upload(client, on_a, op_a, layer)
    assert answer.status_code == 409, answer.json()
    assert not get_store().has_blob(layer.digest)
    # Room for the upload, but not for the image it makes: refused when the image would be recorded.
    Quota.objects.filter(pk=limits.pk).update(image_bytes=limits.used_image_bytes + len(layer.blob))
    assert upload(client, on_a, op_a, layer).status_code == 200
    Quota.objects.filter(pk=limits.pk).update(image_bytes=limits.used_image_bytes + len(layer.blob) - 1)
    assert report(client, on_a, op_a, layer.report()).status_code == 409
    assert Quota.objects.get(pk=limits.pk).used_image_bytes == limits.used_image_bytes
    assert no_committed_image()


def test_it_answers_a_repeated_report_with_the_same_image_and_writes_nothing_twice(
    commits: dict[str, Any], world: World
) -> None:
    client, on_a, op_a = commits["client_a"], commits["on_a"], commits["op_a"]
    layer = build_layer("once")
    assert upload(client, on_a, op_a, layer).status_code == 200
    first = report(client, on_a, op_a, layer.report()).json()
    used = Quota.objects.get(tenant=world.acme).used_image_bytes
    second = report(client, on_a, op_a, layer.report())
    assert second.status_code == 200 and second.json() == first
    assert Image.objects.filter(source="commit").count() == 1
    assert Quota.objects.get(tenant=world.acme).used_image_bytes == used
    # A finished commit takes no more uploads.
    assert upload(client, on_a, op_a, build_layer("later")).status_code == 404


def test_it_refuses_the_commit_routes_to_a_revoked_hosts_credential(
    commits: dict[str, Any], world: World
) -> None:
    client, a, on_a, op_a = commits["client_a"], commits["a"], commits["on_a"], commits["op_a"]
    hosts.revoke_host_credentials(actor=Actor(user=world.user("oscar")), host=a)
    layer = build_layer("after revocation")
    assert upload(client, on_a, op_a, layer).status_code == 401
    assert report(client, on_a, op_a, layer.report()).status_code == 401
    op_a.refresh_from_db()
    assert op_a.state == "running" and "layer" not in op_a.params
    assert no_committed_image()


def test_it_refuses_a_commit_report_that_is_not_a_layer(commits: dict[str, Any]) -> None:
    client, on_a, op_a = commits["client_a"], commits["on_a"], commits["op_a"]
    layer = build_layer("shape")
    assert upload(client, on_a, op_a, layer).status_code == 200
    for bad in (
        None,
        "sha256:x",
        layer.report(digest="sha256:../../etc/passwd"),
        layer.report(size=-1),
        layer.report(size=True),
        layer.report(media_type="application/x-shellscript"),
    ):
        assert report(client, on_a, op_a, bad).status_code == 400, bad  # type: ignore[arg-type]
    assert no_committed_image()


def test_it_keeps_one_layer_per_commit_so_a_host_cannot_fill_the_store_by_uploading_again(
    commits: dict[str, Any], world: World
) -> None:
    """Each upload was checked against the quota alone and replaced the commit's lease: a host that kept
    a commit running could store layer after layer, none charged and none collected until an operator's
    GC. A commit takes one layer; the same one again (a retry whose answer was lost) is still fine."""
    from imaging.services import get_store

    client, a, on_a, op_a = commits["client_a"], commits["a"], commits["on_a"], commits["op_a"]
    first = build_layer("the commit's layer")
    assert upload(client, on_a, op_a, first).status_code == 200
    assert upload(client, on_a, op_a, first).status_code == 200  # a retry of the same bytes
    for text in ("filler one", "filler two"):
        other = build_layer(text)
        answer = upload(client, on_a, op_a, other)
        assert answer.status_code == 409, answer.json()
        assert not get_store().has_blob(other.digest)
    assert len(denied("host.commit.upload", a)) == 2
    op_a.refresh_from_db()
    assert op_a.params["layer"] == {"digest": first.digest, "size": len(first.blob)}
    assert report(client, on_a, op_a, first.report()).status_code == 200
    assert Image.objects.filter(tenant=world.acme, source="commit").count() == 1


@pytest.mark.django_db(transaction=True)
def test_it_keeps_one_layer_when_a_host_uploads_two_for_one_commit_at_once(commits: dict[str, Any]) -> None:
    """A check of the operation's noted layer alone would let uploads started together all pass it: the
    layer is noted before the first byte is read, so the second upload is refused while the first runs."""
    import threading

    from django.db import connection

    from compute import host_reports
    from imaging.services import get_store
    from portal.errors import Conflict

    a, on_a, op_a = commits["a"], commits["on_a"], commits["op_a"]
    first, second = build_layer("the first upload"), build_layer("the second upload")
    halfway, go_on = threading.Event(), threading.Event()
    answers: dict[str, Any] = {}

    def slow_body() -> Any:
        yield first.blob[:10]
        halfway.set()
        go_on.wait(10)
        yield first.blob[10:]

    def upload_first() -> None:
        try:
            answers["first"] = host_reports.receive_commit_layer(
                actor=host_reports.host_actor(a),
                host=a,
                workload_id=on_a.pk,
                op_id=op_a.pk,
                digest=first.digest,
                size=len(first.blob),
                chunks=slow_body(),
            )
        finally:
            connection.close()

    uploading = threading.Thread(target=upload_first)
    uploading.start()
    try:
        assert halfway.wait(10)
        with pytest.raises(Conflict):
            host_reports.receive_commit_layer(
                actor=host_reports.host_actor(a),
                host=a,
                workload_id=on_a.pk,
                op_id=op_a.pk,
                digest=second.digest,
                size=len(second.blob),
                chunks=iter([second.blob]),
            )
    finally:
        go_on.set()
        uploading.join(10)
    assert answers["first"] == {"digest": first.digest, "size": len(first.blob)}
    assert not get_store().has_blob(second.digest)
    op_a.refresh_from_db()
    assert op_a.params["layer"] == {"digest": first.digest, "size": len(first.blob)}
    assert denied("host.commit.upload", a)


def test_it_refuses_a_host_finishing_a_running_commit_with_an_image_it_never_reported(
    world: World, commits: dict[str, Any]
) -> None:
    """The image of a commit is the one `report_commit` recorded: a host that finished the operation with
    an image id of its choosing (another tenant's, say) made the tenant's commit say so, with no image."""
    from tests.imaging.images import db_image

    client, a, on_a, op_a = commits["client_a"], commits["a"], commits["on_a"], commits["op_a"]
    theirs = db_image(world.globex, "globex-secret")
    finish = {"event": "finish", "result": {"image": str(theirs.pk)}}
    answer = client.post(f"{BASE}/operations/{op_a.pk}/", finish, format="json")
    assert answer.status_code == 409, answer.json()
    assert denied("host.operation.report", a)
    op_a.refresh_from_db()
    assert op_a.state == "running" and op_a.result in (None, {})
    # The commit goes on as it should; the task's own finish after the report changes nothing.
    layer = build_layer("the real one")
    assert upload(client, on_a, op_a, layer).status_code == 200
    image = report(client, on_a, op_a, layer.report()).json()["image"]
    again = client.post(
        f"{BASE}/operations/{op_a.pk}/", {"event": "finish", "result": {"image": image}}, format="json"
    )
    assert again.status_code == 200
    op_a.refresh_from_db()
    assert op_a.state == "succeeded" and op_a.result == {"image": image}
