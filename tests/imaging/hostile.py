"""A corpus of hostile layer archives, each built by code.

Every case is a tar stream an attacker could put in an image, built from raw 512-byte headers so
that nothing (Python's tarfile included) sanitises it on the way. A case says what the store must
do with it: refuse it with ``UnsafeEntry(path, reason)``, refuse it with ``LimitExceeded``, or
accept it with the dangerous part neutralised (checked by ``verify``).

Cases that aim at the host get the path of a *canary* directory outside the store: a correct store
never touches it.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 512

# --- raw tar construction ----------------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def header(
    name: bytes | str,
    kind: bytes = b"0",
    size: int = 0,
    *,
    mode: int = 0o644,
    linkname: bytes | str = b"",
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_700_000_000,
    devmajor: int = 0,
    devminor: int = 0,
) -> bytes:
    """One ustar header block with a correct checksum; names are written verbatim."""
    name_b = name.encode() if isinstance(name, str) else name
    link_b = linkname.encode() if isinstance(linkname, str) else linkname
    h = bytearray(BLOCK)
    h[0 : min(len(name_b), 100)] = name_b[:100]
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(uid, 8)
    h[116:124] = _octal(gid, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = kind
    h[157 : 157 + min(len(link_b), 100)] = link_b[:100]
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[329:337] = _octal(devmajor, 8)
    h[337:345] = _octal(devminor, 8)
    h[148:156] = f"{sum(h):06o}".encode() + b"\0 "
    return bytes(h)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def member(name: bytes | str, data: bytes = b"", kind: bytes = b"0", **kw: Any) -> bytes:
    """A header plus its padded data."""
    return header(name, kind, len(data), **kw) + _pad(data)


def directory(name: str, mode: int = 0o755, **kw: Any) -> bytes:
    return member(name if name.endswith("/") else name + "/", kind=b"5", mode=mode, **kw)


def symlink(name: str, target: str | bytes, **kw: Any) -> bytes:
    return member(name, kind=b"2", linkname=target, mode=0o777, **kw)


def hardlink(name: str, target: str | bytes, **kw: Any) -> bytes:
    return member(name, kind=b"1", linkname=target, **kw)


def pax_record(key: str, value: bytes | str) -> bytes:
    """One PAX record "<len> <key>=<value>\\n"; the length counts itself."""
    v = value.encode() if isinstance(value, str) else value
    body = b" " + key.encode() + b"=" + v + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def pax(records: dict[str, bytes | str], *, announced_size: int | None = None) -> bytes:
    """A PAX extended header ('x') for the next member."""
    data = b"".join(pax_record(k, v) for k, v in records.items())
    size = len(data) if announced_size is None else announced_size
    return header("././@PaxHeader", b"x", size) + _pad(data)


def gnu_long(kind: bytes, value: bytes | str, *, announced_size: int | None = None) -> bytes:
    """A GNU long name ('L') or long link ('K') record for the next member."""
    v = (value.encode() if isinstance(value, str) else value) + b"\0"
    size = len(v) if announced_size is None else announced_size
    return header("././@LongLink", kind, size) + _pad(v)


def archive(*parts: bytes) -> bytes:
    """Concatenates members and adds the end-of-archive marker."""
    return b"".join(parts) + b"\0" * (2 * BLOCK)


# --- the corpus --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One hostile archive and what the store must do with it.

    ``expect`` is "unsafe" (UnsafeEntry with ``path``/``reason``), "limit" (LimitExceeded) or
    "neutralised" (accepted; ``verify(layer_fs)`` checks the danger is gone).
    ``store_kw`` are Store options the case needs (small limits keep bombs cheap).
    """

    name: str
    build: Callable[[Path], bytes]
    expect: str
    path: str | Callable[[Path], str] | None = None
    reason: str | None = None
    verify: Callable[[Path], None] | None = None
    store_kw: dict[str, int] = field(default_factory=dict)
    compress: str = "none"


def _unsafe(
    name: str, build: Callable[[Path], bytes], path: str | Callable[[Path], str], reason: str
) -> Case:
    return Case(name=name, build=build, expect="unsafe", path=path, reason=reason)


def expected_path(case: Case, canary: Path) -> str | None:
    """The path an UnsafeEntry must name (some depend on where the canary lives)."""
    return case.path(canary) if callable(case.path) else case.path


def _absent(rel: str) -> Callable[[Path], None]:
    def verify(fs: Path) -> None:
        assert not os.path.lexists(fs / rel), f"{rel} was materialised"

    return verify


