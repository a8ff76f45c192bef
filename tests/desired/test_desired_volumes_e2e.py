"""A volume declared in the TenantConfig, with real parts: the `bulkhead apply -f` CLI against a live
portal, a real worker running the apply, a host agent with its btrfs pool and runc.

The db workload writes into the volume the document declares; removing the db from the document deletes
the container but keeps the volume; declaring the db again mounts the same data.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from compute.models import Host, Workload
from portal.cli import main
from tests.compute.conftest import busybox, store_dir, workload_in  # noqa: F401
from tests.compute.test_volumes_e2e import host  # noqa: F401
from tests.conftest import World, client_for
from tests.processes import celery_worker, wait_until
from volumes.models import GIB, Volume

pytestmark = pytest.mark.django_db(transaction=True)

VOLUME = """\
apiVersion: bulkhead/v1
kind: TenantConfig
spec:
  volumes:
    - name: db-data
      size_gib: 1
  workloads:
"""

DB = """\
    - name: db
      image: {image}
      command: [/bin/sh, -c, "{script}; exec sleep 300"]
      memory_mib: 64
      volumes:
        - {{volume: db-data, path: /var/lib/db}}
"""


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def logs_of(world: World, name: str) -> str:
    workload = Workload.objects.get(name=name)
    return str(client_for(world, "alice").get(f"/api/v1/workloads/{workload.pk}/logs/").json()["logs"])


def test_the_data_of_a_volume_in_the_document_outlives_its_workload_leaving_the_document(
    world: World,
    live_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    busybox: Any,  # noqa: F811
    host: Host,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("BULKHEAD_URL", live_server.url)
    monkeypatch.setenv("BULKHEAD_TOKEN", world.tokens["alice_acme"])
    monkeypatch.delenv("BULKHEAD_TENANT", raising=False)
    image = f"{busybox.name}:{busybox.tag}"
    document = tmp_path / "tenant.yaml"
    writer = VOLUME + DB.format(image=image, script="echo row-1 >> /var/lib/db/table; cat /var/lib/db/table")
    reader = VOLUME + DB.format(image=image, script="cat /var/lib/db/table")

    with celery_worker(queues="default", name="desired-volumes-e2e"):
        document.write_text(writer)
        code, output = cli("apply", "-f", str(document), "--yes", "--timeout", "240")
        assert code == 0, (output, capsys.readouterr().err)
        assert "  + volume/db-data  (create: declared, does not exist)" in output
        volume = Volume.objects.get(tenant=world.acme, name="db-data")
        assert (volume.state, volume.size_bytes, volume.host_id, volume.managed_revision) == (
            "ready",
            GIB,
            host.pk,
            1,
        )
        workload_in("db", {"running"}, timeout=120)
        wait_until(lambda: logs_of(world, "db").split() == ["row-1"], timeout=60, what="the db's first write")

        # The db leaves the document: the container goes, the volume stays (it is still declared).
        document.write_text(VOLUME.replace("  workloads:\n", "  workloads: []\n"))
        code, output = cli("apply", "-f", str(document), "--yes", "--timeout", "240")
        assert code == 0, (output, capsys.readouterr().err)
        assert "  - workload/db  (delete: managed, no longer in the document)" in output
        wait_until(lambda: not Workload.objects.filter(name="db").exists(), timeout=120, what="db deleted")
        assert Volume.objects.get(pk=volume.pk).state == "ready"

        # Back in the document: the same volume, the same data.
        document.write_text(reader)
        code, output = cli("apply", "-f", str(document), "--yes", "--timeout", "240")
        assert code == 0, (output, capsys.readouterr().err)
        workload_in("db", {"running"}, timeout=120)
        wait_until(lambda: logs_of(world, "db").split() == ["row-1"], timeout=60, what="the data read back")

        code, output = cli("apply", "-f", str(document), "--yes")
        assert (code, output.splitlines()[-1]) == (0, "No changes: the resources match the document.")
