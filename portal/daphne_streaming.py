"""Streamed request bodies and zero-copy responses for the registry's paths under daphne.

Daphne (Twisted) reads a whole request body into a temporary file (on disk past 100 kB) and only then
starts the application, which is handed the body in one burst of queued messages: a 700 MB push was
written to /tmp, read back, held in memory as queue messages, then written again by the registry, with
nothing overlapping. And a response is written into Twisted's unbounded buffer as fast as the
application produces it, through Python.

For `/v2/` requests with a body (`POST`, `PUT`, `PATCH`), and a host's committed layer (`STREAMED_PATHS`;
Django reads it through `portal.asgi_threads.StreamedBody`), `StreamingWebRequest` starts the application
as soon as the headers are in and queues the body as it arrives, in messages of about `MESSAGE_BYTES`.
While more than `HIGH_WATER_BYTES` wait unread, the socket is not read (TCP back-pressure on the
client) until the application has taken them down to `LOW_WATER_BYTES`. An application that answers
before the body has arrived (a refusal) gets its answer sent; the rest of the body is read and dropped
(up to `DRAIN_LIMIT_BYTES`, else the connection is closed) so the client reads the answer and the
connection stays in step.

Every other request body is read whole by daphne before the application (and so authentication) runs:
`StreamingWebRequest` bounds it first (`body_limit`: `BULKHEAD_MAX_REQUEST_BYTES`; an image archive's
upload `BULKHEAD_MAX_UPLOAD_BYTES`; a host's backup manifest and chunks their own). A declared length
past the limit is answered 413 from the headers, a body without one is cut off with 413 once it passes
the limit; either way the connection is closed and nothing past the limit is kept, so a client without
any credential cannot fill the portal's temporary disk.

Responses: plain-TCP `/v2/` scopes offer the ASGI zero-copy extension (`http.response.zerocopy`): the
headers go out through Twisted, then the file is sent with `sendfile(2)` from the kernel's page cache
straight to the socket (asyncio's `sock_sendfile`), the event loop waiting for the socket while it
is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from typing import Any

logger = logging.getLogger(__name__)

STREAMED_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
# Bodies the application reads as they arrive (or refuses from the headers alone): the registry's
# uploads, and a host's committed layer (a host can be compromised; its upload must not be taken whole
# before the portal has looked at who sends it, for which commit, and how much).
STREAMED_PATHS = re.compile(rb"^/v2/|^/api/v1/hosts/self/workloads/[^/]+/commit/layer/$")
MESSAGE_BYTES = 1024 * 1024
HIGH_WATER_BYTES = 8 * 1024 * 1024
LOW_WATER_BYTES = 2 * 1024 * 1024
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
READ_BYTES = 1024 * 1024
ZEROCOPY = "http.response.zerocopy"
# Bodies allowed more than BULKHEAD_MAX_REQUEST_BYTES: an image archive (API and UI upload forms) ...
UPLOAD_PATHS = re.compile(rb"^/api/v1/images/import/$|^/images/import/$")
# ... whose multipart form wraps the archive in a few headers and boundaries ...
MULTIPART_OVERHEAD_BYTES = 1024 * 1024
# ... and a host's backup manifest and chunks (their views' own limits, whatever the setting).
MANIFEST_PATHS = re.compile(rb"^/api/v1/hosts/self/backups/[^/]+/manifests/[^/]+/$")
CHUNK_PATHS = re.compile(rb"^/api/v1/hosts/self/backups/[^/]+/chunks/[^/]+/$")


class _NoReplay:
    """What daphne's `process()` finds as the body of a streamed request: nothing left to replay."""

    closed = True

    def seek(self, *args: Any) -> None:
        return None

    def read(self, *args: Any) -> bytes:
        return b""

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        return None


def streams_body(method: bytes, path: bytes) -> bool:
    """Whether a request's body reaches the application as it arrives (`path` without its query)."""
    return method in STREAMED_METHODS and STREAMED_PATHS.match(path) is not None


