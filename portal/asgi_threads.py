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
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler

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
