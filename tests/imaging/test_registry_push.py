"""Pushing to the built-in registry at /v2/ with real clients (skopeo, raw HTTP) through daphne."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.utils import timezone

from imaging.models import Image, RegistryBlob, RegistryTag, RegistryUpload
from imaging.services import get_store, start_gc
from portal.models import Operation
from tenants.actors import Actor
from tenants.models import AuditEntry, Quota
from tests.conftest import World, client_for
from tests.imaging import hostile
from tests.imaging.images import (
    BuiltImage,
    BuiltLayer,
    build_image,
    busybox_layers,
    digest_of,
    run_inline,
    write_docker_archive,
    write_layout,
    write_oci_archive,
)
from tests.imaging.test_registry_server import skopeo, token_of

pytestmark = pytest.mark.django_db(transaction=True)

PODMAN = shutil.which("podman") or "/usr/bin/podman"


def skopeo_push(layout: Path, registry: str, target: str, creds: str) -> subprocess.CompletedProcess[str]:
    return skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        creds,
        f"oci:{layout}:latest",
        f"docker://{registry}/{target}",
    )


def pushed_image(world: World, tenant: Any, name: str, tag: str) -> Image:
    """Run the push's queued operation here (no worker in these tests) and return the Image it made."""
    op = Operation.objects.filter(
        kind="image.push", tenant=tenant, params__name=name, params__tag=tag
    ).latest("created_at")
    done = run_inline(str(op.pk))
    assert done.state == "succeeded", done.error  # type: ignore[attr-defined]
    return Image.objects.get(tenant=tenant, name=name, tag=tag)


def upload_blob(registry: str, auth: tuple[str, str], name: str, data: bytes) -> httpx.Response:
    return httpx.post(
        f"http://{registry}/v2/{name}/blobs/uploads/",
        params={"digest": digest_of(data)},
        content=data,
        auth=auth,
        headers={"Content-Type": "application/octet-stream"},
    )


def push_by_http(
    registry: str, auth: tuple[str, str], name: str, tag: str, image: BuiltImage
) -> httpx.Response:
    for layer in image.layers:
        assert upload_blob(registry, auth, name, layer.blob).status_code == 201
    assert upload_blob(registry, auth, name, image.config).status_code == 201
    return httpx.put(
        f"http://{registry}/v2/{name}/manifests/{tag}",
        content=image.manifest,
        auth=auth,
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )


def error_code(response: httpx.Response) -> str:
    return str(response.json()["errors"][0]["code"])


def test_it_lets_skopeo_push_an_image_that_becomes_an_image_of_the_tenant_and_pulls_back_identical(
    world: World, registry_server: str, tmp_path: Path
) -> None:
    registry = registry_server
    built = build_image(busybox_layers("pushed"))
    layout = write_layout(built, tmp_path / "layout")
    secret = token_of(world, "mia")

    pushed = skopeo_push(layout, registry, "acme/tools/app:1", f"mia:{secret}")

    assert pushed.returncode == 0, pushed.stderr
    head = httpx.head(f"http://{registry}/v2/acme/tools/app/manifests/1", auth=("mia", secret))
    assert head.status_code == 200 and head.headers["docker-content-digest"] == built.manifest_digest
    image = pushed_image(world, world.acme, "tools/app", "1")
    assert image.manifest_digest == built.manifest_digest and image.source == "push"
    assert [layer.diff_id for layer in image.layers.order_by("image_layers__position")] == [
        layer.diff_id for layer in built.layers
    ]
    assert all(get_store().has_layer(layer.diff_id) for layer in built.layers)
    assert Quota.objects.get(tenant=world.acme).used_image_bytes == sum(len(x.blob) for x in built.layers)
    listed = httpx.get(f"http://{registry}/v2/acme/tools/app/tags/list", auth=("mia", secret)).json()
    assert listed["tags"] == ["1"]
    assert AuditEntry.objects.filter(action="registry.push", outcome="ok", actor=world.user("mia")).exists()

    back = skopeo(
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        f"mia:{secret}",
        f"docker://{registry}/acme/tools/app@{built.manifest_digest}",
        f"oci:{tmp_path / 'back'}:copy",
    )
    assert back.returncode == 0, back.stderr
    for digest, data in built.blobs().items():
        assert (tmp_path / "back" / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes() == data

    again = skopeo_push(layout, registry, "acme/tools/app:1", f"mia:{secret}")
    assert again.returncode == 0, again.stderr
    assert Quota.objects.get(tenant=world.acme).used_image_bytes == sum(len(x.blob) for x in built.layers)


def test_it_takes_a_chunked_upload_and_resumes_where_the_status_says(
    world: World, registry_server: str, tmp_path: Path
) -> None:
    registry = registry_server
    auth = ("mia", token_of(world, "mia"))
    data = bytes(range(256)) * 4096 + b"tail"
    started = httpx.post(f"http://{registry}/v2/acme/chunks/blobs/uploads/", auth=auth)
    assert started.status_code == 202
    location = f"http://{registry}{started.headers['location']}"

    first = httpx.patch(location, content=data[:300_000], auth=auth, headers={"Content-Range": "0-299999"})
    assert first.status_code == 202 and first.headers["range"] == "0-299999"
    status = httpx.get(location, auth=auth)
    assert status.status_code == 204 and status.headers["range"] == "0-299999"
    overlapping = httpx.patch(
        location, content=data[100:200], auth=auth, headers={"Content-Range": "100-199"}
    )
    assert overlapping.status_code == 416
    resume_at = int(status.headers["range"].split("-")[1]) + 1
    second = httpx.patch(
        location,
        content=data[resume_at:],
        auth=auth,
        headers={"Content-Range": f"{resume_at}-{len(data) - 1}"},
    )
    assert second.status_code == 202 and second.headers["range"] == f"0-{len(data) - 1}"
    finished = httpx.put(location, params={"digest": digest_of(data)}, auth=auth)

    assert finished.status_code == 201, finished.text
    assert finished.headers["docker-content-digest"] == digest_of(data)
    assert get_store().blob_path(digest_of(data)).read_bytes() == data
    assert not RegistryUpload.objects.exists()
    head = httpx.head(f"http://{registry}/v2/acme/chunks/blobs/{digest_of(data)}", auth=auth)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)


