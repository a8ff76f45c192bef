"""A host's worker makes what its first task needs as its process starts (compute.host.startup): the
link and the host's profile, the layer store, the user namespace of the id range the first create will
get. A warm-up that fails leaves the worker as it was (its first task makes what it needs)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from compute.host import startup
from compute.host.context import host_context
from compute.runtimes import userns
from tests.compute.conftest import cleanup_host, make_host
from tests.conftest import World

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_reads_the_profile_and_makes_the_first_creates_user_namespace_at_start(
    world: World, store_dir: Path
) -> None:
    from compute.host.drivers.container import oci_runtime

    host = make_host("bht-warm")
    try:
        userns.forget_user_namespaces()
        ctx = host_context(host.pk)
        ctx.forget_profile()
        startup.warm_up(str(host.pk))
        assert ctx._profile is not None  # read now, not by the first task
        upcoming = oci_runtime(ctx).id_ranges.next_free()
        assert upcoming is not None
        assert upcoming in userns._NAMESPACES  # the first create takes it from the cache: no fork
    finally:
        userns.forget_user_namespaces()
        cleanup_host(host)


def test_it_starts_the_worker_anyway_when_the_portal_does_not_know_the_host(world: World) -> None:
    userns.forget_user_namespaces()
    stranger = str(uuid.uuid4())
    startup.warm_up(stranger)  # logged, not raised
    assert host_context(stranger)._profile is None
    assert not userns._NAMESPACES
