"""The ``bulkhead`` CLI against a live portal with an API token, a real worker running the apply."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compute.desired.models import DesiredState
from compute.models import Host, Workload
from portal.cli import main
from tests.compute.conftest import busybox, host, store_dir, workload_in  # noqa: F401
from tests.conftest import World
from tests.imaging.images import db_image
from tests.processes import celery_worker, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

DOC = """\
apiVersion: bulkhead/v1
kind: TenantConfig
spec:
  workloads:
    - name: web
      image: busybox:1
      command: [/bin/sleep, "300"]
      memory_mib: 64
"""


@pytest.fixture
def portal(world: World, live_server: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    Host.objects.create(name="db-host", cpus=64, memory_mib=65536, facts={"oci_runtimes": ["runc"]})
    db_image(world.acme, "busybox", "1")
    monkeypatch.setenv("BULKHEAD_URL", live_server.url)
    monkeypatch.setenv("BULKHEAD_TOKEN", world.tokens["alice_acme"])
    monkeypatch.delenv("BULKHEAD_TENANT", raising=False)
    yield world


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_cli_plans_applies_and_finds_nothing_left_to_do(
    portal: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = tmp_path / "tenant.yaml"
    document.write_text(DOC)
    code, output = run("plan", "-f", str(document))
    assert code == 0
    assert "  + workload/web  (create: declared, does not exist)" in output
    assert "Plan: 1 to create, 0 to update, 0 to replace, 0 to delete." in output
    assert not Workload.objects.exists()

    with celery_worker(queues="default", name="desired-cli"):
        code, output = run("apply", "-f", str(document), "-m", "first", "--yes")
    assert code == 0, capsys.readouterr().err
    assert "Revision 1 (alice (token" in output and "Applied: operation" in output
    assert Workload.objects.get(name="web").managed_revision == 1

    code, output = run("apply", "-f", str(document), "--yes")
    assert (code, output.splitlines()[-1]) == (0, "No changes: the resources match the document.")

    code, output = run("export")
    assert code == 0 and "- name: web" in output and "image: busybox:1" in output
    code, output = run("workloads", "list")
    assert code == 0 and output.startswith("web ")
    code, output = run("diff", "-f", str(document))
    assert (code, output) == (0, "No differences.\n")


def test_cli_shows_invalid_documents_with_line_numbers(
    portal: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = tmp_path / "tenant.yaml"
    document.write_text(DOC.replace("memory_mib", "memory"))
    code, _ = run("apply", "-f", str(document), "--yes")
    assert code == 1
    err = capsys.readouterr().err
    assert "line 8: spec.workloads[0].memory: unknown field 'memory'" in err
    code, _ = run("workloads", "stop", "nope")
    assert code == 1 and "no workload named 'nope'" in capsys.readouterr().err


def test_cli_runs_the_everyday_workload_commands_on_a_real_host(
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
    document = tmp_path / "tenant.yaml"
    document.write_text(
        DOC.replace('[/bin/sleep, "300"]', '[/bin/sh, -c, "echo hello-from-cli; exec sleep 300"]')
    )

    with celery_worker(queues="default", name="desired-cli-host"):
        code, _ = run("apply", "-f", str(document), "--yes")
        assert code == 0, capsys.readouterr().err
        workload_in("web", {"running"})
        wait_until(
            lambda: "hello-from-cli" in run("workloads", "logs", "web")[1], what="the workload's output"
        )

        code, output = run("workloads", "stop", "web")
        assert code == 0, capsys.readouterr().err
        assert output.splitlines()[-1].startswith("Stop web: operation ")
        assert Workload.objects.get(name="web").state == "stopped"
        code, output = run("workloads", "start", "web")
        assert code == 0, capsys.readouterr().err
        assert Workload.objects.get(name="web").state == "running"

        # A revision that changes nothing still becomes the one the reconciler keeps the tenant at.
        document.write_text("# the same resources, said again\n" + document.read_text())
        code, output = run("apply", "-f", str(document), "--yes")
        assert code == 0, capsys.readouterr().err
        assert "Revision 2" in output and "No changes" in output
    assert DesiredState.objects.get(tenant=world.acme).target_revision == 2


def test_cli_sets_a_secret_from_standard_input_and_never_prints_it(portal: World) -> None:
    from tenants.models import Secret

    code = main(["secrets", "set", "db-password"], out=io.StringIO(), stdin=io.StringIO("s3cret-value\n"))
    assert code == 0
    assert Secret.objects.get(tenant=portal.acme, name="db-password")
    code, output = run("secrets", "list")
    assert code == 0 and output.startswith("db-password") and "s3cret" not in output
    out = io.StringIO()
    assert main(["secrets", "set", "db-password"], out=out, stdin=io.StringIO("rotated\n")) == 0
    assert "Changed secret db-password" in out.getvalue()
    code, output = run("secrets", "delete", "db-password")
    assert code == 0 and not Secret.objects.exists()


def test_cli_creates_attaches_lists_and_snapshots_volumes(portal: World) -> None:
    from volumes.models import Snapshot, Volume

    code, output = run("volumes", "create", "db-data", "--size", "2", "--no-wait")
    assert code == 0, output
    volume = Volume.objects.get(tenant=portal.acme, name="db-data")
    assert volume.size_gib == 2 and volume.host.name == "db-host"
    Volume.objects.filter(pk=volume.pk).update(state="ready")  # no host agent runs here
    Workload.objects.create(
        tenant=portal.acme, name="db", image=db_image(portal.acme, "img"), host=volume.host, state="stopped"
    )
    code, output = run("volumes", "attach", "db-data", "db", "/var/lib/db")
    assert code == 0 and "Attached db-data to db at /var/lib/db" in output
    code, output = run("volumes", "list")
    assert code == 0 and output.startswith("db-data") and "db:/var/lib/db" in output and "db-host" in output
    code, output = run("volumes", "snapshot", "db-data", "nightly", "--no-wait")
    assert code == 0 and Snapshot.objects.filter(volume=volume, name="nightly").exists()
    assert run("volumes", "delete", "db-data")[0] == 1  # attached: refused
    assert run("volumes", "detach", "db-data", "db")[0] == 0
    assert run("volumes", "restore", "db-data", "no-such")[0] == 1


VOLUME_DOC = """\
apiVersion: bulkhead/v1
kind: TenantConfig
spec:
  volumes:
    - name: db-data
      size_gib: 2
      backups: {keep_last: 7}
