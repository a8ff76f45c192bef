"""Managed markers move onto the rows they describe.

Published ports get ``managed_revision``/``managed_spec_hash`` like compartments and workloads, and a
workload keeps the image reference its document declared. Both used to live in
``DesiredState.image_references``; their values are carried over before that field goes.
"""

from typing import Any

from django.db import migrations, models


def carry_markers_over(apps: Any, schema_editor: Any) -> None:
    desired_state = apps.get_model("compute", "DesiredState")
    workload = apps.get_model("compute", "Workload")
    published_port = apps.get_model("compute", "PublishedPort")
    for state in desired_state.objects.exclude(image_references={}):
        for key, entry in (state.image_references or {}).items():
            if not isinstance(entry, dict):
                continue
            if key.startswith("port/"):
                published_port.objects.filter(tenant_id=state.tenant_id, pk=entry.get("id")).update(
                    managed_revision=entry.get("revision"), managed_spec_hash=entry.get("spec_hash") or ""
                )
            elif entry.get("reference"):
                workload.objects.filter(
                    tenant_id=state.tenant_id, name=key, image_id=entry.get("image_id")
                ).update(managed_image_reference=str(entry["reference"])[:400])


class Migration(migrations.Migration):
    dependencies = [
        ("compute", "0004_compartments"),
    ]

    operations = [
        migrations.AddField(
            model_name="publishedport",
            name="managed_revision",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="publishedport",
            name="managed_spec_hash",
            field=models.CharField(blank=True, max_length=64),
        ),
        migrations.AddField(
            model_name="workload",
            name="managed_image_reference",
            field=models.CharField(blank=True, max_length=400),
        ),
        migrations.RunPython(carry_markers_over, migrations.RunPython.noop),
        migrations.RemoveField(
            model_name="desiredstate",
            name="image_references",
        ),
    ]