def test_it_denies_a_viewer_and_a_read_only_token_a_push_and_audits_it(
    world: World, registry_server: str, tmp_path: Path
) -> None:
    registry = registry_server
    layout = write_layout(build_image(busybox_layers("viewer")), tmp_path / "layout")
    secret = token_of(world, "vic")
    refused = skopeo_push(layout, registry, "acme/app:1", f"vic:{secret}")
    assert refused.returncode != 0
    for user, token in (("vic", secret), ("mia", world.tokens["mia_readonly"])):
        bearer = httpx.get(
            f"http://{registry}/v2/token",
            params={"service": "bulkhead", "scope": "repository:acme/app:pull,push"},
            auth=(user, token),
        ).json()["token"]
        response = httpx.post(
            f"http://{registry}/v2/acme/app/blobs/uploads/", headers={"Authorization": f"Bearer {bearer}"}
        )
        assert (response.status_code, error_code(response)) == (403, "DENIED")
    assert not RegistryTag.objects.exists() and not RegistryUpload.objects.exists()
    for persona in ("vic", "mia"):
        assert AuditEntry.objects.filter(
            action="registry.push", outcome="denied", actor=world.user(persona)
        ).exists()


def test_it_keeps_another_tenant_out_of_pushing_and_mounting(
    world: World, registry_server: str, tmp_path: Path
) -> None:
    registry = registry_server
    built = build_image(busybox_layers("acme-secret"))
    mia = ("mia", token_of(world, "mia"))
    assert push_by_http(registry, mia, "acme/private", "1", built).status_code == 201
    bob = ("bob", token_of(world, "bob"))
    layer = built.layers[0]

    answers = []
    for name in ("acme/private", "nosuchtenant/private"):
        response = httpx.post(f"http://{registry}/v2/{name}/blobs/uploads/", auth=bob)
        answers.append((response.status_code, error_code(response)))
    assert answers == [(403, "DENIED")] * 2
    scoped = httpx.post(
        f"http://{registry}/v2/globex/mine/blobs/uploads/", auth=("alice", world.tokens["alice_acme"])
    )
    assert (scoped.status_code, error_code(scoped)) == (403, "DENIED")
    started = httpx.post(f"http://{registry}/v2/acme/private/blobs/uploads/", auth=mia)
    taken_over = httpx.patch(
        f"http://{registry}{started.headers['location']}",
        content=b"x",
        auth=("alice", world.tokens["alice_acme"]),
    )
    assert (taken_over.status_code, error_code(taken_over)) == (404, "BLOB_UPLOAD_UNKNOWN")

    mount = httpx.post(
        f"http://{registry}/v2/globex/mine/blobs/uploads/",
        params={"mount": layer.digest, "from": "acme/private"},
        auth=bob,
    )
    assert mount.status_code == 202  # an upload session, as for any blob this registry does not give
    forged = upload_blob(registry, bob, "globex/mine", b"not the layer")
    assert forged.status_code == 201  # bob's own bytes: fine
    claimed = httpx.post(
        f"http://{registry}/v2/globex/mine/blobs/uploads/",
        params={"digest": layer.digest},
        content=b"not the layer",
        auth=bob,
    )
    assert (claimed.status_code, error_code(claimed)) == (400, "DIGEST_INVALID")
    assert not RegistryBlob.objects.filter(tenant=world.globex, digest=layer.digest).exists()
    head = httpx.head(f"http://{registry}/v2/globex/mine/blobs/{layer.digest}", auth=bob)
    assert head.status_code == 404
    for blob in (built.config,):
        assert upload_blob(registry, bob, "globex/mine", blob).status_code == 201
    borrowed = httpx.put(
        f"http://{registry}/v2/globex/mine/manifests/1",
        content=built.manifest,
        auth=bob,
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert (borrowed.status_code, error_code(borrowed)) == (400, "MANIFEST_BLOB_UNKNOWN")
    assert AuditEntry.objects.filter(
        action="registry.mount", outcome="denied", actor=world.user("bob")
    ).exists()
    assert AuditEntry.objects.filter(
        action="registry.push", outcome="denied", actor=world.user("bob")
    ).exists()


def test_it_refuses_an_upload_beyond_the_quota_before_storing_it(world: World, registry_server: str) -> None:
    registry = registry_server
    Quota.objects.filter(tenant=world.acme).update(image_bytes=10_000, used_image_bytes=4_000)
    auth = ("mia", token_of(world, "mia"))
    data = b"z" * 7_000

    monolithic = upload_blob(registry, auth, "acme/big", data)
    assert (monolithic.status_code, error_code(monolithic)) == (403, "DENIED")
    started = httpx.post(f"http://{registry}/v2/acme/big/blobs/uploads/", auth=auth)
    location = f"http://{registry}{started.headers['location']}"
    chunked = httpx.patch(location, content=iter([data[:3_000], data[3_000:]]), auth=auth)
    assert (chunked.status_code, error_code(chunked)) == (403, "DENIED")

    assert not get_store().has_blob(digest_of(data))
    assert not [p for p in (get_store().root / "ingest").iterdir() if p.name.startswith("registry-")]
    assert not RegistryUpload.objects.exists() and not RegistryBlob.objects.exists()
    assert AuditEntry.objects.filter(
        action="registry.push", outcome="denied", actor=world.user("mia")
    ).exists()
    fits = upload_blob(registry, auth, "acme/big", data[:5_000])
    assert fits.status_code == 201
    no_room_left = upload_blob(registry, auth, "acme/big", b"y" * 2_000)
    assert (no_room_left.status_code, error_code(no_room_left)) == (403, "DENIED")


def test_it_refuses_a_wrong_digest_and_keeps_nothing(world: World, registry_server: str) -> None:
    registry = registry_server
    auth = ("mia", token_of(world, "mia"))
    data, claimed = b"what was sent", digest_of(b"what was promised")
    started = httpx.post(f"http://{registry}/v2/acme/app/blobs/uploads/", auth=auth)
    location = f"http://{registry}{started.headers['location']}"

    finished = httpx.put(location, params={"digest": claimed}, content=data, auth=auth)

    assert (finished.status_code, error_code(finished)) == (400, "DIGEST_INVALID")
    assert not get_store().has_blob(claimed) and not get_store().has_blob(digest_of(data))
    assert httpx.get(location, auth=auth).status_code == 404
    assert not RegistryBlob.objects.exists()
    manifest = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}'
    wrong = httpx.put(
        f"http://{registry}/v2/acme/app/manifests/{digest_of(b'other')}", content=manifest, auth=auth
    )
    assert (wrong.status_code, error_code(wrong)) == (400, "DIGEST_INVALID")


