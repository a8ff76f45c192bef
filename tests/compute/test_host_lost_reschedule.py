"""A lost host's `reschedule` workloads move to another host after a grace period; `wait` and pinned
ones stay; when the lost host comes back, its agent removes its now-foreign copy."""

from __future__ import annotations

import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from compute import hosts
from compute.compartments import PublishedPort
from compute.models import Host, Workload
from portal.models import Operation
from tenants.actors import Actor
from tenants.models import AuditEntry
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.compute.runtimes import oci_runtime
from tests.compute.separate_hosts import SeparateHost, separate_portal
from tests.conftest import World, client_for
from tests.imaging.images import (
    Entry,
    build_image,
    busybox_layers,
    make_layer,
    post_archive,
    run_inline,
    write_oci_archive,
)
from tests.processes import host_agent, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def lose(host: Host, *alive: Host) -> Any:
    """The host falls silent (the `alive` ones keep answering); returns a moment past the deadline."""
    later = timezone.now() + hosts.LOST_AFTER + timedelta(seconds=1)
    assert host.name in hosts.mark_lost_hosts(now=later)
    for other in alive:
        hosts.heartbeat(other.pk)
    return later


def place(world: World, busybox: Any, name: str, **body: Any) -> Workload:
    response = create(world, "mia", name=name, image=str(busybox.pk), start=False, **body)
    assert response.status_code == 202, response.json()
    return Workload.objects.get(name=name)


def test_it_moves_only_reschedule_workloads_and_only_after_the_grace(
    world: World, busybox: Any, settings: Any
) -> None:
    settings.BULKHEAD_RESCHEDULE_GRACE_SECONDS = 30
    a = make_host("bht-lost-a")
    hosts.set_host_state(actor=Actor(user=world.user("oscar")), host=a, state="ready")
    movable = place(world, busybox, "movable", on_host_lost="reschedule", command=["/bin/sleep", "300"])
    waiting = place(world, busybox, "waiting", command=["/bin/sleep", "300"])
    b = make_host("bht-lost-b")
    Workload.objects.filter(pk__in=[movable.pk, waiting.pk]).update(state="running", host=a)
    PublishedPort.objects.create(
        tenant=world.acme, workload=movable, host=a, protocol="tcp", host_port=20080, workload_port=80
    )
    lost_at = lose(a, b)

    assert hosts.reschedule_lost_workloads(now=lost_at + timedelta(seconds=5)) == []
    assert Workload.objects.get(pk=movable.pk).host == a

    moved_names = hosts.reschedule_lost_workloads(now=lost_at + timedelta(seconds=31))
    assert moved_names == ["movable"]
    moved = Workload.objects.get(pk=movable.pk)
    assert (moved.host, moved.state, moved.runtime_id) == (b, "pending", movable.runtime_id)
    assert "moved from bht-lost-a" in moved.status_message
    assert PublishedPort.objects.get(workload=moved).host == b
    op = Operation.objects.get(kind="workload.reschedule", target_id=str(moved.pk))
    assert op.queue == b.queue and op.tenant == world.acme
    assert AuditEntry.objects.filter(action="workload.reschedule", object_id=str(moved.pk)).exists()
    stayed = Workload.objects.get(pk=waiting.pk)
    assert (stayed.host, stayed.state) == (a, "unknown")


def test_it_says_why_a_workload_could_not_move_and_keeps_it(world: World, busybox: Any) -> None:
    a = make_host("bht-lost-only")
    movable = place(world, busybox, "stuck", on_host_lost="reschedule")
    Workload.objects.filter(pk=movable.pk).update(state="running", host=a)
    lost_at = lose(a)
    assert hosts.reschedule_lost_workloads(now=lost_at + timedelta(hours=1)) == []
    stuck = Workload.objects.get(pk=movable.pk)
    assert (stuck.host, stuck.state) == (a, "unknown")
    assert stuck.status_message.startswith("host lost; not moved yet:")


