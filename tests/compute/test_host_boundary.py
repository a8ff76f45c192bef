"""The host package's boundary (issue 16): code that runs on a host imports no Django, no model and no
portal service; it reaches the portal only through `compute.host.link`.

Checked twice: statically (every import statement in the package, including those inside functions) and
by importing the package in a fresh interpreter where `django` cannot be imported at all.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST_PACKAGE = ROOT / "compute" / "host"

# What host code may import from this project: itself and the Django-free low-level drivers, the guest
# builder, and two Django-free leaves every layer shares (error vocabulary, test failpoints).
ALLOWED_PROJECT_MODULES = (
    "compute.host",
    "compute.runtimes",
    "compute.network",
    "compute.guest",
    "imaging.store",
    "imaging._native",
    "portal.errors",
    "portal.failpoints",
)
PROJECT_PACKAGES = (
    "compute",
    "imaging",
    "portal",
    "tenants",
    "accounts",
    "volumes",
    "backups",
    "desired",
    "frontend",
)
FORBIDDEN_THIRD_PARTY = ("django", "rest_framework", "channels", "django_filters")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                # `from compute import agent` names a module: keep the name to judge it.
                module = f"{node.module}.{alias.name}" if node.module in PROJECT_PACKAGES else node.module
                found.append((node.lineno, module))
    return found


def is_allowed(module: str) -> bool:
    top = module.split(".")[0]
    if top in FORBIDDEN_THIRD_PARTY:
        return False
    if top not in PROJECT_PACKAGES:
        return True  # the standard library and third-party libraries a host installs
    return any(module == allowed or module.startswith(allowed + ".") for allowed in ALLOWED_PROJECT_MODULES)


def test_it_finds_a_forbidden_import_in_a_module(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import json\nfrom compute.runtimes import oci\n"
        "def f():\n    from compute import models\n    from django.conf import settings\n"
    )
    modules = [module for _, module in imported_modules(planted)]
    assert [module for module in modules if not is_allowed(module)] == ["compute.models", "django.conf"]


def test_it_keeps_every_host_module_off_django_and_the_portal() -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sorted(HOST_PACKAGE.rglob("*.py"))
        for line, module in imported_modules(path)
        if not is_allowed(module)
    ]
    assert offending == []


def test_it_imports_the_host_package_where_django_cannot_be_imported() -> None:
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in HOST_PACKAGE.rglob("*.py")
    )
    program = (
        "import sys\n"
        "class NoDjango:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('django', 'rest_framework', 'channels'):\n"
        "            raise ImportError('host code imported ' + name)\n"
        "sys.meta_path.insert(0, NoDjango())\n"
        "import importlib\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported")


# What a joined host's worker must consume: every task the portal sends to a host's queue.
HOST_TASK_NAMES = {
    "compute.create_workload",
    "compute.start_workload",
    "compute.stop_workload",
    "compute.restart_workload",
    "compute.delete_workload",
    "compute.move_workload",
    "compute.commit_workload",
    "compute.apply_host_network",
    "volumes.create_volume",
    "volumes.resize_volume",
    "volumes.delete_volume",
    "volumes.snapshot_volume",
    "volumes.restore_snapshot",
    "volumes.clone_snapshot",
    "volumes.delete_snapshot",
    "backups.run_backup",
    "backups.restore_backup",
}

# Where Django cannot be imported and neither can the portal's code, but its two Django-free leaves.
NO_DJANGO_NOR_PORTAL = (
    "import sys\n"
    "LEAVES = ('portal', 'portal.errors', 'portal.failpoints')\n"
    "class NoPortal:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        top = name.split('.')[0]\n"
    "        if top in ('django', 'rest_framework', 'channels', 'volumes', 'backups', 'tenants') or (\n"
    "            top == 'portal' and name not in LEAVES\n"
    "        ):\n"
    "            raise ImportError('host process imported ' + name)\n"
    "sys.meta_path.insert(0, NoPortal())\n"
)


def run_without_the_portal(program: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NO_DJANGO_NOR_PORTAL + program],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def test_a_hosts_worker_app_registers_every_host_task_without_django_or_the_portal() -> None:
    host_id = "5a0c62b4-9d6f-4c35-9d1e-3f1b0c1e2a77"
    result = run_without_the_portal(
        "import json\n"
        "from compute.host.worker import app\n"
        "app.loader.import_default_modules()\n"
        "conf = app.conf\n"
        "print(json.dumps({'tasks': sorted(t for t in app.tasks if not t.startswith('celery.')),\n"
        "    'broker': conf.broker_url, 'options': conf.broker_transport_options}))\n",
        BULKHEAD_HOST_ID=host_id,
        REDIS_URL="redis://h.5a0c62b49d6f4c359d1e3f1b0c1e2a77@broker.example:6379/0",
        BULKHEAD_HOST_CREDENTIAL="bhc_secret",
        BULKHEAD_PORTAL_URL="https://portal.example",
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert set(answer["tasks"]) == HOST_TASK_NAMES
    # Its own broker user with its credential as the password, every key under its own prefix.
    assert answer["broker"] == "redis://h.5a0c62b49d6f4c359d1e3f1b0c1e2a77:bhc_secret@broker.example:6379/0"
    prefix = f"h.{uuid.UUID(host_id).hex}:"
    assert answer["options"] == {"visibility_timeout": 3600, "global_keyprefix": prefix}


def test_a_hosts_worker_runs_tasks_as_the_portals_worker_does() -> None:
    """Acks, prefetch, serializers, time limits, visibility timeout: the host's own app and the portal's
    app (which runs `make run`'s local host) agree on every setting they share."""
    from compute.host import celery_settings
    from portal.celery import app as portal_app

    host_conf = celery_settings.host_worker("redis://h.x@broker/0", "h.0:")
    for name, value in celery_settings.shared().items():
        if name != "broker_transport_options":
            assert portal_app.conf[name] == value == host_conf[name], name
    assert portal_app.conf.broker_transport_options["visibility_timeout"] == 3600
    assert host_conf["broker_transport_options"]["visibility_timeout"] == 3600
    assert (portal_app.conf.task_acks_late, portal_app.conf.worker_prefetch_multiplier) == (True, 1)


def test_the_host_command_starts_without_django_or_the_portal() -> None:
    result = run_without_the_portal(
        "import runpy, sys\n"
        "sys.argv = ['compute.host', 'agent', '--help']\n"
        "try:\n"
        "    runpy.run_module('compute.host', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "sys.argv = ['compute.host', 'run', '--env-file', '/nonexistent/agent.env']\n"
        "try:\n"
        "    runpy.run_module('compute.host', run_name='__main__')\n"
        "except FileNotFoundError:\n"
        "    print('no env file')\n"
    )
    assert result.returncode == 0, result.stderr
    assert "--once" in result.stdout and result.stdout.rstrip().endswith("no env file")
