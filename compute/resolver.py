"""The IPv4 addresses of the names the portal protects (its own, its database's, its broker's, the hosts'),
looked up off the request path.

A name is looked up in a thread of its own; the caller that first asks for it waits at most a short
while (`first_wait`) and later callers not at all: with a resolver that does not answer, glibc takes
two 5 s timeouts per name, and a host's network request must not wait for that. What a name resolved
to is kept: served while it is looked up again after `ttl`, and kept when that look-up fails (a resolver
that stops answering must not take the portal's address out of what workloads may not reach).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

log = logging.getLogger(__name__)

Lookup = Callable[[str], list[IPv4Address]]


def getaddrinfo_ipv4(name: str) -> list[IPv4Address]:
    """What the system's resolver answers for `name` now (none when it fails)."""
    try:
        answers = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
        return sorted({IPv4Address(answer[4][0]) for answer in answers})
    except (OSError, UnicodeError, ValueError):
        return []


def literal_ipv4(name: str) -> IPv4Address | None:
    try:
        return IPv4Address(name)
    except ValueError:
        return None


@dataclass
class _Entry:
    addresses: list[IPv4Address] = field(default_factory=list)
    expires: float = 0.0  # when to look it up again (0: never answered yet)
    looking: threading.Event | None = None  # set when the look-up under way ends


class NameCache:
    """Names to addresses, each looked up in the background (see the module's docstring)."""

    def __init__(self, lookup: Lookup = getaddrinfo_ipv4, *, ttl: float = 300.0, first_wait: float = 1.0):
        self.lookup = lookup
        self.ttl = ttl
        self.first_wait = first_wait
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def addresses(self, names: Iterable[str]) -> dict[str, list[IPv4Address]]:
        """Each name's addresses as known now; a name never asked before is waited for (all of them
        together) at most `first_wait` seconds, and gives none if its answer is not in by then."""
        found: dict[str, list[IPv4Address]] = {}
        first: list[threading.Event] = []
        for raw in names:
            name = raw.strip().strip("[]")
            if not name or name in found:
                continue
            literal = literal_ipv4(name)
            if literal is not None:
                found[name] = [literal]
                continue
            started, new = self._look_up_if_due(name)
            if new and started is not None:
                first.append(started)
            found[name] = []
        deadline = time.monotonic() + self.first_wait
        for started in first:
            started.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for name in found:
                entry = self._entries.get(name)
                if entry is not None:
                    found[name] = list(entry.addresses)
        return found

    def ask_ahead(self, names: Iterable[str]) -> None:
        """Start looking these names up now (at start-up), so that the first request finds them."""
        for name in names:
            name = name.strip().strip("[]")
            if name and literal_ipv4(name) is None:
                self._look_up_if_due(name)

    def _look_up_if_due(self, name: str) -> tuple[threading.Event | None, bool]:
        """The look-up of `name` under way (started now if its answer is missing or old) and whether
        the name was never asked before."""
        with self._lock:
            entry = self._entries.get(name)
            new = entry is None
            if entry is None:
                entry = self._entries[name] = _Entry()
            if entry.looking is None and entry.expires <= time.monotonic():
                entry.looking = threading.Event()
                threading.Thread(
                    target=self._look_up, args=(name, entry), name=f"resolve-{name[:40]}", daemon=True
                ).start()
            return entry.looking, new

    def _look_up(self, name: str, entry: _Entry) -> None:
        addresses = self.lookup(name)
        with self._lock:
            if addresses:
                entry.addresses = addresses
            elif entry.addresses:
                log.warning("%s did not resolve now; its last addresses stay protected", name)
            entry.expires = time.monotonic() + self.ttl
            done, entry.looking = entry.looking, None
        if done is not None:
            done.set()
