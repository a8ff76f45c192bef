"""Disks a host formats ahead for its next creates (`<state>/containers/_spare/<bytes>.img`) do not
outlive their use: an agent that starts drops those of sizes no container placed on it has, and a host
the portal removed drops them all once the portal refuses its credential. A real joined host (its own
store and credential, over HTTP), real runc and mkfs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compute import hosts
from compute.models import Host
from tenants.actors import Actor
from tests.compute.conftest import cleanup_host, create, finished, make_host, workload_in
from tests.compute.runtimes import oci_runtime
from tests.conftest import World, client_for
from tests.processes import host_agent, serve_registry, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

GIB = 1024**3


def spare_sizes(host: Host) -> set[int]:
    spares = oci_runtime(host).state_dir / "_spare"
    return {int(path.name.removesuffix(".img")) for path in spares.glob("*.img")}


def test_it_drops_spare_disks_nobody_asks_for_at_start_and_all_once_the_host_is_removed(
    world: World, busybox: Any, store_dir: Path
) -> None:
    host = make_host("bht-spares")
    secret = hosts.issue_host_credential(actor=Actor.system("test"), host=host)
    host_store = store_dir.with_name(store_dir.name + "-host")
    try:
        with serve_registry(store_dir) as portal:
            joined = {
                "BULKHEAD_STORE_DIR": str(host_store),
                "BULKHEAD_PORTAL_URL": f"http://{portal}",
                "BULKHEAD_HOST_CREDENTIAL": secret,
            }
            with host_agent(host, None, resynced=True, **joined):
                made = create(world, "mia", name="spare", image=str(busybox.pk), command=["sleep", "600"])
                assert finished(made.json()["id"], timeout=120).state == "succeeded"
                # Once it runs, the worker formats the disk the next create of its size takes.
                wait_until(lambda: spare_sizes(host) == {GIB}, timeout=30, what="the spare disk")
            # Asked for once (a container since deleted, a size changed): nobody placed here has it.
            assert oci_runtime(host).prepare_spare_disk(3 * GIB)
            assert spare_sizes(host) == {GIB, 3 * GIB}

            with host_agent(host, None, resynced=True, **joined):
                assert spare_sizes(host) == {GIB}  # the running container's size stays ready
                workload = workload_in("spare", {"running"})
                deleted = client_for(world, "mia").delete(f"/api/v1/workloads/{workload.pk}/")
                assert finished(deleted.json()["id"]).state == "succeeded"
                assert spare_sizes(host) == {GIB}  # a delete keeps it: the next create wants it
                removed = client_for(world, "oscar").delete(f"/api/v1/hosts/{host.pk}/")
                assert removed.status_code == 200, removed.json()

                # Its next heartbeat is refused: no create will come again.
                wait_until(lambda: not spare_sizes(host), timeout=30, what="the spare disks to go")
    finally:
        cleanup_host(host)
        import shutil

        shutil.rmtree(host_store, ignore_errors=True)
