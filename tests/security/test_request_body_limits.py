"""Request bodies through the real web server (daphne), as a client without any credential sends them:
daphne reads a body whole (to a temporary file past 100 kB) before the application, and so
authentication, runs. A body declared larger than the limit is answered 413 from its headers and the
connection closed, a body without a length is cut off once it passes the limit, and nothing of either
reaches daphne's temporary directory. A body within the limit, and an image archive larger than the
general limit but within the upload limit, still reach their view (which refuses them: no credential).

The requests are written on raw sockets: an HTTP client sends the whole body before it reads an answer,
and the point here is the answer that comes first. Small limits keep the bodies (and the test) small."""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import serve_portal

pytestmark = pytest.mark.django_db(transaction=True)

MIB = 1024 * 1024
GIB = 1024 * MIB
LIMIT = MIB  # BULKHEAD_MAX_REQUEST_BYTES for the server under test
UPLOAD_LIMIT = 8 * MIB  # BULKHEAD_MAX_UPLOAD_BYTES
# An answer that waits for a body never sent does not come within this.
ANSWER_SECONDS = 10
API = "/api/v1/workloads/"


@pytest.fixture
def portal(tmp_path: Path) -> Iterator[dict[str, Any]]:
    spool = tmp_path / "daphne-tmp"
    spool.mkdir()
    with serve_portal(
        tmp_path / "store",
        TMPDIR=str(spool),
        BULKHEAD_MAX_REQUEST_BYTES=str(LIMIT),
        BULKHEAD_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
    ) as (address, proc):
        yield {"address": address, "pid": proc.pid, "spool": spool}


def send_head(address: str, path: str, framing: str, body: bytes = b"") -> socket.socket:
    """A POST's request line and headers without any credential, and `body` (the start of it)."""
    host, port = address.split(":")
    sock = socket.create_connection((host, int(port)), timeout=ANSWER_SECONDS)
    head = f"POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return sock


def answer(sock: socket.socket) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The answer the server sends now (a timeout here means it waits for the body)."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    headers = {k.lower(): v for k, v in response.getheaders()}
    status = response.status
    return status, json.loads(body) if body.startswith(b"{") else {}, headers


def closed_by_server(sock: socket.socket) -> bool:
    try:
        closed = sock.recv(1) == b""
    except ConnectionResetError:
        closed = True
    sock.close()
    return closed


def spooled_bytes(portal: dict[str, Any]) -> int:
    """What daphne holds in files of its temporary directory (unlinked at once: found by its fds)."""
    total = sum(entry.stat().st_size for entry in portal["spool"].iterdir())
    fds = Path(f"/proc/{portal['pid']}/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd).startswith(str(portal["spool"])):
                total += fd.stat().st_size
        except OSError:
            continue  # closed meanwhile
    return total


def test_it_answers_a_huge_declared_body_413_from_its_headers_and_spools_none_of_it(
    portal: dict[str, Any],
) -> None:
    sock = send_head(portal["address"], API, f"Content-Length: {100 * GIB}", b"{" + b" " * (512 * 1024))

    status, body, headers = answer(sock)

    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert headers["connection"] == "close"
    assert closed_by_server(sock)
    assert spooled_bytes(portal) == 0


def test_it_answers_413_instead_of_100_continue_to_a_huge_declared_body(portal: dict[str, Any]) -> None:
    sock = send_head(portal["address"], "/login/", f"Content-Length: {100 * GIB}\r\nExpect: 100-continue")

    # http.client skips interim answers: the first status line is read as it comes.
    first_line = sock.makefile("rb").readline()

    assert first_line.split()[1] == b"413"
    assert closed_by_server(sock)


def test_it_cuts_off_a_chunked_body_once_it_passes_the_limit(portal: dict[str, Any]) -> None:
    sock = send_head(portal["address"], API, "Transfer-Encoding: chunked")
    piece = b" " * (64 * 1024)
    sent, cut_off = 0, False
    while sent < 64 * LIMIT:  # an endless body, as far as the server can tell
        try:
            sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            cut_off = True
            break
        sent += len(piece)

    assert cut_off, f"the server took {sent} bytes"
    assert spooled_bytes(portal) <= LIMIT
    try:
        status, body, _ = answer(sock)
    except ConnectionResetError:
        return  # the answer may be lost with the reset of a connection closed with unread data
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_it_hands_a_body_within_the_limit_to_the_view(portal: dict[str, Any]) -> None:
    document = b'{"name": "' + b"x" * (LIMIT - 12) + b'"}'
    assert len(document) == LIMIT
    declared = send_head(portal["address"], API, f"Content-Length: {len(document)}", document)
    in_chunks = b"%x\r\n%s\r\n0\r\n\r\n" % (len(document), document)
    chunked = send_head(portal["address"], API, "Transfer-Encoding: chunked", in_chunks)

    for sock in (declared, chunked):
        status, body, _ = answer(sock)
        sock.close()
        assert status == 401 and body["error"]["code"] == "not_authenticated"


def test_it_takes_an_image_archive_larger_than_the_general_limit(portal: dict[str, Any]) -> None:
    archive = 4 * LIMIT  # above BULKHEAD_MAX_REQUEST_BYTES, within BULKHEAD_MAX_UPLOAD_BYTES
    api = send_head(portal["address"], "/api/v1/images/import/", f"Content-Length: {archive}", b"x" * archive)
    ui = send_head(portal["address"], "/images/import/", f"Content-Length: {archive}", b"x" * archive)
    beyond = send_head(portal["address"], "/api/v1/images/import/", f"Content-Length: {2 * UPLOAD_LIMIT}")

    api_status, api_body, _ = answer(api)
    ui_status, _, ui_headers = answer(ui)
    beyond_status, beyond_body, _ = answer(beyond)

    assert api_status == 401 and api_body["error"]["code"] == "not_authenticated"
    assert ui_status == 302 and ui_headers["location"].startswith("/login/")
    assert beyond_status == 413 and beyond_body["error"]["code"] == "request_too_large"
    for sock in (api, ui, beyond):
        sock.close()


def test_it_takes_a_hosts_backup_manifest_and_chunk_larger_than_the_general_limit(
    portal: dict[str, Any],
) -> None:
    size = 4 * LIMIT  # their views have limits of their own (256 MiB, 16 MiB)
    for path in (
        "/api/v1/hosts/self/backups/1/manifests/sha256:ab/",
        "/api/v1/hosts/self/backups/1/chunks/ab/",
    ):
        sock = send_head(portal["address"], path, f"Content-Length: {size}", b"x" * size)

        status, body, _ = answer(sock)
        sock.close()

        assert status == 401 and body["error"]["code"] == "not_authenticated"
