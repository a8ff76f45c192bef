"""/ws/events/: a signed-in user's live feed of their tenants' events."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from portal.events import OPERATORS_GROUP, tenant_group


@database_sync_to_async
def _groups_for(user: Any) -> list[str]:
    from tenants.models import Tenant

    groups = [tenant_group(pk) for pk in Tenant.objects.for_user(user, "view").values_list("pk", flat=True)]
    if user.is_staff:
        groups.append(OPERATORS_GROUP)
    return groups


class EventsConsumer(AsyncJsonWebsocketConsumer):
    groups_joined: list[str]

    async def connect(self) -> None:
        user = self.scope.get("user")
        self.groups_joined = []
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        groups = await _groups_for(user)
        # Operators get the operators group only: every tenant event is also sent there.
        if OPERATORS_GROUP in groups:
            groups = [OPERATORS_GROUP]
        for group in groups:
            await self.channel_layer.group_add(group, self.channel_name)
        self.groups_joined = groups
        await self.accept()

    async def disconnect(self, code: int) -> None:
        for group in self.groups_joined:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        # The feed is one-way; clients have nothing to say.
        return

    async def bulkhead_event(self, message: dict[str, Any]) -> None:
        await self.send_json(message["event"])
