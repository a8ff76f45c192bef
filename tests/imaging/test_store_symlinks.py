"""Layers that write through a symlinked directory of the layers below land where containerd and Docker
put them: at the link's target, resolved inside the image root, never outside the store."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from imaging.store import LayerSpec, LayerStore, UnsafeEntry

try:
    from tests.imaging import hostile
    from tests.imaging.test_store_hostile import snapshot
except ImportError:  # collected without the tests package on sys.path
    import hostile  # type: ignore[no-redef]
    from test_store_hostile import snapshot  # type: ignore[no-redef]

# Tar streams from docker/containerd often carry no entry for a file's parent directories:
# `cur/file` alone makes `cur` an implicit directory of its layer.
RELATIVE = [
    hostile.archive(
        hostile.directory("versions/"),
        hostile.directory("versions/1/"),
        hostile.member("versions/1/old", b"old\n"),
        hostile.symlink("cur", "versions/1"),
    ),
    hostile.archive(hostile.member("cur/file", b"written through cur\n")),
]
ABSOLUTE = [
    hostile.archive(hostile.symlink("lib", "/opt/x")),
    hostile.archive(hostile.member("lib/y", b"why\n")),
]


def unpack(store: LayerStore, *tars: bytes) -> list[str]:
    specs = [LayerSpec(store.ingest_bytes(tar)[0]) for tar in tars]
    return [r.diff_id for r in store.unpack_layers(specs)]


def disk_tree(store: LayerStore, diff_ids: list[str], out: Path) -> Path:
    """The micro-VM root disk of the chain, extracted by erofs-utils' own tool."""
    disk = store.build_disk(diff_ids, fs="erofs")
    subprocess.run(["fsck.erofs", f"--extract={out}", str(disk)], check=True, capture_output=True)
    return out


def variants(store_root: Path) -> list[str]:
    return sorted(p.name for p in (store_root / "layers" / "chains").iterdir())


