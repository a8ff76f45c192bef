"""The event bus: Channels groups, one per tenant and one for operators.

Events are small dicts; browsers on /ws/events/ receive those of their tenants (operators: all).
Publishing never fails or slows the caller: events go to one sender thread per process (which keeps
their order) and a lost event is repaired by the next page load. State is always in the database.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
from typing import Any

from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

OPERATORS_GROUP = "operators"
_QUEUE_LIMIT = 10_000

_outbox: queue.Queue[tuple[Any, dict[str, Any]] | None] = queue.Queue(maxsize=_QUEUE_LIMIT)
_sender: threading.Thread | None = None
_sender_lock = threading.Lock()


def tenant_group(tenant_id: Any) -> str:
    return f"tenant.{tenant_id}"


async def send(tenant_id: Any, event: dict[str, Any]) -> None:
    """Send one event to its tenant's group and the operators' group."""
    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": "bulkhead.event", "event": event}
    try:
        if tenant_id is not None:
            await layer.group_send(tenant_group(tenant_id), message)
        await layer.group_send(OPERATORS_GROUP, message)
    except Exception:
        log.warning("could not publish event %s", event.get("type"), exc_info=True)


def _send_forever() -> None:
    # One event loop for the thread's life: the channel layer keeps its Redis connection per loop, so a
    # loop per event (async_to_sync) would connect anew each time (about 3 ms of CPU an event).
    loop = asyncio.new_event_loop()
    try:
        while True:
            item = _outbox.get()
            try:
                if item is None:
                    return
                loop.run_until_complete(send(*item))
            finally:
                _outbox.task_done()
    finally:
        loop.close()


def _ensure_sender() -> None:
    global _sender
    with _sender_lock:
        if _sender is None or not _sender.is_alive():
            _sender = threading.Thread(target=_send_forever, name="bulkhead-events", daemon=True)
            _sender.start()


def publish(tenant_id: Any, event: dict[str, Any]) -> None:
    """Queue an event for the sender thread; drops it (with a warning) if the bus is far behind."""
    _ensure_sender()
    try:
        _outbox.put_nowait((tenant_id, event))
    except queue.Full:
        log.warning("event bus backlog full; dropping a %s event", event.get("type"))


def flush(timeout: float = 5.0) -> None:
    """Wait until queued events are sent (process exit, tests)."""
    if _sender is None:
        return
    done = threading.Event()

    def wait() -> None:
        _outbox.join()
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    done.wait(timeout)


atexit.register(flush)