"""


def test_cli_applies_volumes_and_says_which_it_keeps(
    portal: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from backups.models import BackupSchedule
    from volumes.models import Volume

    document = tmp_path / "tenant.yaml"
    document.write_text(VOLUME_DOC)
    with celery_worker(queues="default", name="desired-cli-volumes"):
        code, output = run("apply", "-f", str(document), "--yes")
        assert code == 0, capsys.readouterr().err
        assert "  + volume/db-data  (create: declared, does not exist)" in output
        volume = Volume.objects.get(tenant=portal.acme, name="db-data")
        assert (volume.size_gib, volume.managed_revision) == (2, 1)
        assert BackupSchedule.objects.get(volume=volume).keep_last == 7
        Volume.objects.filter(pk=volume.pk).update(state="ready")  # no host agent runs here

        document.write_text(VOLUME_DOC.split("  volumes:")[0] + "  prune: true\n")
        code, output = run("apply", "-f", str(document), "--yes")
        assert code == 0, capsys.readouterr().err
    assert (
        "  ! volume/db-data  (keep: kept: volume db-data would be deleted with all its data; "
        "set prune_volumes: true to allow it)" in output
    )
    assert "Plan: 0 to create, 0 to update, 0 to replace, 0 to delete, 1 volume kept." in output
    assert "volume/db-data: keep done kept: volume db-data" in output
    assert Volume.objects.get(pk=volume.pk).state == "ready"


def test_cli_refuses_a_document_mounting_another_tenants_volume_like_a_missing_one(
    portal: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from volumes.models import GIB, Volume

    Volume.objects.create(
        tenant=portal.globex, name="ledger", host=Host.objects.get(), size_bytes=GIB, state="ready"
    )
    document = tmp_path / "tenant.yaml"
    document.write_text(DOC + "      volumes: [{volume: ledger, path: /data}]\n")
    code, _ = run("apply", "-f", str(document), "--yes")
    assert code == 1
    assert "line 9: spec.workloads[0].volumes[0].volume: unknown volume 'ledger'" in capsys.readouterr().err
    assert not Workload.objects.exists()