def test_it_puts_a_file_written_through_a_relative_symlinked_dir_at_the_links_target(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    base, top = unpack(store, *RELATIVE)
    lower = store.lower_dirs([base, top])
    assert lower[0] == store.layer_path(base)
    # The top layer's tree is shared by every image holding it: it stays as unpacked, and the
    # chain gets a variant of it with the file at the target and no directory shadowing `cur`.
    assert (store.layer_path(top) / "cur" / "file").is_file()
    assert lower[1] != store.layer_path(top)
    assert not (lower[1] / "cur").exists()
    assert (lower[1] / "versions/1/file").read_bytes() == b"written through cur\n"
    assert (lower[1] / "versions/1/file").stat().st_ino == (store.layer_path(top) / "cur/file").stat().st_ino

    image = disk_tree(store, [base, top], tmp_path / "disk")
    assert os.readlink(image / "cur") == "versions/1"
    assert (image / "versions/1/file").read_bytes() == b"written through cur\n"
    assert (image / "versions/1/old").read_bytes() == b"old\n"
    assert (image / "cur").is_symlink()


def test_it_resolves_an_absolute_symlinked_dir_inside_the_image_root(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    base, top = unpack(store, *ABSOLUTE)
    image = disk_tree(store, [base, top], tmp_path / "disk")
    assert os.readlink(image / "lib") == "/opt/x"
    assert (image / "opt/x/y").read_bytes() == b"why\n"
    assert (image / "lib").is_symlink()


def test_a_layer_alone_or_on_plain_dirs_is_used_as_it_is(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    plain = hostile.archive(hostile.directory("usr/"), hostile.directory("usr/bin/"))
    base, top = unpack(store, plain, hostile.archive(hostile.member("usr/bin/tool", b"t")))
    assert store.lower_dirs([base, top]) == [store.layer_path(base), store.layer_path(top)]
    # The same top layer on a base with the symlink gets a variant for that chain only.
    [linked_base] = unpack(store, hostile.archive(hostile.symlink("usr", "opt")))
    assert store.lower_dirs([linked_base, top])[1] != store.layer_path(top)
    assert store.lower_dirs([base, top])[1] == store.layer_path(top)
    assert len(variants(tmp_path / "store")) == 1


def test_a_directory_entry_replaces_the_symlink_as_the_appliers_do(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    base, top = unpack(
        store,
        RELATIVE[0],
        hostile.archive(hostile.directory("cur/"), hostile.member("cur/file", b"own dir\n")),
    )
    assert store.lower_dirs([base, top])[1] == store.layer_path(top)
    image = disk_tree(store, [base, top], tmp_path / "disk")
    assert not (image / "cur").is_symlink()
    assert (image / "cur/file").read_bytes() == b"own dir\n"
    assert not (image / "versions/1/file").exists()


# --- hostile chains ------------------------------------------------------------------------------


def link(name: str, target: str) -> bytes:
    """A symlink entry; a target past the ustar header's 100 bytes goes in a GNU long link record."""
    if len(target) < 100:
        return hostile.symlink(name, target)
    return hostile.gnu_long(b"K", target) + hostile.symlink(name, "")


def escape_chains(canary: Path) -> dict[str, tuple[list[bytes], str]]:
    """Lower-layer links an attacker would try, and where inside the image the write must land."""
    up = "../" * 12
    return {
        "dotdot": ([link("evil", up + str(canary).lstrip("/"))], str(canary).lstrip("/")),
        "absolute-host-path": ([link("evil", str(canary))], str(canary).lstrip("/")),
        "absolute-dotdot": ([link("evil", "/../../../etc")], "etc"),
        "proc-root": (
            [link("evil", "/proc/self/root" + str(canary))],
            "proc/self/root" + str(canary),
        ),
        "link-to-link": (
            [
                link("evil", "hop1/"),
                link("hop1", "./hop2"),
                link("hop2", up + str(canary).lstrip("/")),
            ],
            str(canary).lstrip("/"),
        ),
        # `..` after a link applies to where the link led (as the kernel resolves it), still inside.
        "dotdot-after-link": (
            [link("evil", "hop/../../../x"), link("hop", "/a/b")],
            "x",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["dotdot", "absolute-host-path", "absolute-dotdot", "proc-root", "link-to-link", "dotdot-after-link"],
)
def test_hostile_links_keep_the_write_inside_the_image(case: str, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "victim").write_text("must survive\n")
    before = snapshot(canary)
    links, lands = escape_chains(canary)[case]
    store = LayerStore(tmp_path / "store")
    base, top = unpack(
        store,
        hostile.archive(*links),
        hostile.archive(hostile.member("evil/pwned", b"x"), hostile.member("evil/victim", b"overwritten")),
    )
    store.lower_dirs([base, top])
    image = disk_tree(store, [base, top], tmp_path / "disk")
    assert (image / lands / "pwned").read_bytes() == b"x"
    assert snapshot(canary) == before, "the canary outside the store changed"
    for found in tmp_path.rglob("pwned"):
        assert found.is_relative_to(tmp_path / "store") or found.is_relative_to(tmp_path / "disk"), found


@pytest.mark.parametrize(
    ("links", "reason"),
    [
        ([hostile.symlink("a", "b"), hostile.symlink("b", "a")], "path resolves through too many symlinks"),
        ([hostile.symlink("a", "a/deeper")], "path resolves through too many symlinks"),
        ([hostile.symlink("a", "/../a")], "path resolves through too many symlinks"),
        (
            [hostile.member("file", b"f"), hostile.symlink("a", "file")],
            "path resolves through a non-directory of a lower layer",
        ),
    ],
    ids=["two-link-loop", "self-descending", "absolute-self", "through-a-file"],
)
def test_links_that_loop_or_lead_through_a_file_are_refused_and_leave_nothing(
    links: list[bytes], reason: str, tmp_path: Path
) -> None:
    store = LayerStore(tmp_path / "store")
    base, top = unpack(store, hostile.archive(*links), hostile.archive(hostile.member("a/x/pwned", b"x")))
    for attempt in (lambda: store.lower_dirs([base, top]), lambda: store.build_disk([base, top])):
        with pytest.raises(UnsafeEntry) as err:
            attempt()
        assert (err.value.path, err.value.reason) == ("a", reason)
    assert variants(tmp_path / "store") == []
    assert list((tmp_path / "store" / "disks").iterdir()) == []


def test_a_variant_is_collected_with_its_layers(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    base, top = unpack(store, *RELATIVE)
    store.lower_dirs([base, top])
    store.gc(keep_layers=[base, top])
    assert len(variants(tmp_path / "store")) == 1
    store.gc(keep_layers=[top])
    assert variants(tmp_path / "store") == []
