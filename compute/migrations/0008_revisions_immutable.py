"""The database itself refuses to change a stored revision (``DesiredRevision.save`` refuses first).

A ``QuerySet.update()`` or raw SQL bypasses ``save``; a trigger does not. Deleting stays possible: a
tenant's revisions go with the tenant.
"""

from typing import Any

from django.db import migrations

POSTGRESQL = """
CREATE OR REPLACE FUNCTION bulkhead_revision_immutable() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'desired-state revisions are immutable';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER compute_desiredrevision_immutable
    BEFORE UPDATE ON compute_desiredrevision
    FOR EACH ROW EXECUTE FUNCTION bulkhead_revision_immutable();
"""
SQLITE = """
CREATE TRIGGER compute_desiredrevision_immutable
    BEFORE UPDATE ON compute_desiredrevision
BEGIN
    SELECT RAISE(ABORT, 'desired-state revisions are immutable');
END;
"""
DROP_POSTGRESQL = """
DROP TRIGGER IF EXISTS compute_desiredrevision_immutable ON compute_desiredrevision;
DROP FUNCTION IF EXISTS bulkhead_revision_immutable();
"""
DROP_SQLITE = "DROP TRIGGER IF EXISTS compute_desiredrevision_immutable;"


def forwards(apps: Any, schema_editor: Any) -> None:
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(POSTGRESQL)
    elif vendor == "sqlite":
        schema_editor.execute(SQLITE)


def backwards(apps: Any, schema_editor: Any) -> None:
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(DROP_POSTGRESQL)
    elif vendor == "sqlite":
        schema_editor.execute(DROP_SQLITE)


class Migration(migrations.Migration):
    dependencies = [("compute", "0007_plan_resume")]
    operations = [migrations.RunPython(forwards, backwards)]
