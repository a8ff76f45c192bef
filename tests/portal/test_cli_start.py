"""The `bulkhead` CLI starts light, speaks to the portal as a careful HTTP client (proxies, TLS, no
redirects), applies with one request when nothing needs confirming, and notices a finished operation soon
after it ends. The portal here is a real HTTP server on 127.0.0.1 that answers what each test says."""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from portal import cli

ROOT = Path(__file__).resolve().parents[2]

Answer = tuple[int, dict[str, str], bytes]


@dataclass
class Seen:
    method: str
    path: str  # as on the request line (a proxy sees the whole URL)
    headers: dict[str, str]
    body: Any


@dataclass
class Stub:
    url: str
    seen: list[Seen] = field(default_factory=list)


def json_answer(body: Any, status: int = 200) -> Answer:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


@pytest.fixture
def serve() -> Iterator[Callable[..., Stub]]:
    """Start HTTP(S) servers on 127.0.0.1 answering with ``answer(Seen)``; all stopped at the end."""
    servers: list[ThreadingHTTPServer] = []

    def start(answer: Callable[[Seen], Answer], tls: ssl.SSLContext | None = None) -> Stub:
        stub = Stub("")

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                seen = Seen(self.command, self.path, dict(self.headers), json.loads(raw) if raw else None)
                stub.seen.append(seen)
                status, headers, body = answer(seen)
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_one

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        stub.url = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
        return stub

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def run_cli(monkeypatch: pytest.MonkeyPatch, url: str, *argv: str) -> tuple[int, str]:
    monkeypatch.setenv("BULKHEAD_URL", url)
    monkeypatch.setenv("BULKHEAD_TOKEN", "bht_secret")
    monkeypatch.delenv("BULKHEAD_TENANT", raising=False)
    out = io.StringIO()
    return cli.main(list(argv), out=out), out.getvalue()


@pytest.fixture(autouse=True)
def no_proxy_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def test_it_starts_the_cli_without_loading_celery_or_httpx() -> None:
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, portal.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in"
            " ('celery', 'httpx', 'httpcore')))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(loaded.stdout.replace("'", '"')) == []


def test_it_still_gives_the_worker_its_celery_app_through_the_package() -> None:
    from celery.app.utils import find_app

    import portal
    from portal.celery import app

    assert find_app("portal") is app  # what `celery -A portal worker|beat` resolves
    assert portal.celery_app is app


