"""The registry (`/v2/`) as a compromised host would use it with its own credential (`Bearer bhh_…`).

A host fetches its workloads' layers where any client does, from the image's repository; it may GET or
HEAD a blob of an image that a workload placed on it runs, and nothing else: not another host's blob, not
its own blob through a repository its workloads do not run from, no manifest or tag list, no push, no
delete. What it may not fetch answers like a missing blob; every refusal is audited."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from compute import hosts, services
from compute.models import Host
from imaging.models import Image, RegistryUpload
from tenants.actors import Actor
from tenants.models import AuditEntry
from tests.conftest import World
from tests.imaging.images import busybox_layers
from tests.imaging.test_registry_server import imported
from tests.processes import serve_registry

pytestmark = pytest.mark.django_db(transaction=True)


def make_host(name: str) -> Host:
    facts = {"cpus": 4, "memory_mib": 8192, "disk_gib": 100, "oci_runtimes": ["runc"]}
    return hosts.register_host(actor=Actor.system("test"), name=name, facts=facts)


def place(world: World, name: str, image: Image, host: Host) -> None:
    """A workload of the image's tenant pinned to `host` (its creation task is never run here)."""
    services.create_workload(
        actor=Actor(user=world.user("oscar")),
        tenant=image.tenant,
        spec=services.WorkloadSpec(name=name, image=image, host=host),  # type: ignore[arg-type]
        compartments=[],
    )