def test_it_refuses_a_hostile_pushed_layer_like_a_hostile_import(world: World, registry_server: str) -> None:
    registry = registry_server
    tar = hostile.archive(hostile.member("../escaped", b"owned"))
    built = build_image([BuiltLayer(tar, tar, "application/vnd.oci.image.layer.v1.tar")])
    auth = ("mia", token_of(world, "mia"))

    assert push_by_http(registry, auth, "acme/evil", "1", built).status_code == 201
    op = Operation.objects.get(kind="image.push", tenant=world.acme)
    done = run_inline(str(op.pk))

    assert done.state == "failed"  # type: ignore[attr-defined]
    assert "escaped" in done.error  # type: ignore[attr-defined]
    assert not Image.objects.filter(name="evil").exists()
    assert httpx.head(f"http://{registry}/v2/acme/evil/manifests/1", auth=auth).status_code == 404
    assert Quota.objects.get(tenant=world.acme).used_image_bytes == 0
    assert AuditEntry.objects.filter(action="image.push", outcome="failed").exists()


def test_it_lets_an_admin_delete_a_tag_and_not_a_member(world: World, registry_server: str) -> None:
    registry = registry_server
    built = build_image(busybox_layers("deleted"))
    mia = ("mia", token_of(world, "mia"))
    assert push_by_http(registry, mia, "acme/gone", "1", built).status_code == 201
    pushed_image(world, world.acme, "gone", "1")

    refused = httpx.delete(f"http://{registry}/v2/acme/gone/manifests/1", auth=mia)
    assert (refused.status_code, error_code(refused)) == (403, "DENIED")
    deleted = httpx.delete(
        f"http://{registry}/v2/acme/gone/manifests/1", auth=("amir", token_of(world, "amir"))
    )

    assert deleted.status_code == 202
    assert httpx.head(f"http://{registry}/v2/acme/gone/manifests/1", auth=mia).status_code == 404
    assert not Image.objects.filter(tenant=world.acme, name="gone").exists()
    assert AuditEntry.objects.filter(action="registry.delete", actor=world.user("amir")).exists()
    loose = b"a blob no manifest uses"
    assert upload_blob(registry, mia, "acme/gone", loose).status_code == 201
    blob_url = f"http://{registry}/v2/acme/gone/blobs/{digest_of(loose)}"
    assert httpx.delete(blob_url, auth=mia).status_code == 403
    assert httpx.delete(blob_url, auth=("amir", token_of(world, "amir"))).status_code == 202
    assert httpx.head(blob_url, auth=mia).status_code == 404
    assert AuditEntry.objects.filter(
        action="registry.delete", outcome="denied", actor=world.user("mia")
    ).exists()


