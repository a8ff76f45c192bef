"""Starting a created runc container by its exec fifo (what `runc start` does, without its exec): the
process runs, runc itself then calls it running, and a container whose init is gone is not reported
started by this path."""
# ruff: noqa: F811  (the driver's fixtures are imported from its test module and used as arguments)

from __future__ import annotations

import json
import os
import signal
import subprocess

from compute.runtimes.oci import EXEC_FIFO, OciRuntime
from tests.compute.test_oci_runtime import (  # noqa: F401  (fixtures)
    image_layers,
    new_id,
    pytestmark,
    remove_test_cgroup_parent,
    runtime,
    spec_for,
    state_dir,
)


def runc_status(runtime: OciRuntime, container_id: str) -> str:
    root = f"--root={runtime._runtime_root}"
    out = subprocess.run([runtime.binary, root, "state", container_id], capture_output=True, check=True)
    return str(json.loads(out.stdout)["status"])


def test_it_starts_a_created_container_through_its_exec_fifo_and_runc_sees_it_running(
    runtime: OciRuntime, image_layers, new_id
):
    spec = spec_for(new_id(), image_layers, "sh", "-c", "echo started; sleep 30")
    runtime.create(spec)
    assert runc_status(runtime, spec.container_id) == "created"

    assert runtime._start_by_exec_fifo(spec.container_id) is True

    assert not (runtime._runtime_root / spec.container_id / EXEC_FIFO).exists()
    assert runc_status(runtime, spec.container_id) == "running"
    assert runtime.state(spec.container_id).status == "running"
    assert runtime.wait_exit(spec.container_id, 0.5) is None  # it runs on


def test_it_does_not_call_started_a_container_whose_init_died(runtime: OciRuntime, image_layers, new_id):
    spec = spec_for(new_id(), image_layers, "true")
    runtime.create(spec)
    init = runtime.state(spec.container_id).pid
    assert init is not None
    os.kill(init, signal.SIGKILL)

    assert runtime._start_by_exec_fifo(spec.container_id) is False


def test_it_creates_and_starts_a_container_from_a_process_holding_more_than_1024_descriptors(
    runtime: OciRuntime, image_layers, new_id
):
    """A busy agent (or the portal's own host) holds many sockets and files: conmon's answer is awaited
    with poll(), not select(), which refuses any descriptor past FD_SETSIZE."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        spec = spec_for(new_id(), image_layers, "sh", "-c", "sleep 30")
        runtime.run(spec)
        assert runtime.state(spec.container_id).status == "running"
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