def test_it_asks_every_50_ms_for_two_seconds_then_backs_off_to_every_half_second(
    monkeypatch: pytest.MonkeyPatch, serve: Callable[..., Stub]
) -> None:
    answers = iter(["running"] * 45 + ["succeeded"])
    waits: list[float] = []
    portal = serve(
        lambda seen: json_answer(
            {"id": "op-1", "kind": "desired.apply", "state": next(answers), "progress": 50, "message": ""}
        )
    )
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    commands = cli.Commands(cli.Client(portal.url, "token"), None, io.StringIO())
    started: dict[str, Any] = {
        "id": "op-1",
        "kind": "desired.apply",
        "state": "queued",
        "progress": 0,
        "message": "",
    }
    assert commands.follow(started, timeout=60) == 0
    # An apply that ends at 0.3 s is seen by 0.35 s, not at the next doubling (0.05 + 0.1 + 0.2 = 0.35,
    # then 0.75 s); after two seconds the portal is asked less often.
    assert waits[:40] == [0.05] * 40
    assert waits[40:] == [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    assert {seen.path for seen in portal.seen} == {"/api/v1/operations/op-1/"}
    assert portal.seen[0].headers["Authorization"] == "Bearer token"


APPLIED = {
    "revision": {"id": "rev-1", "number": 3, "author_label": "alice (token bench)"},
    "revision_created": True,
    "plan": {
        "id": "plan-1",
        "plan": {
            "steps": [{"action": "create", "key": "workload/web", "reason": "declared, does not exist"}],
            "summary": {"create": 1, "update": 0, "replace": 0, "delete": 0},
        },
    },
    "operation": {"id": "op-1", "kind": "desired.apply", "state": "queued", "progress": 0, "message": ""},
}


def test_it_applies_with_yes_in_one_request_and_follows_the_operation(
    monkeypatch: pytest.MonkeyPatch, serve: Callable[..., Stub], tmp_path: Path
) -> None:
    def answer(seen: Seen) -> Answer:
        if seen.path == "/api/v1/desired/apply/":
            return json_answer(APPLIED, 202)
        return json_answer({**APPLIED["operation"], "state": "succeeded", "result": {"steps": []}})

    portal = serve(answer)
    document = tmp_path / "app.yaml"
    document.write_text("apiVersion: bulkhead/v1\n")
    code, output = run_cli(monkeypatch, portal.url, "apply", "--yes", "-f", str(document), "-m", "go")
    assert code == 0, output
    assert [(seen.method, seen.path) for seen in portal.seen] == [
        ("POST", "/api/v1/desired/apply/"),
        ("GET", "/api/v1/operations/op-1/"),
    ]
    assert portal.seen[0].body == {"text": "apiVersion: bulkhead/v1\n", "message": "go"}
    assert output.splitlines()[:3] == [
        "Revision 3 (alice (token bench)).",
        "  + workload/web  (create: declared, does not exist)",
        "Plan: 1 to create, 0 to update, 0 to replace, 0 to delete.",
    ]
    assert "Applied: operation op-1 succeeded." in output


def test_it_names_the_visible_tenants_when_the_portal_cannot_tell_which_one(
    monkeypatch: pytest.MonkeyPatch, serve: Callable[..., Stub], tmp_path: Path, capsys: Any
) -> None:
    def answer(seen: Seen) -> Answer:
        if seen.path == "/api/v1/desired/apply/":
            error = {"code": "invalid", "message": "Say which tenant.", "fields": {"tenant": ["Say which."]}}
            return json_answer({"error": error}, 400)
        return json_answer({"results": [{"id": "t1", "name": "acme"}, {"id": "t2", "name": "globex"}]})

    portal = serve(answer)
    document = tmp_path / "app.yaml"
    document.write_text("spec: {}\n")
    code, _ = run_cli(monkeypatch, portal.url, "apply", "--yes", "-f", str(document))
    assert code == 1
    assert (
        "say which tenant with --tenant or BULKHEAD_TENANT (visible: acme, globex)" in capsys.readouterr().err
    )


def test_it_neither_follows_a_redirect_nor_sends_the_token_on(
    monkeypatch: pytest.MonkeyPatch, serve: Callable[..., Stub], capsys: Any
) -> None:
    elsewhere = serve(lambda seen: json_answer({"results": []}))
    portal = serve(lambda seen: (302, {"Location": f"{elsewhere.url}{seen.path}"}, b""))
    code, _ = run_cli(monkeypatch, portal.url, "workloads", "list")
    assert code == 1
    assert "HTTP 302" in capsys.readouterr().err
    assert elsewhere.seen == []


def test_it_goes_through_the_proxy_named_in_the_environment_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch, serve: Callable[..., Stub]
) -> None:
    tenants = {"results": [{"id": "t1", "name": "acme"}]}
    proxy = serve(lambda seen: json_answer(tenants if "/tenants/" in seen.path else {"results": []}))
    monkeypatch.setenv("http_proxy", proxy.url)
    code, _ = run_cli(monkeypatch, "http://portal.invalid", "workloads", "list")
    assert code == 0
    assert proxy.seen[0].path.startswith("http://portal.invalid/api/v1/tenants/?")
    assert proxy.seen[0].headers["Authorization"] == "Bearer bht_secret"

    portal = serve(lambda seen: json_answer(tenants if "/tenants/" in seen.path else {"results": []}))
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    before = len(proxy.seen)
    assert run_cli(monkeypatch, portal.url, "workloads", "list")[0] == 0
    assert len(proxy.seen) == before and len(portal.seen) == 2


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "portal.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "portal.pem", tmp_path / "portal.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_it_refuses_a_portal_whose_certificate_it_does_not_trust(
    monkeypatch: pytest.MonkeyPatch, serve: Callable[..., Stub], tmp_path: Path, capsys: Any
) -> None:
    cert, key = self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    tenants = {"results": [{"id": "t1", "name": "acme"}]}
    portal = serve(
        lambda seen: json_answer(tenants if "/tenants/" in seen.path else {"results": []}), tls=tls
    )
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the system's trust store only
    code, _ = run_cli(monkeypatch, portal.url, "workloads", "list")
    assert code == 1 and "cannot reach the portal" in capsys.readouterr().err
    assert portal.seen == []
    # Trusted (the operator's CA bundle, as OpenSSL reads it): the same portal answers.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    assert run_cli(monkeypatch, portal.url, "workloads", "list")[0] == 0
    assert len(portal.seen) == 2


def test_it_refuses_a_portal_address_that_is_not_http(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    code, _ = run_cli(monkeypatch, "file:///etc/passwd", "workloads", "list")
    assert code == 1 and "http:// or https://" in capsys.readouterr().err
