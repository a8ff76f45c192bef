"""The event bus: Channels groups, one per tenant and one for operators.

Events are small dicts; browsers on /ws/events/ receive those of their tenants (operators: all).
Publishing never fails the caller: a lost event is repaired by the next page load.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

OPERATORS_GROUP = "operators"


def tenant_group(tenant_id: Any) -> str:
    return f"tenant.{tenant_id}"


def publish(tenant_id: Any, event: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": "bulkhead.event", "event": event}
    try:
        if tenant_id is not None:
            async_to_sync(layer.group_send)(tenant_group(tenant_id), message)
        async_to_sync(layer.group_send)(OPERATORS_GROUP, message)
    except Exception:
        log.warning("could not publish event %s", event.get("type"), exc_info=True)
