"""The client's address: REMOTE_ADDR, or what a trusted proxy says it forwarded for.

Only proxies named in BULKHEAD_TRUSTED_PROXIES are believed, and only for the header named in
BULKHEAD_CLIENT_IP_HEADER; the address taken is the last one in the header that is not a trusted proxy
(a client can put anything at the left of X-Forwarded-For).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from django.conf import settings


def _trusted(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(net, strict=False) for net in settings.BULKHEAD_TRUSTED_PROXIES)


def client_address(meta: Mapping[str, Any]) -> str | None:
    remote = meta.get("REMOTE_ADDR") or None
    if remote is None or not settings.BULKHEAD_TRUSTED_PROXIES or not _trusted(remote):
        return remote
    header = "HTTP_" + settings.BULKHEAD_CLIENT_IP_HEADER.upper().replace("-", "_")
    for hop in reversed([h.strip() for h in str(meta.get(header, "")).split(",") if h.strip()]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return remote  # a garbled chain: believe nothing in it
        if not _trusted(hop):
            return hop
    return remote
