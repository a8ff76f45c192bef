"""/ws/events/: a signed-in user's live feed of their tenants' events.

What a socket receives follows the user's access as it changes, not as it was at connect: a change of
membership, role or account (tenants.services) tells the user's sockets to look again at once, and each
socket also looks again every ``BULKHEAD_EVENTS_RECHECK_SECONDS`` (a lost notice is repaired soon). A
socket whose session ended or whose account was deactivated is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from importlib import import_module
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.utils.crypto import constant_time_compare

from portal.events import OPERATORS_GROUP, tenant_group, user_group

CLOSE_ACCESS_ENDED = 4403


def recheck_seconds() -> float:
    return float(getattr(settings, "BULKHEAD_EVENTS_RECHECK_SECONDS", 30))


def _groups_for(user: Any) -> list[str]:
    from tenants.models import Tenant

    if user.is_staff:
        # Operators get the operators group only: every tenant event is also sent there.
        return [OPERATORS_GROUP]
    return [tenant_group(pk) for pk in Tenant.objects.for_user(user, "view").values_list("pk", flat=True)]


@database_sync_to_async
def _access_now(user_pk: Any, session_key: str | None) -> list[str] | None:
    """The groups this socket may be in now, or None if its session or account no longer stands."""
    if not session_key:
        return None
    session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    if not session.exists(session_key) or str(session.get(SESSION_KEY)) != str(user_pk):
        return None
    user = get_user_model().objects.filter(pk=user_pk, is_active=True).first()
    if user is None:
        return None
    if not constant_time_compare(session.get(HASH_SESSION_KEY, ""), user.get_session_auth_hash()):
        return None  # the password changed since this session signed in
    return _groups_for(user)


class EventsConsumer(AsyncJsonWebsocketConsumer):
    groups_joined: list[str]

    async def connect(self) -> None:
        user = self.scope.get("user")
        self.groups_joined = []
        self.rechecker: asyncio.Task[None] | None = None
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.user_pk = user.pk
        self.session_key = getattr(self.scope.get("session"), "session_key", None)
        groups = await _access_now(self.user_pk, self.session_key)
        if groups is None:
            await self.close(code=CLOSE_ACCESS_ENDED)
            return
        await self.channel_layer.group_add(user_group(self.user_pk), self.channel_name)
        await self._join(groups)
        await self.accept()
        self.rechecker = asyncio.create_task(self._recheck_forever())

    async def disconnect(self, code: int) -> None:
        if self.rechecker is not None:
            self.rechecker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.rechecker
        await self._join([])
        if getattr(self, "user_pk", None) is not None:
            await self.channel_layer.group_discard(user_group(self.user_pk), self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        # The feed is one-way; clients have nothing to say.
        return

    async def bulkhead_event(self, message: dict[str, Any]) -> None:
        if message.get("group") not in self.groups_joined:
            return  # sent before this socket lost access, read after
        await self.send_json(message["event"])

    async def bulkhead_access_changed(self, message: dict[str, Any]) -> None:
        await self._recheck()

    async def _recheck_forever(self) -> None:
        while True:
            await asyncio.sleep(recheck_seconds())
            await self._recheck()

    async def _recheck(self) -> None:
        groups = await _access_now(self.user_pk, self.session_key)
        if groups is None:
            await self._join([])
            await self.close(code=CLOSE_ACCESS_ENDED)
            return
        await self._join(groups)

    async def _join(self, groups: list[str]) -> None:
        """Be in exactly these tenant/operator groups: leave the others first."""
        for group in set(self.groups_joined) - set(groups):
            await self.channel_layer.group_discard(group, self.channel_name)
        for group in set(groups) - set(self.groups_joined):
            await self.channel_layer.group_add(group, self.channel_name)
        self.groups_joined = list(groups)
