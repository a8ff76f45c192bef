"""The OCI distribution-spec conformance suite (the project's own Go test binary, built from the pinned
tests/conformance/go.sum by scripts/build-conformance.sh) against the built-in registry at /v2/.

Pull is tested read-only, with an image imported into a tenant beforehand (the suite's `OCI_RO_DATA`
mode); push, delete and discovery are tested by the suite's own content when the registry accepts pushes.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import World
from tests.imaging.images import busybox_layers
from tests.imaging.test_registry_server import imported, registry, token_of

__all__ = ["registry"]

pytestmark = pytest.mark.django_db(transaction=True)

BASE_DIR = Path(__file__).resolve().parents[2]
SUITE = BASE_DIR / "var" / "conformance" / "conformance.test"


RESULT_LINE = re.compile(r"^(?P<indent> *)(?P<name>OCI Conformance Test[^:]*): (?P<status>\w+)$")


def run_suite(registry: str, results: Path, **settings: str) -> dict[str, list[str]]:
    """Run the suite; return its leaf tests' names by status (Pass, Fail, Error, Skip, Disabled).

    Read from the suite's printed result tree: in its read-only mode this version panics while writing
    its YAML/JUnit reports, after printing the tree.
    """
    subprocess.run([str(BASE_DIR / "scripts" / "build-conformance.sh")], check=True, timeout=600)
    (results / "oci-conformance.yaml").write_text("{}\n")  # everything from the environment
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(results),
        "OCI_REGISTRY": registry,
        "OCI_TLS": "disabled",
        "OCI_RESULTS_DIR": str(results),
        "OCI_CONFIGURATION": str(results / "oci-conformance.yaml"),
        "OCI_LOG": "warn",
        **settings,
    }
    completed = subprocess.run(
        [str(SUITE)], cwd=results, env=environment, capture_output=True, text=True, timeout=600
    )
    (results / "output.txt").write_text(completed.stdout + completed.stderr)
    lines = [m for m in map(RESULT_LINE.match, completed.stdout.splitlines()) if m]
    assert lines, completed.stdout + completed.stderr
    outcomes: dict[str, list[str]] = {}
    for index, line in enumerate(lines):
        deeper = index + 1 < len(lines) and len(lines[index + 1]["indent"]) > len(line["indent"])
        if not deeper:
            outcomes.setdefault(line["status"].capitalize(), []).append(line["name"])
    return outcomes


def passes_the_suite(world: World, registry: str, tmp_path: Path, what: str, **settings: str) -> None:
    results = tmp_path / "results"
    results.mkdir()
    user = settings.pop("user")
    outcomes = run_suite(registry, results, OCI_USERNAME=user, OCI_PASSWORD=token_of(world, user), **settings)
    print(f"conformance ({what}):", {status: len(names) for status, names in outcomes.items()})
    assert not outcomes.get("Fail") and not outcomes.get("Error"), outcomes
    assert len(outcomes["Pass"]) >= 10, outcomes


def test_it_passes_the_conformance_suites_pull_tests(world: World, registry: str, tmp_path: Path) -> None:
    image = imported(world, tmp_path, "alice", world.acme, "busybox", busybox_layers())
    blobs = [layer.digest for layer in image.layers.all()] + [image.config_digest]
    passes_the_suite(
        world,
        registry,
        tmp_path,
        "pull, read-only",
        user="mia",
        OCI_REPO1="acme/busybox",
        OCI_REPO2="acme/busybox",
        OCI_API_PUSH="false",
        OCI_API_BLOBS_DELETE="false",
        OCI_API_MANIFESTS_DELETE="false",
        OCI_API_TAGS_DELETE="false",
        OCI_API_REFERRER="false",
        OCI_RO_DATA_TAGS="1",
        OCI_RO_DATA_MANIFESTS=image.manifest_digest,
        OCI_RO_DATA_BLOBS=" ".join(blobs),
    )


def test_it_passes_the_conformance_suites_push_and_pull_tests(
    world: World, registry: str, tmp_path: Path
) -> None:
    passes_the_suite(
        world,
        registry,
        tmp_path,
        "push and pull",
        user="alice",
        OCI_REPO1="acme/conformance/one",
        OCI_REPO2="acme/conformance/two",
        # Digests are sha256 in the layer store (sha512 is optional in the spec).
        OCI_DATA_SHA512="false",
        # Layers that live on a foreign server (`urls`) are refused: an installation has no outside service.
        OCI_DATA_NONDISTRIBUTABLE="false",
    )