def test_it_runs_the_workload_on_another_host_and_the_returning_host_drops_its_copy(
    world: World, busybox: Any, store_dir: Path, settings: Any
) -> None:
    settings.BULKHEAD_RESCHEDULE_GRACE_SECONDS = 0
    a, b = make_host("bht-move-a"), make_host("bht-move-b")
    oscar = Actor(user=world.user("oscar"))
    try:
        hosts.set_host_state(actor=oscar, host=b, state="maintenance")  # everything lands on a
        with host_agent(a, BULKHEAD_STORE_DIR=str(store_dir)):
            response = create(
                world, "mia", name="mover", image=str(busybox.pk), command=["/bin/sleep", "300"],
                on_host_lost="reschedule",
            )  # fmt: skip
            assert finished(response.json()["id"]).state == "succeeded"
            mover = workload_in("mover", {"running"})
            assert mover.host == a
        # a's agent is gone (its container still runs there, as on a machine cut off the network).
        assert oci_runtime(a).list_ids() == [mover.runtime_id]
        hosts.set_host_state(actor=oscar, host=b, state="ready")
        lost_at = lose(a, b)
        with host_agent(b, BULKHEAD_STORE_DIR=str(store_dir)):
            assert hosts.reschedule_lost_workloads(now=lost_at) == ["mover"]
            op = Operation.objects.get(kind="workload.reschedule")
            assert finished(str(op.pk)).state == "succeeded", op.error
            moved = workload_in("mover", {"running"})
            assert moved.host == b and oci_runtime(b).list_ids() == [mover.runtime_id]
            # a comes back: its agent's re-sync removes the copy that is no longer its own.
            with host_agent(a, BULKHEAD_STORE_DIR=str(store_dir)):
                wait_until(lambda: oci_runtime(a).list_ids() == [], timeout=30, what="a to drop its copy")
                assert Host.objects.get(pk=a.pk).state == "ready"
                assert Workload.objects.get(pk=mover.pk).host == b
                assert Workload.objects.get(pk=mover.pk).state == "running"
    finally:
        cleanup_host(a)
        cleanup_host(b)


# --- real separation: the hosts are machines of their own (tests/compute/separate_hosts.py) -----------

GRACE_SECONDS = 10
SWEEP_SECONDS = 15  # compute.reschedule_lost_workloads' beat period
START_SECONDS = 60  # a container's start on a loaded 2-core machine, with room
DB_ANSWER = "the db says 42"
CGI_SCRIPT = b"""#!/bin/sh
echo "Content-Type: text/plain"
echo
/bin/wget -q -O - http://db:7000/answer.txt
"""


def webdb_image(world: World, tmp_path: Path) -> Any:
    """One busybox image that is both: httpd with a CGI script asking the db (web), httpd with a file (db)."""
    from imaging.models import Image

    applets = {f"bin/{name}": Entry(symlink="busybox") for name in ("httpd", "wget")}
    app = {
        "www/cgi-bin/answer": Entry(CGI_SCRIPT, mode=0o755),
        "db/answer.txt": Entry(f"{DB_ANSWER}\n".encode()),
    }
    image = build_image([*busybox_layers("webdb"), make_layer(applets), make_layer(app)])
    archive = write_oci_archive(image, tmp_path / "webdb.tar")
    response = post_archive(client_for(world, "alice"), archive, name="webdb", tag="1", tenant=world.acme)
    assert response.status_code == 202, response.json()
    assert run_inline(response.json()["id"]).state == "succeeded"
    return Image.objects.get(tenant=world.acme, name="webdb", tag="1")


def place_on(
    world: World, host: SeparateHost, away: SeparateHost, name: str, image: Any, **body: Any
) -> Workload:
    oscar = Actor(user=world.user("oscar"))
    hosts.set_host_state(actor=oscar, host=Host.objects.get(pk=host.row.pk), state="ready")
    hosts.set_host_state(actor=oscar, host=Host.objects.get(pk=away.row.pk), state="maintenance")
    response = create(world, "mia", name=name, image=str(image.pk), compartments=["app"], **body)
    assert response.status_code == 202, response.json()
    assert finished(response.json()["id"], timeout=120).state == "succeeded"
    workload = workload_in(name, {"running"})
    assert workload.host_id == host.row.pk
    return workload


class Poller:
    """Asks the app on its published port every 0.2 s and keeps (monotonic time, answered right)."""

    def __init__(self, url: str) -> None:
        self.url, self.seen = url, []  # type: list[tuple[float, bool]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.append((time.monotonic(), answer(self.url) == DB_ANSWER))
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def downtime_after(self, moment: float) -> float | None:
        """From the last right answer at or before `moment` to the first right answer after the failures
        that followed it (None: not answering again yet)."""
        seen = list(self.seen)
        before = [t for t, ok in seen if ok and t <= moment]
        failed_after = [t for t, ok in seen if not ok and t > moment]
        if not failed_after:
            return 0.0 if any(ok and t > moment for t, ok in seen) else None
        back = [t for t, ok in seen if ok and t > failed_after[0]]
        return back[0] - (before[-1] if before else moment) if back else None


