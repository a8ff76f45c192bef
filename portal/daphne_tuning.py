"""Two adjustments of daphne (the portal's HTTP server) for the registry's clients and bodies.

A TLS handshake on the plain-HTTP port is closed at once instead of waiting for a request line. OCI
clients (skopeo, podman) told `--tls-verify=false` try HTTPS first and fall back to HTTP only when that
fails. Twisted waits for the end of a request line that a TLS ClientHello never sends, so each
client invocation stalled for its 10 s handshake timeout before every push or pull. A first byte of
0x16 (a TLS handshake record) can never start an HTTP request: the connection is closed, the client
falls back at once.

Request bodies reach the application in messages of `request_buffer_size` bytes, 8 KiB by default (not
settable from daphne's command line): a 100 MB layer was 12,800 messages through an asyncio queue. Daphne
has the whole body in Twisted's request body (a temporary file past 100 kB) by then; 1 MiB messages cost
no more memory than the registry's own 1 MiB write chunks.

(3) /v2/ request bodies stream to the application as they arrive, and /v2/ responses may use the ASGI
zero-copy extension: `portal.daphne_streaming`.
"""

from __future__ import annotations

from typing import Any

from portal.daphne_streaming import add_zerocopy_scope, streaming_request_class

TLS_HANDSHAKE_RECORD = 0x16
REQUEST_BUFFER_BYTES = 1024 * 1024


def tune_daphne() -> None:
    """Patch daphne's HTTP factory (idempotent); a no-op where daphne is not installed."""
    try:
        from daphne.http_protocol import HTTPFactory
        from daphne.server import Server
    except ImportError:
        return
    if getattr(HTTPFactory, "_bulkhead_refuses_tls", False):
        return
    build = HTTPFactory.buildProtocol
    streaming_request = streaming_request_class()
    add_zerocopy_scope(Server)

    def build_protocol(self: Any, addr: Any) -> Any:
        protocol = build(self, addr)
        protocol.requestFactory = streaming_request  # /v2/ bodies stream (portal.daphne_streaming)
        self.server.request_buffer_size = max(self.server.request_buffer_size, REQUEST_BUFFER_BYTES)
        received = protocol.dataReceived
        first = True

        def data_received(data: bytes) -> None:
            nonlocal first
            if first and data:
                first = False
                if data[0] == TLS_HANDSHAKE_RECORD:
                    protocol.transport.abortConnection()
                    return
            received(data)

        protocol.dataReceived = data_received
        return protocol

    HTTPFactory.buildProtocol = build_protocol  # type: ignore[method-assign]
    HTTPFactory._bulkhead_refuses_tls = True  # type: ignore[attr-defined]