@pytest.fixture
def portal(world: World, settings: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    store = tmp_path / "store"
    settings.BULKHEAD_STORE_DIR = store
    on_a = imported(world, tmp_path, "alice", world.acme, "web", busybox_layers("on-a"))
    on_b = imported(world, tmp_path, "alice", world.acme, "db", busybox_layers("on-b"))
    a, b = make_host("bht-reg-a"), make_host("bht-reg-b")
    system = Actor.system("test")
    place(world, "web", on_a, a)
    place(world, "db", on_b, b)
    with serve_registry(store) as address:
        yield {
            "url": f"http://{address}",
            "a": a,
            "secret_a": hosts.issue_host_credential(actor=system, host=a),
            "on_a": on_a,
            "on_b": on_b,
        }


def as_host(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def only_layer(image: Image, other: Image) -> Any:
    """A layer of `image` that `other` does not have (the marked top layer)."""
    theirs = set(other.layers.values_list("digest", flat=True))
    return next(layer for layer in image.layers.all() if layer.digest not in theirs)


def fetched(portal: dict[str, Any], path: str) -> httpx.Response:
    """GET `path` of the registry with host a's credential."""
    return httpx.get(f"{portal['url']}/v2/{path}", headers=as_host(portal["secret_a"]))


def denials(action: str) -> int:
    return AuditEntry.objects.filter(action=action, outcome="denied", actor_label="host bht-reg-a").count()


def test_it_hands_a_host_the_layers_of_its_workloads_image_through_the_registry(
    portal: dict[str, Any],
) -> None:
    layer = only_layer(portal["on_a"], portal["on_b"])
    url = f"{portal['url']}/v2/acme/web/blobs/{layer.digest}"
    answer = httpx.get(url, headers=as_host(portal["secret_a"]))
    assert answer.status_code == 200, answer.text
    assert "sha256:" + hashlib.sha256(answer.content).hexdigest() == layer.digest
    head = httpx.head(url, headers=as_host(portal["secret_a"]))
    assert head.status_code == 200 and int(head.headers["content-length"]) == layer.size
    ranged = httpx.get(url, headers={**as_host(portal["secret_a"]), "Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.content == answer.content[:10]  # a fetch can resume
    config = httpx.get(
        f"{portal['url']}/v2/acme/web/blobs/{portal['on_a'].config_digest}",
        headers=as_host(portal["secret_a"]),
    )
    assert config.status_code == 200
    assert denials("host.blob.fetch") == 0


def test_it_refuses_a_host_a_layer_of_an_image_placed_only_on_another_host(portal: dict[str, Any]) -> None:
    layer = only_layer(portal["on_b"], portal["on_a"])
    for repository in ("acme/db", "acme/web"):
        answer = httpx.get(
            f"{portal['url']}/v2/{repository}/blobs/{layer.digest}", headers=as_host(portal["secret_a"])
        )
        assert answer.status_code == 404, answer.text
    assert denials("host.blob.fetch") == 2


def test_it_refuses_a_host_its_own_layer_through_a_repository_it_runs_nothing_from(
    world: World, portal: dict[str, Any], tmp_path: Path
) -> None:
    # globex holds the very same bytes (the store deduplicates them): the host runs nothing of globex's.
    layer = only_layer(portal["on_a"], portal["on_b"])
    imported(world, tmp_path, "bob", world.globex, "web", busybox_layers("on-a"))
    answer = httpx.get(
        f"{portal['url']}/v2/globex/web/blobs/{layer.digest}", headers=as_host(portal["secret_a"])
    )
    assert answer.status_code == 404, answer.text
    assert denials("host.blob.fetch") == 1


def test_it_lets_a_host_credential_read_no_manifest_or_tag_list_and_push_or_delete_nothing(
    portal: dict[str, Any],
) -> None:
    base, headers = f"{portal['url']}/v2/acme/web", as_host(portal["secret_a"])
    layer = only_layer(portal["on_a"], portal["on_b"])
    answers = [
        httpx.get(f"{base}/manifests/1", headers=headers),
        httpx.get(f"{base}/tags/list", headers=headers),
        httpx.post(f"{base}/blobs/uploads/", headers=headers),
        httpx.delete(f"{base}/blobs/{layer.digest}", headers=headers),
        httpx.delete(f"{base}/manifests/{portal['on_a'].manifest_digest}", headers=headers),
    ]
    assert [answer.status_code for answer in answers] == [403] * 5, [a.text for a in answers]
    assert denials("host.registry") == 5
    assert not RegistryUpload.objects.exists()
    assert Image.objects.filter(pk=portal["on_a"].pk).exists()
    assert httpx.get(f"{base}/blobs/{layer.digest}", headers=headers).status_code == 200  # still there


def test_it_refuses_an_unknown_or_revoked_host_credential(world: World, portal: dict[str, Any]) -> None:
    layer = only_layer(portal["on_a"], portal["on_b"])
    url = f"{portal['url']}/v2/acme/web/blobs/{layer.digest}"
    assert httpx.get(url, headers=as_host("bhh_not-a-credential")).status_code == 401
    assert httpx.get(url, headers=as_host(portal["secret_a"])).status_code == 200
    hosts.revoke_host_credentials(actor=Actor(user=world.user("oscar")), host=portal["a"])
    assert httpx.get(url, headers=as_host(portal["secret_a"])).status_code == 401
    assert AuditEntry.objects.filter(action="auth.host", outcome="denied").count() == 2


def test_it_refuses_a_host_credential_wherever_a_users_credential_goes_and_audits_it(
    world: World, portal: dict[str, Any]
) -> None:
    """A host's credential is no user's: not on the registry's root or token endpoint (Bearer, or as a
    password with any user name), not on the REST API, not on a blob through Basic."""
    import base64

    from rest_framework.test import APIClient

    secret, url = portal["secret_a"], portal["url"]
    layer = only_layer(portal["on_a"], portal["on_b"])

    def basic(user: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}

    assert httpx.get(f"{url}/v2/", headers=as_host(secret)).status_code == 403  # no login as a client
    assert denials("host.registry") == 1
    token = httpx.get(f"{url}/v2/token?scope=repository:acme/web:pull,push", headers=basic("alice"))
    assert token.status_code == 401
    assert AuditEntry.objects.filter(action="registry.login", outcome="denied").count() == 1
    as_basic = httpx.get(f"{url}/v2/acme/web/blobs/{layer.digest}", headers=basic("bht-reg-a"))
    assert as_basic.status_code == 401
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert api.get("/api/v1/tenants/").status_code == 401
    assert api.get("/api/v1/workloads/").status_code == 401
    assert AuditEntry.objects.filter(action="auth.token", outcome="denied").count() == 2


def test_it_stops_handing_a_host_the_layers_of_a_workload_that_left_it(
    world: World, portal: dict[str, Any]
) -> None:
    from compute.models import Workload

    layer = only_layer(portal["on_a"], portal["on_b"])
    url = f"{portal['url']}/v2/acme/web/blobs/{layer.digest}"
    assert httpx.get(url, headers=as_host(portal["secret_a"])).status_code == 200
    Workload.objects.filter(tenant=world.acme, name="web").update(host=Host.objects.get(name="bht-reg-b"))
    assert httpx.get(url, headers=as_host(portal["secret_a"])).status_code == 404
    head = httpx.head(url, headers=as_host(portal["secret_a"]))
    assert head.status_code == 404 and head.headers.get("docker-content-digest") is None
    assert denials("host.blob.fetch") == 2


@pytest.mark.parametrize(
    "path",
    [
        "acme/web/..%2fdb/blobs/{digest}",
        "acme/..%2fglobex%2fweb/blobs/{digest}",
        "acme%2fweb/blobs/{digest}",
        "ACME/web/blobs/{digest}",
        "acme/web/blobs/{digest}%2f..%2f..",
        "acme/web/blobs/{digest}/",
        "acme/web/blobs/sha256:..%2f..%2fetc%2fpasswd",
    ],
)
def test_it_gives_a_host_nothing_through_a_repository_or_digest_with_path_tricks(
    portal: dict[str, Any], path: str
) -> None:
    layer = only_layer(portal["on_b"], portal["on_a"])  # placed only on b
    answer = httpx.get(
        f"{portal['url']}/v2/" + path.format(digest=layer.digest), headers=as_host(portal["secret_a"])
    )
    assert answer.status_code in (400, 403, 404), answer.text
    assert hashlib.sha256(answer.content).hexdigest() != layer.digest.removeprefix("sha256:")


HUGE = "9" * 5000  # past Python's 4300 digits for int(text)


@pytest.mark.parametrize(
    "text",
    ["bytes=0-" + HUGE, f"bytes={HUGE}-", "bytes=-" + HUGE, "bytes=5-2", "bytes=0-1,3-4"],
    ids=["huge-end", "huge-start", "huge-suffix", "backwards", "two-ranges"],
)
def test_it_answers_a_hosts_range_it_cannot_satisfy_with_416_not_an_error(
    portal: dict[str, Any], text: str
) -> None:
    layer = only_layer(portal["on_a"], portal["on_b"])
    url = f"{portal['url']}/v2/acme/web/blobs/{layer.digest}"
    answer = httpx.get(url, headers={**as_host(portal["secret_a"]), "Range": text})
    assert answer.status_code in (206, 416), (answer.status_code, answer.text[:200])
    if answer.status_code == 206:
        assert len(answer.content) <= layer.size


def test_it_throttles_password_guessing_through_the_registry_as_the_sign_in_form_does(
    world: World, portal: dict[str, Any], settings: Any
) -> None:
    """The registry's Basic login (token endpoint, or on a resource) took any number of guesses at a
    user's password: none was counted, only the token endpoint's were audited."""
    import base64

    url, limit = portal["url"], settings.BULKHEAD_AUTH_FAILURES_PER_MINUTE

    def basic(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    token_url = f"{url}/v2/token?scope=repository:acme/web:pull"
    for attempt in range(limit):
        guessed = token_url if attempt % 2 else f"{url}/v2/acme/web/tags/list"
        assert httpx.get(guessed, headers=basic("alice", f"guess {attempt}")).status_code == 401
    assert AuditEntry.objects.filter(action="registry.login", outcome="denied").count() == limit
    # A right credential now changes nothing for a minute: the guesser cannot tell it found one.
    alice = world.tokens["alice_acme"]
    assert httpx.get(token_url, headers=basic("alice", alice)).status_code == 429
    assert httpx.get(f"{url}/v2/acme/web/tags/list", headers=basic("alice", alice)).status_code == 429
    # Another user from the same address is not locked out.
    assert httpx.get(token_url, headers=basic("bob", world.tokens["bob"])).status_code == 200
