"""Failed sign-ins and bad tokens, counted per trusted client address and per name tried.

Behind a proxy every request comes from the proxy's address: keyed by that alone, twenty bad tokens from
one user a minute would lock everyone out. The client address is read from the header a trusted proxy
sets (BULKHEAD_CLIENT_IP_HEADER, trusted only when the peer is in BULKHEAD_TRUSTED_PROXIES), and a
failure counts against that address together with what was tried (a username or a token's prefix), with a
looser limit per address alone so that trying many names from one address still stops.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from django.conf import settings
from django.core.cache import cache

PER_ADDRESS_FACTOR = 5
WINDOW_SECONDS = 60


def client_address(request: Any) -> str:
    """The client's address: the peer's, or (when the peer is a trusted proxy) the last address in the
    proxy header that is not itself a trusted proxy."""
    meta = getattr(request, "META", {})
    peer = meta.get("REMOTE_ADDR", "") or "-"
    header = settings.BULKHEAD_CLIENT_IP_HEADER
    if not header or not _trusted(peer):
        return peer
    forwarded = meta.get("HTTP_" + header.upper().replace("-", "_"), "")
    for candidate in reversed([part.strip() for part in forwarded.split(",") if part.strip()]):
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            return peer  # a malformed chain: trust nothing of it
        if not _trusted(candidate):
            return candidate
    return peer


def _trusted(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(network) for network in settings.BULKHEAD_TRUSTED_PROXIES)


def _keys(request: Any, subject: str) -> tuple[str, str]:
    address = client_address(request)
    return f"authfail:{address}:{subject[:64]}", f"authfail:{address}"


def throttled(request: Any, subject: str) -> bool:
    """Whether failures for `subject` (a username or token prefix) from this client hit the limit."""
    limit = settings.BULKHEAD_AUTH_FAILURES_PER_MINUTE
    pair, address = _keys(request, subject)
    return (cache.get(pair) or 0) >= limit or (cache.get(address) or 0) >= limit * PER_ADDRESS_FACTOR


def note_failure(request: Any, subject: str) -> None:
    for key in _keys(request, subject):
        if not cache.add(key, 1, timeout=WINDOW_SECONDS):
            try:
                cache.incr(key)
            except ValueError:
                cache.set(key, 1, timeout=WINDOW_SECONDS)
