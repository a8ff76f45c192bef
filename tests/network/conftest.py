"""Fixtures for the network driver tests: real namespaces, swept by prefix before and after the run."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from nettopo import Host, leftovers, lonely_host, new_token, sweep

from compute.network.host_state import remove_host_network

REQUIRED_TOOLS = ("nft", "dnsmasq", "nsenter", "busybox")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    reason = None
    if os.geteuid() != 0:
        reason = "network driver tests need root (namespaces, bridges, nftables)"
    elif missing:
        reason = f"missing tools: {', '.join(missing)}"
    if reason:
        for item in items:
            # Pure-logic modules run anywhere; modules that build namespaces set NEEDS_HOST = True.
            if getattr(getattr(item, "module", None), "NEEDS_HOST", False):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def swept_machine() -> Iterator[None]:
    """Start without leftovers of an interrupted run, and leave none behind."""
    sweep()
    yield
    sweep()


@pytest.fixture
def lonely() -> Iterator[Host]:
    """A fresh host namespace with an unconnected uplink (198.18.7.2/24), removed also on failure."""
    token = new_token()
    try:
        host = lonely_host(token)
        yield host
        remove_host_network(host.netns)
    finally:
        sweep(token)
    assert leftovers(token) == []
