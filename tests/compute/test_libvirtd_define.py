"""The product's libvirtd defines domains in well under a second, also where /dev/kvm exists but KVM
does not work (as on the build machines): no QEMU capability re-probe per define (issue 19)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from compute.runtimes import libvirtd

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("libvirtd") is None, reason="needs root and libvirtd"
)


def minimal_domain(name: str) -> str:
    domain = ET.Element("domain", type="qemu")
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="MiB").text = "64"
    ET.SubElement(domain, "vcpu").text = "1"
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch="x86_64", machine="q35").text = "hvm"
    return ET.tostring(domain, encoding="unicode")


def test_it_defines_a_domain_twice_in_a_row_in_seconds_not_half_a_minute() -> None:
    import libvirt

    libvirtd.ensure_libvirtd()
    if libvirtd.KVM_DEVICE.exists() and not libvirtd.kvm_works_cached():
        assert libvirtd.libvirtd_sees_kvm() is False  # masked: no /dev/kvm at all in its namespace
    connection = libvirt.open(libvirtd.LIBVIRT_URI)
    name = f"bht-define-{uuid.uuid4().hex[:8]}"
    try:
        for _ in range(2):
            started = time.monotonic()
            domain = connection.defineXML(minimal_domain(name))
            elapsed = time.monotonic() - started
            domain.undefine()
            assert elapsed < 5, f"define took {elapsed:.1f} s: libvirt re-probes QEMU on every define"
    finally:
        connection.close()


def test_it_covers_kvm_for_a_masked_libvirtd_with_a_node_its_qemu_user_cannot_open(tmp_path: Path) -> None:
    checker = tmp_path / "check-dev"
    checker.write_text(
        "#!/bin/sh\n"
        "[ -c /dev/kvm ] || exit 11\n"
        '[ "$(stat -c %a:%t:%T /dev/kvm)" = 600:1:3 ] || exit 12\n'
        "[ -c /dev/null ] && [ -c /dev/net/tun ] || exit 13\n"
    )
    checker.chmod(0o755)
    mask = tmp_path / "kvm-mask"
    os.mknod(mask, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         libvirtd._MASKED_LIBVIRTD_SCRIPT, str(checker), str(mask)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert not Path("/dev/kvm").exists() or Path("/dev/kvm").is_char_device()  # the host's is untouched


def test_it_masks_kvm_only_where_the_device_exists_and_kvm_does_not_work(tmp_path: Path) -> None:
    probed: list[bool] = []

    def probe(answer: bool) -> Any:
        def kvm_works() -> bool:
            probed.append(answer)
            return answer

        return kvm_works

    missing = tmp_path / "no-kvm"  # a machine without /dev/kvm: started plainly, nothing probed
    assert libvirtd.wants_kvm_mask(missing, probe(False)) is False and probed == []
    present = tmp_path / "kvm"
    present.touch()
    assert libvirtd.wants_kvm_mask(present, probe(False)) is True  # this machine: present, not working
    assert libvirtd.wants_kvm_mask(present, probe(True)) is False  # working KVM: domains use it