def answer(url: str) -> str | None:
    import httpx

    try:
        response = httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None
    return response.text.strip() if response.status_code == 200 else None


def test_a_killed_separate_host_is_lost_within_a_minute_and_the_app_spanning_it_keeps_answering(
    world: World, store_dir: Path, tmp_path: Path
) -> None:
    """Two hosts that are machines of their own; web on one (its port published there), db on the other,
    one compartment across both (VXLAN). The db's host dies: its agent and worker are SIGKILLed and the
    machine falls off the network (its old db copy must not keep answering in the new one's place). The
    host is `lost` within 60 s (LOST_AFTER 40 s + the 15 s sweep), the db (`reschedule`) runs on the web's
    host within the grace + one sweep + its start, and the web answers again on its published port with
    the db's answer, reached by name at the same address.

    The db's data does NOT move: it starts fresh from its image on the new host (here its answer is in
    the image, so nothing is missed); data written at run time is lost until the db keeps it on a volume."""
    image = webdb_image(world, tmp_path)
    network = {"labels": {"network": "on", "uplink": "eth0"}}
    grace = {"BULKHEAD_RESCHEDULE_GRACE_SECONDS": str(GRACE_SECONDS)}
    with (
        separate_portal(store_dir, world, beat=True, **grace) as portal,
        portal.host("bht-sep-web", **network) as web_host,
        portal.host("bht-sep-db", **network) as db_host,
    ):
        made = client_for(world, "amir").post(
            "/api/v1/compartments/", {"tenant": str(world.acme.pk), "name": "app"}, format="json"
        )
        assert made.status_code == 201, made.json()
        web = place_on(
            world, web_host, db_host, "web", image, command=["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]
        )
        db = place_on(
            world, db_host, web_host, "db", image, command=["/bin/httpd", "-f", "-p", "7000", "-h", "/db"],
            on_host_lost="reschedule",
        )  # fmt: skip
        hosts.set_host_state(
            actor=Actor(user=world.user("oscar")), host=Host.objects.get(pk=web_host.row.pk), state="ready"
        )
        published = client_for(world, "mia").post(
            "/api/v1/published-ports/", {"workload": str(web.pk), "workload_port": 8080}, format="json"
        )
        assert published.status_code == 201, published.json()
        url = f"http://{web_host.address}:{published.json()['host_port']}/cgi-bin/answer"
        wait_until(
            lambda: answer(url) == DB_ANSWER, timeout=60, what="the web to answer with the db's answer"
        )

        poller = Poller(url)
        try:
            killed = db_host.kill()
            subprocess.run(["ip", "-n", db_host.netns, "link", "set", "eth0", "down"], check=True)
            wait_until(
                lambda: Host.objects.get(pk=db_host.row.pk).state == "lost", timeout=60, interval=0.5,
                what="the killed host to be lost",
            )  # fmt: skip
            lost_after = time.monotonic() - killed
            print(f"\nseparate hosts: lost after {lost_after:.1f} s")
            moved = wait_until(
                lambda: Workload.objects.filter(pk=db.pk, host=web_host.row.pk, state="running").first(),
                timeout=GRACE_SECONDS + SWEEP_SECONDS + START_SECONDS,
                interval=0.5,
                what="the db to run on the web's host",
            )
            running_after = time.monotonic() - killed
            assert moved.runtime_id == db.runtime_id
            wait_until(
                lambda: poller.downtime_after(killed) is not None, timeout=30, what="the app to answer again"
            )
        finally:
            poller.stop()
        downtime = poller.downtime_after(killed)
        assert downtime is not None
        print(
            f"\nseparate hosts: lost after {lost_after:.1f} s; db running on the other host after "
            f"{running_after:.1f} s (grace {GRACE_SECONDS} s); app down {downtime:.1f} s"
        )
        assert Workload.objects.get(pk=web.pk).host_id == web_host.row.pk
        assert AuditEntry.objects.filter(action="workload.reschedule", object_id=str(db.pk)).exists()