def body_limit(path: bytes) -> int:
    """The largest body daphne reads for a request not streamed (`path` without its query)."""
    from django.conf import settings

    if UPLOAD_PATHS.match(path):
        return int(settings.BULKHEAD_MAX_UPLOAD_BYTES) + MULTIPART_OVERHEAD_BYTES
    if MANIFEST_PATHS.match(path):
        from compute.api.host_views import MAX_MANIFEST_BODY

        return MAX_MANIFEST_BODY
    if CHUNK_PATHS.match(path):
        from compute.api.host_views import MAX_CHUNK_BODY

        return MAX_CHUNK_BODY
    return int(settings.BULKHEAD_MAX_REQUEST_BYTES)


def too_large_answer(limit: int) -> bytes:
    """A whole 413 response in the API's error shape, closing the connection."""
    body = json.dumps(
        {"error": {"code": "request_too_large", "message": f"The request body is larger than {limit} bytes."}}
    ).encode()
    head = (
        b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    )
    return head + body


def streaming_request_class() -> type:
    """daphne's WebRequest, streaming the bodies of `STREAMED_PATHS` (built lazily: daphne is optional)."""
    from daphne.http_protocol import WebRequest

    class StreamingWebRequest(WebRequest):  # type: ignore[misc]
        _streamed = False
        _refused = False
        _limit: int | None = None
        _received = 0

        def gotLength(self, length: int | None) -> None:
            channel = self.channel
            command = getattr(channel, "_command", b"")
            path = getattr(channel, "_path", b"")
            if length == 0 or not streams_body(command, path.split(b"?", 1)[0]):
                if length != 0:
                    self._limit = body_limit(path.split(b"?", 1)[0])
                    if length is not None and length > self._limit:
                        self._refuse()  # from the headers: not a byte of the body is read
                        return
                super().gotLength(length)
                return
            self._streamed = True
            if hasattr(self.transport, "bufferSize"):
                # Read the socket in large pieces while a body streams (Twisted reads 64 KiB at a time):
                # fewer trips through the HTTP parser for the same bytes.
                self.transport.bufferSize = READ_BYTES
            self._pending: list[bytes] = []
            self._pending_bytes = 0
            self._queued_bytes = 0
            self._paused = False
            self._body_done = False
            self._answered_early = False
            self._dropped = 0
            self.content = _NoReplay()
            self.method, self.uri, self.clientproto = command, path, channel._version
            self.path = path.split(b"?", 1)[0]
            self.process()  # creates the application now; the body follows as it arrives
            queue = self.application_queue
            if queue is not None:
                self._watch(queue)

        def _watch(self, queue: asyncio.Queue[Any]) -> None:
            """Count what the application takes off its queue; read the socket again once it caught up."""
            take = queue.get_nowait

            def get_nowait() -> Any:
                message = take()
                self._queued_bytes -= len(message.get("body", b""))
                if self._paused and self._queued_bytes <= LOW_WATER_BYTES:
                    self._paused = False
                    if self.transport is not None:
                        self.transport.resumeProducing()
                return message

            queue.get_nowait = get_nowait  # type: ignore[method-assign]

        def _refuse(self) -> None:
            """Answer 413 and close the connection, before the application ever starts."""
            self._refused = True
            spooled = getattr(self, "content", None)
            if spooled is not None:
                spooled.close()  # what a chunked body left there before it passed the limit: gone
            self.content = _NoReplay()
            # Twisted would send `100 Continue` after this answer; the body is not wanted.
            self.requestHeaders.removeHeader(b"Expect")
            channel = self.channel
            channel.persistent = False
            channel.transport.write(too_large_answer(self._limit or 0))
            channel.loseConnection()  # stops reading: the rest of the body stays in the kernel

        def handleContentChunk(self, data: bytes) -> None:
            if self._refused:
                return  # what the same read brought after the refusal: dropped
            if not self._streamed:
                self._received += len(data)
                if self._limit is not None and self._received > self._limit:
                    self._refuse()  # a chunked body past the limit: cut off
                    return
                super().handleContentChunk(data)
                return
            if self._answered_early:
                self._dropped += len(data)
                if self._dropped > DRAIN_LIMIT_BYTES:
                    self.channel.persistent = False  # too much to drop: close after the answer
                    self._finish_now()
                return
            self._pending.append(data)
            self._pending_bytes += len(data)
            if self._pending_bytes >= MESSAGE_BYTES:
                self._queue_pending(more=True)

        def _queue_pending(self, *, more: bool) -> None:
            body = b"".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            queue = self.application_queue
            if queue is None:
                return
            queue.put_nowait({"type": "http.request", "body": body, "more_body": more})
            self._queued_bytes += len(body)
            if more and not self._paused and self._queued_bytes > HIGH_WATER_BYTES and self.transport:
                self._paused = True
                self.transport.pauseProducing()

        def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
            if self._refused:
                return  # answered already: the application never starts
            if not self._streamed:
                super().requestReceived(command, path, version)
                return
            self._body_done = True
            if self._answered_early:
                self._finish_now()
            else:
                self._queue_pending(more=False)

        def finish(self) -> None:
            if self._streamed and not self._body_done:
                # Answered before the whole body came: drop the rest as it arrives, then finish.
                self._answered_early = True
                self._pending.clear()
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resumeProducing()
                return
            super().finish()

        def _finish_now(self) -> None:
            if not self.finished:
                self._body_done = True
                super().finish()

    return StreamingWebRequest


