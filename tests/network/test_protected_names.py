"""The portal's protected networks when its resolver does not answer: a host's network request is
answered at once (the names it cannot resolve now are looked up in the background), and every literal
address of the portal's services and hosts is still protected. The portal's thread runs in a host
namespace whose only route leads to a gateway that never answers, so the system resolver's queries
vanish as they would behind a broken link."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from nettopo import Host as NetHost
from nettopo import _link

from compute import hosts, network_services
from compute.models import Host
from compute.network.netns import CLONE_NEWNET, iproute, netns_path
from compute.resolver import NameCache
from tenants.actors import Actor

NEEDS_HOST = True
pytestmark = pytest.mark.django_db

_LIBC = ctypes.CDLL(None, use_errno=True)
# glibc's default: two tries of 5 s each for a name no server answers.
UNANSWERED_LOOKUP_S = 10.0


@contextlib.contextmanager
def this_thread_in(netns: str) -> Iterator[None]:
    """This thread (and the threads it starts) in `netns`; its open sockets (the database's) stay
    where they are."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert _LIBC.setns(target, CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
        try:
            yield
        finally:
            assert _LIBC.setns(home, CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(home)
        os.close(target)


@pytest.fixture
def unanswered(lonely: NetHost) -> str:
    """The lonely host's namespace with a default route through a gateway that never answers."""
    with iproute(lonely.netns) as ipr:
        ipr.route("add", dst="0.0.0.0/0", gateway="198.18.7.1", oif=_link(ipr, "up0"))
    return lonely.netns


def test_it_answers_the_protected_networks_at_once_when_the_resolver_does_not(
    unanswered: str, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(network_services, "_names", NameCache())
    settings.ALLOWED_HOSTS = ["portal.bhtn-unanswered.example", "10.5.9.9"]
    settings.REDIS_URL = settings.CELERY_BROKER_URL = "redis://10.5.0.7:6379/0"
    host = hosts.register_host(
        actor=Actor.system("test"),
        name="bhtn-names",
        facts={"cpus": 1, "memory_mib": 512, "disk_gib": 1, "oci_runtimes": ["runc"]},
    )
    Host.objects.filter(pk=host.pk).update(address="10.7.0.9")
    assert Host.objects.count() >= 1  # the database connection is open before the thread moves

    with this_thread_in(unanswered):
        started = time.monotonic()
        protected = {str(n) for n in network_services.protected_networks()}
        first = time.monotonic() - started
        started = time.monotonic()
        network_services.protected_networks()
        again = time.monotonic() - started

    assert {"10.5.0.7/32", "10.5.9.9/32", "10.7.0.9/32"} <= protected
    # Waited for at most the name cache's first wait, once; the look-up itself would take ~10 s.
    assert first < UNANSWERED_LOOKUP_S / 4 and again < 0.5, (first, again)