def _mode_of(rel: str, want: int) -> Callable[[Path], None]:
    def check(fs: Path) -> None:
        got = (fs / rel).lstat().st_mode & 0o7777
        assert got == want, f"{rel}: mode {got:o}, expected {want:o}"

    return check


def _no_xattr(rel: str, key: str) -> Callable[[Path], None]:
    def check(fs: Path) -> None:
        import os

        assert key not in os.listxattr(fs / rel, follow_symlinks=False), f"{key} survived on {rel}"

    return check


def _zeros_gzip(n: int) -> bytes:
    return gzip.compress(archive(member("zeros", b"\0" * n)), compresslevel=1)


FILE = member("etc/file", b"data\n")

CASES: list[Case] = [
    # Names that leave the root.
    _unsafe("absolute-name", lambda c: archive(member("/etc/evil", b"x")), "/etc/evil", "absolute path"),
    _unsafe(
        "absolute-name-into-canary",
        lambda c: archive(member(str(c / "pwned"), b"x")),
        lambda c: str(c / "pwned"),
        "absolute path",
    ),
    _unsafe("dotdot", lambda c: archive(member("../pwned", b"x")), "../pwned", "parent directory component"),
    _unsafe(
        "dotdot-deep",
        lambda c: archive(member("a/b/../../../pwned", b"x")),
        "a/b/../../../pwned",
        "parent directory component",
    ),
    _unsafe("dotdot-dir", lambda c: archive(directory("a/..")), "a/../", "parent directory component"),
    _unsafe(
        "dotdot-after-dot",
        lambda c: archive(member("./../pwned", b"x")),
        "./../pwned",
        "parent directory component",
    ),
    _unsafe(
        "nul-in-name",
        lambda c: archive(pax({"path": b"ok\0../../pwned"}), member("ok", b"x")),
        "ok\0../../pwned",
        "name contains a NUL byte",
    ),
    # Symlinks used as a way out.
    _unsafe(
        "symlink-then-write",
        lambda c: archive(symlink("evil", str(c)), member("evil/pwned", b"x")),
        "evil/pwned",
        "path traverses a symlink",
    ),
    _unsafe(
        "relative-symlink-then-write",
        lambda c: archive(symlink("evil", "../" * 12 + str(c).lstrip("/")), member("evil/pwned", b"x")),
        "evil/pwned",
        "path traverses a symlink",
    ),
    _unsafe(
        "nested-symlink-then-write",
        lambda c: archive(directory("a"), symlink("a/b", str(c)), member("a/b/c/d", b"x")),
        "a/b/c/d",
        "path traverses a symlink",
    ),
    _unsafe(
        "symlink-then-mkdir",
        lambda c: archive(symlink("evil", str(c)), directory("evil/sub")),
        "evil/sub/",
        "path traverses a symlink",
    ),
    _unsafe(
        "symlink-then-symlink-through",
        lambda c: archive(symlink("evil", str(c)), symlink("evil/planted", "/bin/sh")),
        "evil/planted",
        "path traverses a symlink",
    ),
    _unsafe(
        "symlink-then-hardlink-through",
        lambda c: archive(FILE, symlink("evil", str(c)), hardlink("evil/pwned", "etc/file")),
        "evil/pwned",
        "path traverses a symlink",
    ),
    _unsafe(
        "file-replaced-by-symlink-then-write",
        lambda c: archive(member("a", b"x"), symlink("a", str(c)), member("a/pwned", b"x")),
        "a/pwned",
        "path traverses a symlink",
    ),
    # A cached directory descriptor must not outlive the directory it names.
    _unsafe(
        "empty-dir-replaced-by-symlink-then-write",
        lambda c: archive(directory("d"), symlink("d", str(c)), member("d/pwned", b"x")),
        "d/pwned",
        "path traverses a symlink",
    ),
    _unsafe(
        "nonempty-dir-replaced-by-symlink",
        lambda c: archive(directory("d"), member("d/f", b"x"), symlink("d", str(c))),
        "d",
        "replaces a non-empty directory",
    ),
    _unsafe(
        "write-under-a-file",
        lambda c: archive(member("f", b"x"), member("f/g", b"y")),
        "f/g",
        "path traverses a non-directory",
    ),
    # Hard links out of the layer.
    _unsafe(
        "hardlink-absolute",
        lambda c: archive(hardlink("l", "/etc/passwd")),
        "l",
        "hard link target: absolute path",
    ),
    _unsafe(
        "hardlink-into-canary",
        lambda c: archive(hardlink("l", str(c / "victim"))),
        "l",
        "hard link target: absolute path",
    ),
    _unsafe(
        "hardlink-dotdot",
        lambda c: archive(hardlink("l", "../../../etc/shadow")),
        "l",
        "hard link target: parent directory component",
    ),
    _unsafe(
        "hardlink-missing-target",
        lambda c: archive(hardlink("l", "not/here")),
        "l",
        "hard link target does not exist in the layer",
    ),
    _unsafe(
        "hardlink-through-symlink",
        lambda c: archive(symlink("s", str(c)), hardlink("l", "s/victim")),
        "l",
        "hard link target: path traverses a symlink",
    ),
    _unsafe(
        "hardlink-to-directory",
        lambda c: archive(directory("d"), hardlink("l", "d")),
        "l",
        "hard link to a directory",
    ),
    # Whiteouts aimed at parents or through symlinks.
    _unsafe(
        "whiteout-dotdot", lambda c: archive(member("a/.wh...")), "a/.wh...", "whiteout of an invalid name"
    ),
    _unsafe("whiteout-dot", lambda c: archive(member("a/.wh..")), "a/.wh..", "whiteout of an invalid name"),
    _unsafe(
        "whiteout-in-parent",
        lambda c: archive(member("../.wh.victim")),
        "../.wh.victim",
        "parent directory component",
    ),
    _unsafe(
        "whiteout-through-symlink",
        lambda c: archive(symlink("s", str(c)), member("s/.wh.victim")),
        "s/.wh.victim",
        "path traverses a symlink",
    ),
    _unsafe(
        "opaque-through-symlink",
        lambda c: archive(symlink("s", str(c)), member("s/.wh..wh..opq")),
        "s/.wh..wh..opq",
        "path traverses a symlink",
    ),
    # Long-name records smuggling paths past a harmless-looking header.
    _unsafe(
        "pax-path-dotdot",
        lambda c: archive(pax({"path": "../../pwned"}), member("innocent", b"x")),
        "../../pwned",
        "parent directory component",
    ),
    _unsafe(
        "pax-path-absolute",
        lambda c: archive(pax({"path": str(c / "pwned")}), member("innocent", b"x")),
        lambda c: str(c / "pwned"),
        "absolute path",
    ),
    _unsafe(
        "gnu-longname-dotdot",
        lambda c: archive(gnu_long(b"L", "a/" * 60 + "../" * 70 + "pwned"), member("innocent", b"x")),
        "a/" * 60 + "../" * 70 + "pwned",
        "parent directory component",
    ),
    _unsafe(
        "gnu-longlink-hardlink-out",
        lambda c: archive(gnu_long(b"K", "x/" * 60 + "../" * 80 + "etc/shadow"), hardlink("l", "innocent")),
        "l",
        "hard link target: parent directory component",
    ),
    _unsafe(
        "pax-linkpath-symlink-then-write",
        lambda c: archive(pax({"linkpath": str(c)}), symlink("evil", "harmless"), member("evil/pwned", b"x")),
        "evil/pwned",
        "path traverses a symlink",
    ),
    _unsafe(
        "pax-size-disagrees",
        lambda c: archive(pax({"size": "0"}), member("f", b"A" * 1024), member("g", b"x")),
        "f",
        "PAX size disagrees with the header",
    ),
    _unsafe(
        "longname-and-pax-path",
        lambda c: archive(gnu_long(b"L", "one"), pax({"path": "two"}), member("three", b"x")),
        "two",
        "both a GNU long name and a PAX path",
    ),
    _unsafe(
        "dangling-extension-header",
        lambda c: archive(member("ok", b"x"), pax({"path": "x"})),
        "?",
        "extension header without a following entry",
    ),
    _unsafe(
        "uid-out-of-range",
        lambda c: archive(pax({"uid": "99999999999"}), member("f", b"x")),
        "f",
        "uid out of range",
    ),
    # Overlayfs markers smuggled as xattrs.
    _unsafe(
        "overlay-redirect-xattr",
        lambda c: archive(pax({"SCHILY.xattr.trusted.overlay.redirect": str(c)}), directory("d")),
        "d/",
        "overlayfs xattr trusted.overlay.redirect in layer",
    ),
    _unsafe(
        "overlay-opaque-xattr",
        lambda c: archive(pax({"SCHILY.xattr.trusted.overlay.opaque": "y"}), directory("d")),
        "d/",
        "overlayfs xattr trusted.overlay.opaque in layer",
    ),
    _unsafe(
        "overlay-userxattr-metacopy",
        lambda c: archive(pax({"SCHILY.xattr.user.overlay.metacopy": ""}), member("f", b"x")),
        "f",
        "overlayfs xattr user.overlay.metacopy in layer",
    ),
    # Device nodes and FIFOs are left out of the layer (the runtimes supply /dev), not refused.
    Case(
        "char-device-mem",
        lambda c: archive(member("dev/mem", kind=b"3", devmajor=1, devminor=1)),
        "neutralised",
        verify=_absent("dev/mem"),
    ),
    Case(
        "block-device-disk",
        lambda c: archive(member("dev/sda", kind=b"4", devmajor=8, devminor=0)),
        "neutralised",
        verify=_absent("dev/sda"),
    ),
    Case("fifo", lambda c: archive(member("run/pipe", kind=b"6")), "neutralised", verify=_absent("run/pipe")),
    Case(
        "device-named-to-forge-meta-lines",
        lambda c: archive(member("dev/x\nsize=1", kind=b"3", devmajor=1, devminor=3)),
        "neutralised",
        verify=_absent("dev/x\nsize=1"),
    ),
    _unsafe(
        "gnu-sparse",
        lambda c: archive(member("sparse", kind=b"S")),
        "sparse",
        "sparse files are not supported",
    ),
    _unsafe(
        "pax-sparse",
        lambda c: archive(pax({"GNU.sparse.major": "1"}), member("sparse", b"")),
        "sparse",
        "sparse files are not supported",
    ),
    _unsafe(
        "volume-header", lambda c: archive(member("label", kind=b"V")), "label", "unsupported entry type 'V'"
    ),
    _unsafe(
        "root-as-file", lambda c: archive(member(".", b"x")), ".", "non-directory entry for the layer root"
    ),
    # Privilege bits: neutralised, not refused (see imaging/store.py).
    Case(
        "setuid-root-shell",
        lambda c: archive(member("bin/sh", b"#!", mode=0o4755)),
        "neutralised",
        verify=_mode_of("bin/sh", 0o755),
    ),
    Case(
        "setgid-file",
        lambda c: archive(member("bin/x", b"#!", mode=0o2755, gid=42)),
        "neutralised",
        verify=_mode_of("bin/x", 0o755),
    ),
    Case(
        "setuid-via-hardlink",
        lambda c: archive(member("a", b"#!", mode=0o6755), hardlink("b", "a")),
        "neutralised",
        verify=_mode_of("b", 0o755),
    ),
    Case(
        "file-capability",
        lambda c: archive(
            pax({"SCHILY.xattr.security.capability": b"\x01\x00\x00\x02\xff\xff\xff\xff"}),
            member("bin/ping", b"x", mode=0o755),
        ),
        "neutralised",
        verify=_no_xattr("bin/ping", "security.capability"),
    ),
    Case(
        "trusted-xattr-dropped",
        lambda c: archive(pax({"SCHILY.xattr.trusted.evil": "1"}), member("f", b"x")),
        "neutralised",
        verify=_no_xattr("f", "trusted.evil"),
    ),
    # Bombs: size, count, names, depth, ratio, header memory.
    Case(
        "entry-count-bomb",
        lambda c: archive(*(member(f"f{i}") for i in range(200))),
        "limit",
        store_kw={"max_entries": 100},
    ),
    Case(
        "size-bomb",
        lambda c: archive(member("big", b"\0" * (3 << 20))),
        "limit",
        store_kw={"max_layer_bytes": 1 << 20},
    ),
    Case("name-length-bomb", lambda c: archive(pax({"path": "a/" * 3000 + "f"}), member("f", b"x")), "limit"),
    Case("component-length-bomb", lambda c: archive(pax({"path": "x" * 300}), member("f", b"x")), "limit"),
    Case("depth-bomb", lambda c: archive(pax({"path": "d/" * 300 + "f"}), member("f", b"x")), "limit"),
    Case("symlink-target-bomb", lambda c: archive(pax({"linkpath": "t" * 5000}), symlink("s", "x")), "limit"),
    Case(
        "longname-memory-bomb", lambda c: archive(gnu_long(b"L", "x", announced_size=(1 << 33) - 1)), "limit"
    ),
    Case("pax-memory-bomb", lambda c: archive(pax({"path": "x"}, announced_size=(1 << 32))), "limit"),
    Case(
        "gzip-ratio-bomb",
        lambda c: _zeros_gzip(80 << 20),
        "limit",
        store_kw={"max_ratio": 100},
        compress="raw",
    ),
    Case(
        "zstd-ratio-bomb",
        lambda c: archive(member("zeros", b"\0" * (80 << 20))),
        "limit",
        store_kw={"max_ratio": 100},
        compress="zstd",
    ),
]

CASE_IDS = [c.name for c in CASES]
