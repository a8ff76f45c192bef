"""A micro-VM's serial console relayed over the host's own broker connection: the portal's web process
never opens libvirt (which is on the host, maybe another machine), and the host needs no inbound port.

The portal picks a session id, keeps `h.<hex>:console:<session>` alive (a key with a short TTL it
refreshes while the websocket is open) and asks the host's agent (`compute.host.rpc`, query `console`)
to open the workload's console. The agent opens the libvirt stream and a relay thread copies its output
onto `…:<session>:out` and what arrives on `…:<session>:in` into it, until the stream ends (an end item)
or the session key expires (the portal went away). Every key is under the host's prefix: its broker user
may touch nothing else. Django-free (issue 16's boundary).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from compute.host.broker import key_prefix

log = logging.getLogger(__name__)

SESSION_TTL_MS = 5000
OUTPUT_TTL_SECONDS = 30
CHUNK_BYTES = 64 * 1024
MAX_INPUT_ITEMS = 64
MAX_RELAYS = 16
DATA, END = b"d", b"e"
_SESSION = re.compile(r"^[0-9a-f]{32}$")


def session_key(host_id: Any, session: str) -> str:
    return f"{key_prefix(host_id)}console:{session}"


def input_key(host_id: Any, session: str) -> str:
    return session_key(host_id, session) + ":in"


def output_key(host_id: Any, session: str) -> str:
    return session_key(host_id, session) + ":out"


def valid_session(session: Any) -> bool:
    return isinstance(session, str) and bool(_SESSION.match(session))


def _recv(stream: Any) -> bytes | None:
    """Bytes available now, b"" if none yet, None at the end of the stream (libvirt's nonblocking recv)."""
    data = stream.recv(CHUNK_BYTES)
    if data == -2:
        return b""
    if not data:
        return None
    return bytes(data)


def _send_all(stream: Any, data: bytes) -> None:
    view = memoryview(data)
    for _ in range(100):
        if not view:
            return
        sent = stream.send(bytes(view))
        if sent == -2:
            time.sleep(0.01)
            continue
        view = view[sent:]


class ConsoleRelays:
    """The agent's open console relays (one thread each, at most MAX_RELAYS)."""

    def __init__(self, client: redis.Redis, host_id: Any, open_stream: Callable[[Any], Any]) -> None:
        self.client = client
        self.host_id = str(host_id)
        self.open_stream = open_stream
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def open(self, target: Any, session: str) -> dict[str, Any]:
        """Open the target's console for ``session`` and relay it; the portal has made the session key."""
        if not valid_session(session) or not self.client.exists(session_key(self.host_id, session)):
            raise ValueError("no such console session")
        with self._lock:
            self._threads = {s: t for s, t in self._threads.items() if t.is_alive()}
            if session in self._threads:
                return {"session": session}
            if len(self._threads) >= MAX_RELAYS:
                raise RuntimeError("too many consoles open on this host")
            stream = self.open_stream(target)
            thread = threading.Thread(target=self._relay, args=(session, stream), daemon=True)
            self._threads[session] = thread
        thread.start()
        return {"session": session}

    def _relay(self, session: str, stream: Any) -> None:
        alive, inbox, outbox = (
            session_key(self.host_id, session),
            input_key(self.host_id, session),
            output_key(self.host_id, session),
        )
        checked = 0.0
        try:
            while True:
                now = time.monotonic()
                if now - checked > 0.5:
                    if not self.client.exists(alive):
                        return  # the portal's websocket closed
                    checked = now
                data = _recv(stream)
                if data is None:
                    self._push(outbox, END)
                    return
                if data:
                    self._push(outbox, DATA + data)
                    continue
                items = cast("list[bytes] | None", self.client.lpop(inbox, MAX_INPUT_ITEMS))
                for item in items or []:
                    _send_all(stream, item[:4096])
                if not items:
                    time.sleep(0.03)
        except Exception:
            log.exception("console relay %s failed", session)
            with contextlib.suppress(redis.exceptions.RedisError):
                self._push(outbox, END)
        finally:
            with contextlib.suppress(Exception):
                stream.finish()
            with contextlib.suppress(Exception):
                stream.abort()
            with contextlib.suppress(redis.exceptions.RedisError):
                self.client.delete(inbox)

    def _push(self, key: str, item: bytes) -> None:
        pipe = self.client.pipeline()
        pipe.rpush(key, item)
        pipe.expire(key, OUTPUT_TTL_SECONDS)
        pipe.execute()