def test_it_lets_podman_push_an_image_from_its_own_storage(
    world: World, registry_server: str, tmp_path: Path
) -> None:
    registry = registry_server
    built = build_image(busybox_layers("podman"))
    layout = write_layout(built, tmp_path / "layout")
    # A private podman storage: nothing of the machine's images or containers is touched (podman wants
    # a run root of at most 50 characters, hence not under tmp_path).
    runroot = Path(tempfile.mkdtemp(prefix="bh-podman-"))
    storage = ["--root", str(tmp_path / "podman-root"), "--runroot", str(runroot), "--storage-driver", "vfs"]
    secret = token_of(world, "mia")

    def podman(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PODMAN, *storage, *args], capture_output=True, text=True, timeout=180)

    try:
        loaded = podman("pull", f"oci:{layout}:latest")
        assert loaded.returncode == 0, loaded.stderr
        image_id = loaded.stdout.strip().splitlines()[-1]
        authfile = str(tmp_path / "auth.json")
        login = subprocess.run(
            [
                PODMAN,
                *storage,
                "login",
                "--tls-verify=false",
                "--authfile",
                authfile,
                "-u",
                "mia",
                "--password-stdin",
                registry,
            ],
            input=secret,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert login.returncode == 0, login.stderr
        target = f"docker://{registry}/acme/podman:1"
        pushed = podman("push", "--tls-verify=false", "--authfile", authfile, image_id, target)
    finally:
        shutil.rmtree(runroot, ignore_errors=True)

    assert pushed.returncode == 0, pushed.stderr
    image = pushed_image(world, world.acme, "podman", "1")
    assert [layer.diff_id for layer in image.layers.order_by("image_layers__position")] == [
        layer.diff_id for layer in built.layers
    ]
    assert json.loads(get_store().read_blob(image.config_digest))["rootfs"]["diff_ids"] == [
        layer.diff_id for layer in built.layers
    ]


def test_it_closes_a_tls_handshake_on_its_plain_http_port_at_once(registry_server: str) -> None:
    # Clients with --tls-verify=false try TLS first: a stalled handshake cost each of them 10 s.
    host, port = registry_server.split(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        try:
            context.wrap_socket(raw, server_hostname=host)
        except TimeoutError:
            pytest.fail("the handshake was left hanging")
        except (ssl.SSLError, ConnectionError):
            pass
        else:
            pytest.fail("the plain-HTTP port completed a TLS handshake")
    assert time.monotonic() - started < 3


def test_it_keeps_uploads_and_pushed_blobs_through_gc_and_expires_abandoned_ones(
    world: World, registry_server: str
) -> None:
    registry = registry_server
    auth = ("mia", token_of(world, "mia"))
    data = b"kept" * 100_000
    started = httpx.post(f"http://{registry}/v2/acme/gc/blobs/uploads/", auth=auth)
    location = f"http://{registry}{started.headers['location']}"
    assert httpx.patch(location, content=data[:1000], auth=auth).status_code == 202
    old = httpx.post(f"http://{registry}/v2/acme/gc/blobs/uploads/", auth=auth)
    old_location = f"http://{registry}{old.headers['location']}"
    assert httpx.patch(old_location, content=b"left behind", auth=auth).status_code == 202
    alone = b"pushed, no manifest yet"
    assert upload_blob(registry, auth, "acme/gc", alone).status_code == 201
    RegistryUpload.objects.filter(pk=old.headers["docker-upload-uuid"]).update(
        updated_at=timezone.now() - timedelta(hours=13)
    )

    for lease in (get_store().root / "leases").glob("registry-*.json"):
        lease.unlink()  # ten minutes later: the upload's lease after its commit has run out

    gc = run_inline(str(start_gc(actor=Actor(user=world.user("oscar"))).pk))

    assert gc.state == "succeeded", gc.error  # type: ignore[attr-defined]
    assert gc.result["expired_uploads"] == 1  # type: ignore[attr-defined]
    assert get_store().has_blob(digest_of(alone))
    assert httpx.head(f"http://{registry}/v2/acme/gc/blobs/{digest_of(alone)}", auth=auth).status_code == 200
    assert httpx.get(old_location, auth=auth).status_code == 404
    assert not [
        p for p in (get_store().root / "ingest").iterdir() if old.headers["docker-upload-uuid"] in p.name
    ]
    rest = httpx.patch(location, content=data[1000:], auth=auth)
    assert rest.status_code == 202
    assert httpx.put(location, params={"digest": digest_of(data)}, auth=auth).status_code == 201
    assert get_store().blob_path(digest_of(data)).read_bytes() == data


def test_it_drops_the_registry_tag_when_the_pushed_image_is_deleted_through_the_api(
    world: World, registry_server: str
) -> None:
    registry = registry_server
    built = build_image(busybox_layers("api-deleted"))
    mia = ("mia", token_of(world, "mia"))
    assert push_by_http(registry, mia, "acme/apidel", "1", built).status_code == 201
    image = pushed_image(world, world.acme, "apidel", "1")

    assert client_for(world, "alice").delete(f"/api/v1/images/{image.pk}/").status_code == 204

    assert httpx.head(f"http://{registry}/v2/acme/apidel/manifests/1", auth=mia).status_code == 404
    by_digest = httpx.head(f"http://{registry}/v2/acme/apidel/manifests/{built.manifest_digest}", auth=mia)
    assert by_digest.status_code == 200


MANIFEST_TYPE_OF = {
    "docker-archive": "application/vnd.docker.distribution.manifest.v2+json",
    "oci-archive": "application/vnd.oci.image.manifest.v1+json",
}


@pytest.mark.parametrize("transport", sorted(MANIFEST_TYPE_OF))
def test_it_takes_skopeo_pushes_from_archives(
    world: World, registry_server: str, tmp_path: Path, transport: str
) -> None:
    registry = registry_server
    built = build_image(busybox_layers(transport))
    if transport == "docker-archive":
        archive = write_docker_archive(built, tmp_path / "image.tar")
    else:
        archive = write_oci_archive(built, tmp_path / "image.tar")
    secret = token_of(world, "mia")

    pushed = skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        f"mia:{secret}",
        f"{transport}:{archive}",
        f"docker://{registry}/acme/archived:1",
    )

    assert pushed.returncode == 0, pushed.stderr
    image = pushed_image(world, world.acme, "archived", "1")
    assert [layer.diff_id for layer in image.layers.order_by("image_layers__position")] == [
        layer.diff_id for layer in built.layers
    ]
    head = httpx.head(f"http://{registry}/v2/acme/archived/manifests/1", auth=("mia", secret))
    assert head.headers["content-type"] == MANIFEST_TYPE_OF[transport]
