"""The host package's boundary (issue 16): code that runs on a host imports no Django, no model and no
portal service; it reaches the portal only through `compute.host.link`.

Checked twice: statically (every import statement in the package, including those inside functions) and
by importing the package in a fresh interpreter where `django` cannot be imported at all.
"""

from __future__ import annotations

import ast
import subprocess
import sys
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
