"""The UI of images, workloads and hosts: the right people see the right things, services do the work."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from compute.models import Host, JoinToken, Workload
from imaging.models import Image
from portal.models import Operation
from tests.conftest import World
from tests.imaging.images import build_image, busybox_layers, db_image, run_inline, write_oci_archive

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}


def signed_in(world: World, persona: str) -> Client:
    client = Client()
    client.force_login(world.user(persona))
    return client


def a_host(name: str = "ui-host") -> Host:
    return Host.objects.create(
        name=name, cpus=8, memory_mib=16384, facts={"oci_runtimes": ["runc"], "kernel": "6.1.0-test"}
    )


def a_workload(tenant: Any, name: str = "web", image: Any = None) -> Workload:
    host = Host.objects.filter(name="ui-host").first() or a_host()
    image = image or db_image(tenant, f"img-{name}")
    return Workload.objects.create(tenant=tenant, name=name, image=image, host=host)


# --- images ---------------------------------------------------------------------------------------


def test_it_lists_the_tenants_images_and_marks_public_ones(world: World) -> None:
    db_image(world.acme, "acme-app")
    db_image(None, "public-base")
    db_image(world.globex, "globex-secret")
    html = signed_in(world, "vic").get(reverse("images")).content.decode()
    assert "acme-app" in html and "public-base" in html
    assert "globex-secret" not in html
    assert "Public" in html
    assert 'action="/images/import/"' not in html  # a viewer is not offered the import form


def test_it_shows_layers_and_which_are_shared(world: World) -> None:
    first = db_image(world.acme, "one", layer_seeds=("base", "mine"))
    db_image(world.acme, "two", layer_seeds=("base", "other"))
    response = signed_in(world, "mia").get(reverse("image-detail", args=[first.pk]))
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count(">shared</span>") == 1
    assert "&quot;cmd&quot;" in html  # the configuration


def test_it_hides_another_tenants_image(world: World) -> None:
    theirs = db_image(world.globex, "globex-app")
    client = signed_in(world, "alice")
    assert client.get(reverse("image-detail", args=[theirs.pk])).status_code == 404
    assert client.post(reverse("image-delete", args=[theirs.pk])).status_code == 404
    assert Image.objects.filter(pk=theirs.pk).exists()


def test_it_refuses_to_delete_an_image_in_use_with_a_409(world: World) -> None:
    workload = a_workload(world.acme)
    response = signed_in(world, "mia").post(reverse("image-delete", args=[workload.image_id]))
    assert response.status_code == 409
    assert "A workload uses this image" in response.content.decode()
    assert Image.objects.filter(pk=workload.image_id).exists()


def test_it_tags_an_image(world: World) -> None:
    image = db_image(world.acme, "app")
    response = signed_in(world, "mia").post(
        reverse("image-tag", args=[image.pk]), {"name": "app", "tag": "v2"}
    )
    assert response.status_code == 302
    assert Image.objects.filter(tenant=world.acme, name="app", tag="v2").exists()


@pytest.fixture
def store(settings: Any, tmp_path: Path) -> Path:
    settings.BULKHEAD_STORE_DIR = tmp_path / "store"
    return tmp_path / "store"


def test_it_streams_an_upload_into_the_store_and_shows_the_import_progress(
    world: World, store: Path, tmp_path: Path
) -> None:
    archive = write_oci_archive(build_image(busybox_layers()), tmp_path / "busybox.tar")
    with archive.open("rb") as f:
        response = signed_in(world, "mia").post(
            reverse("image-import"), {"archive": f, "name": "busybox", "tag": "1"}, **HTMX
        )
    assert response.status_code == 200
    op = Operation.objects.get(kind="image.import")
    html = response.content.decode()
    assert f'data-operation-id="{op.pk}"' in html and 'role="progressbar"' in html
    # Streamed by imaging's handler into the ingest area, where the import task picks it up.
    assert (store / "ingest" / op.params["upload"]).is_file()
    assert run_inline(str(op.pk)).state == "succeeded"  # type: ignore[attr-defined]
    assert Image.objects.filter(tenant=world.acme, name="busybox", tag="1").exists()


def test_it_checks_csrf_on_the_upload_and_keeps_nothing(world: World, store: Path, tmp_path: Path) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.user("mia"))
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"x" * 4096)
    with archive.open("rb") as f:
        response = client.post(reverse("image-import"), {"archive": f, "name": "x", "tag": "1"})
    assert response.status_code == 403
    assert not Operation.objects.filter(kind="image.import").exists()
    assert not list((store / "ingest").glob("upload-*"))


def test_it_refuses_an_upload_over_the_limit_and_keeps_nothing(
    world: World, store: Path, tmp_path: Path, settings: Any
) -> None:
    settings.BULKHEAD_MAX_UPLOAD_BYTES = 1024
    archive = tmp_path / "big.tar"
    archive.write_bytes(b"x" * 200_000)
    with archive.open("rb") as f:
        response = signed_in(world, "mia").post(
            reverse("image-import"), {"archive": f, "name": "x", "tag": "1"}
        )
    assert response.status_code == 413
    assert not Operation.objects.filter(kind="image.import").exists()
    assert not list((store / "ingest").glob("upload-*"))


def test_it_starts_garbage_collection_for_operators_only(world: World) -> None:
    assert signed_in(world, "alice").post(reverse("image-gc")).status_code == 404
    response = signed_in(world, "oscar").post(reverse("image-gc"), **HTMX)
    assert response.status_code == 200
    assert Operation.objects.filter(kind="store.gc").count() == 1


# --- workloads ------------------------------------------------------------------------------------


def create_body(image: Image, **fields: str) -> dict[str, str]:
    body = {
        "name": "hello",
        "image": str(image.pk),
        "isolation": "namespace",
        "command": "/bin/sh -c 'echo \"hi there\"; exit 3'",
        "args": "",
        "env": "GREETING=hello world\nEMPTY=\n",
        "workdir": "/tmp",
        "user": "",
        "vcpus": "0.5",
        "memory_mib": "64",
        "restart_policy": "on-failure",
        "start": "on",
    }
    body.update(fields)
    return body


def test_it_creates_a_workload_through_the_form(world: World) -> None:
    a_host()
    image = db_image(world.acme, "app")
    response = signed_in(world, "mia").post(
        reverse("workload-create"), create_body(image), HTTP_HX_TARGET="workload-create", **HTMX
    )
    assert response.status_code == 200, response.content.decode()
    workload = Workload.objects.get(tenant=world.acme, name="hello")
    # Split like a shell line, kept as a list: nothing is ever run by a shell.
    assert workload.command == ["/bin/sh", "-c", 'echo "hi there"; exit 3']
    assert workload.args is None
    assert workload.env == {"GREETING": "hello world", "EMPTY": ""}
    assert str(workload.vcpus) == "0.50" and workload.memory_mib == 64
    assert workload.restart_policy == "on-failure" and workload.desired_running
    op = Operation.objects.get(kind="workload.create", target_id=str(workload.pk))
    assert op.state == "queued" and op.queue == workload.host.queue  # type: ignore[union-attr]
    assert f'data-operation-id="{op.pk}"' in response.content.decode()
    assert response["HX-Trigger"] == "bulkhead:event"


def test_it_offers_only_images_the_tenant_may_use(world: World) -> None:
    db_image(world.acme, "mine")
    db_image(None, "public")
    theirs = db_image(world.globex, "theirs")
    html = signed_in(world, "mia").get(reverse("workloads")).content.decode()
    assert "mine:1" in html and "public:1" in html and "theirs" not in html
    a_host()
    response = signed_in(world, "mia").post(reverse("workload-create"), create_body(theirs))
    assert response.status_code == 422
    assert not Workload.objects.exists()


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"name": "taken"}, "name", "exists"),
        ({"memory_mib": "100000"}, "memory_mib", "memory_mib"),
        ({"command": "/bin/sh -c 'unclosed"}, "command", "quotes"),
        ({"env": "NOEQUALS"}, "env", "KEY=VALUE"),
        ({"workdir": "relative"}, "workdir", "absolute"),
    ],
)
def test_it_shows_refusals_next_to_the_field(
    world: World, fields: dict[str, str], field: str, message: str
) -> None:
    a_host()
    image = db_image(world.acme, "app")
    a_workload(world.acme, "taken", image)
    response = signed_in(world, "mia").post(
        reverse("workload-create"), create_body(image, **fields), HTTP_HX_TARGET="workload-create", **HTMX
    )
    assert response.status_code == 422
    html = response.content.decode()
    error = re.search(rf'<p class="field-error" id="id_{field}_error">([^<]*)</p>', html)
    assert error is not None and message in error.group(1), html
    assert Workload.objects.filter(tenant=world.acme).count() == 1


def test_it_says_when_no_host_fits(world: World) -> None:
    image = db_image(world.acme, "app")
    response = signed_in(world, "mia").post(reverse("workload-create"), create_body(image))
    assert response.status_code == 422
    assert "No host can take" in response.content.decode()
    assert not Workload.objects.exists()


def test_it_lets_viewers_look_but_not_create(world: World) -> None:
    a_workload(world.acme, "web")
    client = signed_in(world, "vic")
    html = client.get(reverse("workloads")).content.decode()
    assert ">web</a>" in html and "Create a workload" not in html
    image = Image.objects.get(name="img-web")
    assert client.post(reverse("workload-create"), create_body(image)).status_code == 404


def test_it_refreshes_the_table_as_a_partial(world: World) -> None:
    a_workload(world.acme, "web")
    response = signed_in(world, "mia").get(reverse("workloads"), HTTP_HX_TARGET="workload-table", **HTMX)
    html = response.content.decode()
    assert html.lstrip().startswith('<section id="workload-table"')
    assert 'hx-trigger="bulkhead:event from:body' in html
    assert "<html" not in html


def test_it_shows_a_workload_with_a_console_for_those_who_operate_it(world: World) -> None:
    workload = a_workload(world.acme, "web")
    html = signed_in(world, "mia").get(reverse("workload-detail", args=[workload.pk])).content.decode()
    assert "Pending" in html and "ui-host" in html
    token = re.search(r'data-console-token="([^"]+)"', html)
    assert token is not None and len(token.group(1)) > 30
    viewer = signed_in(world, "vic").get(reverse("workload-detail", args=[workload.pk]))
    assert viewer.status_code == 200
    assert "data-console-token" not in viewer.content.decode()
    assert "workload-start" not in viewer.content.decode() and "/start/" not in viewer.content.decode()


def test_it_hides_another_tenants_workload(world: World) -> None:
    theirs = a_workload(world.globex, "secret")
    client = signed_in(world, "alice")
    for name in ("workload-detail",):
        assert client.get(reverse(name, args=[theirs.pk])).status_code == 404
    for name in ("workload-start", "workload-stop", "workload-delete", "workload-console-token"):
        assert client.post(reverse(name, args=[theirs.pk])).status_code == 404
    assert not Operation.objects.filter(target_id=str(theirs.pk)).exists()


@pytest.mark.parametrize("action", ["start", "stop", "restart"])
def test_it_starts_an_operation_for_each_action(world: World, action: str) -> None:
    workload = a_workload(world.acme, "web")
    response = signed_in(world, "mia").post(reverse(f"workload-{action}", args=[workload.pk]), **HTMX)
    assert response.status_code == 200
    op = Operation.objects.get(kind=f"workload.{action}", target_id=str(workload.pk))
    assert f'data-operation-id="{op.pk}"' in response.content.decode()


def test_it_deletes_and_commits_a_workload(world: World) -> None:
    workload = a_workload(world.acme, "web")
    client = signed_in(world, "mia")
    response = client.post(
        reverse("workload-commit", args=[workload.pk]), {"name": "snap", "tag": "1"}, **HTMX
    )
    assert response.status_code == 200
    assert Operation.objects.get(kind="workload.commit").params == {"name": "snap", "tag": "1"}
    response = client.post(reverse("workload-delete", args=[workload.pk]), **HTMX)
    assert response["HX-Redirect"] == reverse("workloads")
    assert Workload.objects.get(pk=workload.pk).state == "deleting"


def test_it_mints_a_fresh_console_token_per_request(world: World) -> None:
    workload = a_workload(world.acme, "web")
    client = signed_in(world, "mia")
    url = reverse("workload-console-token", args=[workload.pk])
    first, second = client.post(url).json()["token"], client.post(url).json()["token"]
    assert first and second and first != second
    assert signed_in(world, "vic").post(url).status_code == 404


# --- hosts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("persona", ["alice", "mia", "vic", "bob", "charlie"])
def test_it_hides_the_hosts_page_from_non_operators(world: World, persona: str) -> None:
    host = a_host()
    client = signed_in(world, persona)
    assert client.get(reverse("hosts")).status_code == 404
    assert client.post(reverse("host-join"), {"host_name": "h2"}).status_code == 404
    assert client.post(reverse("host-state", args=[host.pk]), {"state": "draining"}).status_code == 404
    assert Host.objects.get(pk=host.pk).state == "ready"


def test_it_shows_operators_hosts_with_facts_and_usage(world: World) -> None:
    a_workload(world.acme, "web")
    html = signed_in(world, "oscar").get(reverse("hosts")).content.decode()
    assert "ui-host" in html and "6.1.0-test" in html and "runc" in html
    assert "256 of 16384 MiB" in html


def test_it_drains_a_host(world: World) -> None:
    host = a_host()
    response = signed_in(world, "oscar").post(
        reverse("host-state", args=[host.pk]), {"state": "draining"}, **HTMX
    )
    assert response.status_code == 200
    assert Host.objects.get(pk=host.pk).state == "draining"


def test_it_shows_the_join_command_once(world: World) -> None:
    client = signed_in(world, "oscar")
    response = client.post(
        reverse("host-join"),
        {
            "host_name": "node-2",
            "labels": "zone=b\nrack=7",
            "cpu_overcommit": "2",
            "domain_type_override": "qemu",
        },
        **HTMX,
    )
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    command = re.search(r'<code id="join-command" class="secret">([^<]+)</code>', response.content.decode())
    assert command is not None
    assert command.group(1).startswith("make agent PORTAL=http://testserver JOIN_TOKEN=bhj_")
    token = JoinToken.objects.get(host_name="node-2")
    assert token.profile == {
        "labels": {"zone": "b", "rack": "7"},
        "cpu_overcommit": "2",
        "domain_type_override": "qemu",
    }
    secret = command.group(1).rsplit("=", 1)[1]
    assert secret not in client.get(reverse("hosts")).content.decode()


def test_it_shows_a_taken_host_name_as_a_form_error(world: World) -> None:
    a_host("node-1")
    response = signed_in(world, "oscar").post(reverse("host-join"), {"host_name": "node-1"}, **HTMX)
    assert response.status_code == 422
    assert "exists already" in response.content.decode()
    assert not JoinToken.objects.exists()
