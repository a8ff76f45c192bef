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
from collections.abc import Awaitable, Callable
from typing import Any

from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

OPERATORS_GROUP = "operators"
_QUEUE_LIMIT = 10_000

# Each item: a coroutine function of the sender's loop and its arguments.
_outbox: queue.Queue[tuple[Callable[..., Awaitable[None]], tuple[Any, ...]] | None] = queue.Queue(
    maxsize=_QUEUE_LIMIT
)
_sender: threading.Thread | None = None
_sender_lock = threading.Lock()


def tenant_group(tenant_id: Any) -> str:
    return f"tenant.{tenant_id}"


def user_group(user_id: Any) -> str:
    """Every live socket of one user: told to look again at its access when that changes."""
    return f"user.{user_id}"


def access_changed(*user_ids: Any) -> None:
    """Tell these users' sockets that their memberships, roles or account changed (after commit)."""
    for user_id in user_ids:
        _enqueue(_send_to_group, user_group(user_id), {"type": "bulkhead.access_changed"})


async def send(tenant_id: Any, event: dict[str, Any]) -> None:
    """Send one event to its tenant's group and the operators' group."""
    layer = get_channel_layer()
    if layer is None:
        return
    # The group travels with the message: a socket that left the group while the message waited in
    # its queue drops it.
    try:
        if tenant_id is not None:
            group = tenant_group(tenant_id)
            await layer.group_send(group, {"type": "bulkhead.event", "event": event, "group": group})
        await layer.group_send(
            OPERATORS_GROUP, {"type": "bulkhead.event", "event": event, "group": OPERATORS_GROUP}
        )
    except Exception:
        log.warning("could not publish event %s", event.get("type"), exc_info=True)


async def _send_to_group(group: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(group, message)
    except Exception:
        log.warning("could not send %s to %s", message.get("type"), group, exc_info=True)


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
                coroutine_function, args = item
                loop.run_until_complete(coroutine_function(*args))
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
    _enqueue(send, tenant_id, event)


def _enqueue(coroutine_function: Callable[..., Awaitable[None]], *args: Any) -> None:
    _ensure_sender()
    try:
        _outbox.put_nowait((coroutine_function, args))
    except queue.Full:
        log.warning("event bus backlog full; dropping a message (%s)", coroutine_function.__name__)


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
