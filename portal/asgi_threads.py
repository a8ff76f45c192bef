"""Django's ASGI handler on reused threads, so that a request finds its database connection open.

Django runs each HTTP request's synchronous code (views, ORM, middleware) in a thread of its own:
`ASGIHandler.__call__` enters a fresh `ThreadSensitiveContext`, whose executor (one new thread) is shut
down when the request ends. Database connections and cache clients are per thread, so every request
opened a new PostgreSQL connection (a backend forked, authenticated, its catalog caches cold) and a new
Redis connection, and `CONN_MAX_AGE` never applied. On the create path that was ~3-5 ms per request (the
POST and each of a host's reports).

Here a request borrows a single-thread executor from a pool (asgiref's "caller owns the executor" form
of `ThreadSensitiveContext`) and gives it back when it ends: its thread keeps its connections, which
Django's own request_started/request_finished handling closes when they are broken or older than
`CONN_MAX_AGE` — as under a threaded WSGI server. Requests in flight at once still run on as many
threads as before (one each); at most `IDLE_THREADS` idle ones are kept.

Django reads a request's whole body (into a temporary file) before the view runs. For the paths whose
bodies daphne streams (`portal.daphne_streaming.streams_body`: a host's committed layer) the view gets
`StreamedBody` instead: it reads the body from the ASGI queue as it arrives, so a refusal made from the
headers (credential, commit, quota, length) is answered before the body is sent, and no more than one
message of it is held at a time.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import ThreadSensitiveContext
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler
from django.http import UnreadablePostError

from portal.daphne_streaming import streams_body

# Idle threads kept (each may hold a database connection); more requests at once get new threads,
# which end with their request once this many are idle.
IDLE_THREADS = 8


class PooledThreadsASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        self._idle: list[ThreadPoolExecutor] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        if streams_body(scope["method"].encode(), scope["path"].encode("utf-8", "surrogateescape")):
            receive = StreamedBody(receive, asyncio.get_running_loop())
        # Only the event loop's thread touches the list: no lock needed.
        executor = (
            self._idle.pop() if self._idle else ThreadPoolExecutor(1, thread_name_prefix="django-request")
        )
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            if len(self._idle) < IDLE_THREADS:
                self._idle.append(executor)
            else:
                executor.shutdown(wait=False)

    async def read_body(self, receive: Any) -> Any:
        if isinstance(receive, StreamedBody):
            return receive  # read by the view, as it arrives
        return await super().read_body(receive)

    async def listen_for_disconnect(self, receive: Any) -> None:
        if isinstance(receive, StreamedBody):
            # The view owns the queue until the body is read: listen only after that (a view that
            # answers without reading it is not listened to; its answer ends the request).
            if await receive.wait_read():
                raise RequestAborted()
            receive = receive.receive
        await super().listen_for_disconnect(receive)

    def close_threads(self) -> None:
        """Close each idle thread's database connections and end the threads (tests, shutdown)."""
        from django.db import connections

        while self._idle:
            executor = self._idle.pop()
            executor.submit(connections.close_all).result()
            executor.shutdown(wait=True)


def get_pooled_asgi_application() -> PooledThreadsASGIHandler:
    """`django.core.asgi.get_asgi_application` with the pooled handler."""
    import django

    django.setup(set_prefix=False)
    return PooledThreadsASGIHandler()


class StreamedBody:
    """A request body read from the ASGI queue by the view's thread, a message at a time (file-like for
    Django's request). A client that goes away mid-body makes `read` raise `UnreadablePostError`."""

    closed = False

    def __init__(self, receive: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.receive = receive
        self._loop = loop
        self._held = b""
        self._more = True
        self._done = asyncio.Event()  # the body was read to its end, or the client went away
        self._disconnected = False

    async def _next(self) -> bytes:
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self._disconnected, self._more = True, False
            self._done.set()
            raise UnreadablePostError("the client went away during the body")
        self._more = bool(message.get("more_body", False))
        if not self._more:
            self._done.set()
        return bytes(message.get("body", b""))

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (all that is left when negative); b"" at the end."""
        while (size < 0 or not self._held) and self._more:
            self._held += asyncio.run_coroutine_threadsafe(self._next(), self._loop).result()
        if self._disconnected:
            raise UnreadablePostError("the client went away during the body")
        cut = len(self._held) if size < 0 else size
        data, self._held = self._held[:cut], self._held[cut:]
        return data

    async def wait_read(self) -> bool:
        """Once the body was read to its end: whether the client went away meanwhile."""
        await self._done.wait()
        return self._disconnected

    def close(self) -> None:
        self._held = b""
