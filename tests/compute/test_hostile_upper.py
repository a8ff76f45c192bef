"""A container's root plays with its own files while its host reads them (commit, changes): the host
must never follow, open or wait on what the container put there. Played with real runc: a process in
the container swaps regular files and FIFOs in its root as fast as it can (renameat2 RENAME_EXCHANGE),
and the host commits the container's upper dir over and over meanwhile."""
# ruff: noqa: F811  (the driver's fixtures are imported from its test module and used as arguments)

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute.runtimes.oci import OciRuntime
from imaging.store import LayerStore
from tests.compute.test_oci_runtime import (  # noqa: F401  (fixtures)
    image_layers,
    new_id,
    pytestmark,
    remove_test_cgroup_parent,
    runtime,
    spec_for,
    state_dir,
)
from tests.processes import wait_until

FILES = 64
COMMITS = 400  # the code before waited for good within ~100 of them; this one makes 400 in a few seconds
# What a tenant's process would run: regular files in /t, FIFOs in /s, swapped pairwise for ever.
SWAPPER_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    char a[64], b[64];
    mkdir("/t", 0755);
    mkdir("/s", 0755);
    for (int i = 0; i < FILES_N; i++) {
        snprintf(a, sizeof a, "/t/f%d", i);
        int fd = open(a, O_CREAT | O_WRONLY, 0644);
        write(fd, "x", 1);
        close(fd);
        snprintf(b, sizeof b, "/s/f%d", i);
        mkfifo(b, 0644);
    }
    puts("ready");
    fflush(stdout);
    for (;;)
        for (int i = 0; i < FILES_N; i++) {
            snprintf(a, sizeof a, "/t/f%d", i);
            snprintf(b, sizeof b, "/s/f%d", i);
            syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, 2 /* RENAME_EXCHANGE */);
        }
}
""".replace("FILES_N", str(FILES))


@pytest.fixture
def swapper_layer() -> Iterator[str]:
    """An image layer holding the swapper, a static binary (the image needs no libc)."""
    directory = Path(tempfile.mkdtemp(prefix="bht-swapper-"))
    directory.chmod(0o755)
    source = directory.parent / f"{directory.name}.c"
    source.write_text(SWAPPER_C)
    try:
        subprocess.run(["gcc", "-static", "-O2", "-o", str(directory / "swapper"), str(source)], check=True)
    finally:
        source.unlink()
    yield str(directory)
    subprocess.run(["rm", "-rf", str(directory)], check=False)


def unblock(upper: Path) -> None:
    """Give a reader stuck on one of the container's FIFOs its writer (a stuck thread's only way out)."""
    for directory in (upper / "t", upper / "s"):
        for fifo in directory.glob("f*"):
            with contextlib.suppress(OSError):  # no reader on this one, or a regular file
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_it_commits_a_containers_changes_while_it_swaps_fifos_in_without_ever_waiting_on_one(
    runtime: OciRuntime, image_layers: list[str], swapper_layer: str, new_id, tmp_path: Path
) -> None:
    spec = spec_for(new_id(), [swapper_layer, *image_layers], "/swapper")
    runtime.run(spec)
    wait_until(lambda: b"ready" in runtime.read_log(spec.container_id), timeout=10, what="the swapper")
    upper = runtime.upper_dir(spec.container_id)
    mapping = runtime.id_mapping(spec.container_id)
    shift = (mapping.host_base, mapping.size) if mapping else None
    store = LayerStore(tmp_path / "store")
    committed: list[str] = []
    errors: list[BaseException] = []

    def commit_again_and_again() -> None:
        try:
            for _ in range(COMMITS):
                committed.append(store.diff_upper(upper, compression="zstd", id_shift=shift).blob_digest)
        except BaseException as error:  # the assertion below says what happened
            errors.append(error)

    host = threading.Thread(target=commit_again_and_again, daemon=True)
    started = time.monotonic()
    host.start()
    host.join(timeout=60)
    stuck = host.is_alive()
    if stuck:  # the container keeps running: its FIFOs are where the stuck thread needs a writer
        unblock(upper)
        host.join(timeout=10)
    assert not stuck, f"the host's commit waited on a FIFO of the container after {len(committed)} commits"
    assert not errors, errors
    assert len(committed) == COMMITS
    assert time.monotonic() - started < 60