def add_zerocopy_scope(server_class: Any) -> None:
    """Offer `http.response.zerocopy` to /v2/ scopes on plain TCP, and serve it (idempotent)."""
    if getattr(server_class, "_bulkhead_zerocopy", False):
        return
    create = server_class.create_application
    reply = server_class.handle_reply

    def create_application(self: Any, protocol: Any, scope: dict[str, Any]) -> Any:
        transport = getattr(getattr(protocol, "channel", None), "transport", None)
        if (
            scope.get("type") == "http"
            and str(scope.get("path", "")).startswith("/v2/")
            and getattr(transport, "socket", None) is not None
        ):
            scope.setdefault("extensions", {})[ZEROCOPY] = {}
        return create(self, protocol, scope)

    async def handle_reply(self: Any, protocol: Any, message: dict[str, Any]) -> None:
        if message.get("type") == ZEROCOPY:
            await send_file(self, protocol, message)
            return
        await reply(self, protocol, message)

    server_class.create_application = create_application
    server_class.handle_reply = handle_reply
    server_class._bulkhead_zerocopy = True


def _buffered(transport: Any) -> int:
    """Bytes Twisted still holds for the socket (its FileDescriptor's buffers)."""
    return (
        len(getattr(transport, "dataBuffer", b""))
        - getattr(transport, "offset", 0)
        + getattr(transport, "_tempDataLen", 0)
    )


async def send_file(server: Any, request: Any, message: dict[str, Any]) -> None:
    """Send `count` bytes of `file` from `offset` with sendfile(2), after the response's headers."""
    from twisted.web import http

    if request not in server.connections or server.connections[request].get("disconnected"):
        return
    if request.finished or request.channel is None or not request._response_started:
        return
    transport = request.channel.transport
    file, offset, count = message["file"], int(message.get("offset", 0)), message.get("count")
    http.Request.write(request, b"")  # the status line and headers, into Twisted's buffer
    with contextlib.suppress(Exception):
        transport.doWrite()  # out now: the socket is empty at a response's start
    loop = asyncio.get_running_loop()
    for _ in range(1000):  # a client slow to take even the headers: wait for Twisted to flush
        if _buffered(transport) == 0:
            break
        await asyncio.sleep(0.005)
    try:
        if _buffered(transport) or request.chunked or request.method == b"HEAD":
            raise BlockingIOError  # never interleave with Twisted's writes: send through it instead
        sent = await loop.sock_sendfile(transport.socket, file, offset, count, fallback=True)
        request.sentLength += sent
    except BlockingIOError:
        await _send_through_twisted(request, file, offset, count)
    except OSError:
        transport.abortConnection()  # the client went away mid-body
        return
    if not message.get("more_body", False) and not request.finished:
        request.finish()


async def _send_through_twisted(request: Any, file: Any, offset: int, count: int | None) -> None:
    from twisted.web import http

    file.seek(offset)
    remaining = count if count is not None else float("inf")
    while remaining > 0:
        chunk = await asyncio.to_thread(file.read, int(min(MESSAGE_BYTES, remaining)))
        if not chunk:
            break
        remaining -= len(chunk)
        http.Request.write(request, chunk)
