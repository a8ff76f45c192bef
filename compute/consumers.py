"""/ws/workloads/<id>/console/: a workload's live output (containers) or serial console (micro-VMs).

Opening one needs a console token: single-use, 60 s, bound to the user and the workload, minted by the
workload page and kept only in the cache. The consumer also re-resolves the workload through the
permission layer ("operate"), so a token alone never opens somebody else's console.

Frames: binary frames are terminal bytes (both ways for a micro-VM's console); text frames from the
server are small JSON notices ({"type": "hello" | "notice", ...}).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import secrets
from typing import Any
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.core.cache import cache

from compute.choices import Isolation
from compute.models import Workload
from portal.errors import ServiceError

log = logging.getLogger(__name__)

CONSOLE_TOKEN_TTL = 60  # seconds
POLL_INTERVAL = 0.2  # seconds between looks at a growing log
RECHECK_EVERY = 25  # polls (~5 s) between re-checks that the user may still operate the workload

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404


def _token_key(secret: str) -> str:
    # Only a hash of the secret is a cache key: a cache dump does not hand out consoles.
    return "console-token:" + hashlib.sha256(secret.encode()).hexdigest()


def mint_console_token(user: Any, workload: Workload) -> str:
    """A single-use secret that lets `user` open the console of `workload` within 60 s."""
    secret = secrets.token_urlsafe(32)
    cache.set(_token_key(secret), {"user": user.pk, "workload": str(workload.pk)}, timeout=CONSOLE_TOKEN_TTL)
    return secret


def redeem_console_token(secret: str) -> dict[str, Any] | None:
    """The token's binding, once: of two redeemers racing, only the one whose delete removed it wins."""
    if not secret or len(secret) > 200:
        return None
    key = _token_key(secret)
    value = cache.get(key)
    if value is None or not cache.delete(key):
        return None
    return value if isinstance(value, dict) else None


@database_sync_to_async
def _operable_workload(user: Any, workload_id: str) -> Workload | None:
    return (
        Workload.objects.for_user(user, "operate")
        .select_related("host", "image")
        .filter(pk=workload_id)
        .first()
    )


@database_sync_to_async
def _still_operable(user: Any, workload_id: str) -> bool:
    user.refresh_from_db(fields=["is_active", "is_staff"])
    return user.is_active and Workload.objects.for_user(user, "operate").filter(pk=workload_id).exists()


class WorkloadConsoleConsumer(AsyncWebsocketConsumer):
    workload: Workload | None = None
    pump: asyncio.Task[None] | None = None
    vm_stream: Any = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        workload_id = str(self.scope["url_route"]["kwargs"]["pk"])
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        secret = (query.get("token") or [""])[0]
        binding = await sync_to_async(redeem_console_token)(secret)
        if binding is None or binding.get("user") != user.pk or binding.get("workload") != workload_id:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        workload = await _operable_workload(user, workload_id)
        if workload is None or workload.host_id is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.workload = workload
        await self.accept()
        self.pump = asyncio.create_task(self._run())

    async def disconnect(self, code: int) -> None:
        if self.pump is not None:
            self.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.pump
        await self._close_vm_stream()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        # Only a micro-VM's serial console takes input; a container's output view is read-only.
        stream = self.vm_stream
        if stream is None:
            return
        data = bytes_data if bytes_data is not None else (text_data or "").encode()
        if data:
            await asyncio.to_thread(stream.send, data[:4096])

    # -- the pumps ----------------------------------------------------------------------------------

    async def _notice(self, kind: str, **fields: Any) -> None:
        await self.send(text_data=json.dumps({"type": kind, **fields}))

    async def _run(self) -> None:
        assert self.workload is not None
        try:
            if self.workload.isolation == Isolation.MICROVM and await self._open_vm_console():
                await self._notice("hello", mode="console")
                await self._pump_vm_console()
            else:
                await self._notice("hello", mode="output")
                await self._pump_output()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("console of workload %s failed", self.workload.pk)
            await self._notice("notice", message="The console stopped unexpectedly.")
            await self.close(code=1011)

    async def _allowed_still(self, polls: int) -> bool:
        if polls % RECHECK_EVERY:
            return True
        assert self.workload is not None
        if await _still_operable(self.scope["user"], str(self.workload.pk)):
            return True
        await self.close(code=CLOSE_FORBIDDEN)
        return False

    async def _pump_output(self) -> None:
        """tail -f of the workload's output: the last 64 KiB, then whatever is added, every 200 ms."""
        assert self.workload is not None
        follower = OutputFollower(self.workload)
        polls = 0
        unanswered = False
        while True:
            try:
                chunk = await asyncio.to_thread(follower.read_new)
            except ServiceError as error:  # the host's agent is away: say so once, keep trying
                chunk = b""
                if not unanswered:
                    await self._notice("notice", message=error.message)
                unanswered = True
            else:
                unanswered = False
            if chunk:
                await self.send(bytes_data=chunk)
            polls += 1
            if not await self._allowed_still(polls):
                return
            await asyncio.sleep(POLL_INTERVAL)

    async def _open_vm_console(self) -> bool:
        """The serial console through the host's agent, relayed over its own broker connection (the host
        may be another machine; the web process never opens libvirt)."""
        from compute.host_rpc import HostConsole

        assert self.workload is not None
        console = HostConsole(self.workload)
        try:
            await asyncio.to_thread(console.open)
        except Exception as exc:  # agent away, VM not running: show its output instead
            log.info("no serial console for %s (%s): streaming its output", self.workload.pk, exc)
            await asyncio.to_thread(console.close)
            return False
        self.vm_stream = console
        return True

    async def _pump_vm_console(self) -> None:
        polls = 0
        while self.vm_stream is not None:
            data = await asyncio.to_thread(self.vm_stream.recv, POLL_INTERVAL)
            if data is None:  # the VM went away: the stream ended
                await self._notice("notice", message="The console closed (the micro-VM stopped).")
                await self._close_vm_stream()
                await self.close()
                return
            if data:
                await self.send(bytes_data=data)
                continue
            polls += 1
            if not await self._allowed_still(polls):
                return

    async def _close_vm_stream(self) -> None:
        stream, self.vm_stream = self.vm_stream, None
        if stream is not None:
            await asyncio.to_thread(stream.close)


class OutputFollower:
    """Reads what a workload printed since the last call, through its host's agent (the host may be
    another machine; see compute.host_rpc). The position lives here, the files there."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.position: int | None = None

    def read_new(self) -> bytes:
        from compute import host_rpc

        answer = host_rpc.ask(self.workload, "output", position=self.position)
        self.position = int(answer["position"])
        return base64.b64decode(answer["data"])
