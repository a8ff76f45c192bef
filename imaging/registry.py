"""A client of the OCI distribution API (pull only), careful about where it connects.

Policy (also in the README of the imaging app):

- The registry host must be in ``BULKHEAD_REGISTRY_ALLOWLIST`` (entries ``host`` = any port, or
  ``host:port``). An **empty allowlist disables pulls**, loopback included: a portal that fetches
  whatever URL a tenant names is a server-side request forgery tool, so the operator opts in.
- Bearer-token realms and redirects (blob storage) are connections too: their hosts must be
  allowlisted as well.
- Every name is resolved and *every* resolved address checked: link-local (169.254.0.0/16,
  fe80::/10), cloud metadata addresses, unspecified and multicast addresses are always refused. The
  connection then goes to the checked address (no second lookup an attacker's DNS could answer
  differently), with the original name in Host and TLS SNI/certificate checks.
- Plain http is used only for registries whose addresses are all loopback; everything else is https,
  verified against ``BULKHEAD_REGISTRY_CA_BUNDLE`` when set (else the system CAs).
- References must name their registry (``host[:port]/repo:tag`` or ``...@sha256:...``): there is
  no implicit Docker Hub.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from imaging import choices as c
from imaging.oci import DIGEST_RE, Descriptor, sha256_digest
from portal.errors import Explained

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

REPOSITORY_RE = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
HOST_RE = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?$")

BLOCKED_NETWORKS = [
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # link-local, incl. 169.254.169.254 (cloud metadata)
        "fe80::/10",  # IPv6 link-local
        "0.0.0.0/8",
        "::/128",
        "224.0.0.0/4",
        "ff00::/8",
        "255.255.255.255/32",
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "192.0.0.192/32",  # Oracle Cloud metadata
        "fd00:ec2::254/128",  # AWS metadata over IPv6
    )
]
METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data"})
MAX_REDIRECTS = 5


class RegistryError(Explained):
    """A pull cannot proceed: refused by policy, unreachable, unauthorized or malformed."""


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port] as written (host lowercased)
    host: str
    port: int | None
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f"@{self.digest}" if self.digest else f":{self.tag}")

    @property
    def name(self) -> str:
        """A default image name: the repository without its path."""
        return self.repository.rsplit("/", 1)[-1]


def split_host(registry: str) -> tuple[str, int | None]:
    if not HOST_RE.match(registry):
        raise RegistryError(f"{registry[:100]!r} is not a registry host[:port].")
    if registry.startswith("["):
        host, _, rest = registry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = registry.partition(":")
    if port and not 0 < int(port) < 65536:
        raise RegistryError(f"{registry[:100]!r} has an invalid port.")
    return host.lower(), int(port) if port else None


def parse_reference(text: str) -> Reference:
    """`host[:port]/repository[:tag][@sha256:...]`; the tag defaults to `latest`."""
    text = text.strip()
    registry, slash, rest = text.partition("/")
    if not slash or not rest or not ("." in registry or ":" in registry or registry == "localhost"):
        raise RegistryError("Name the registry in the reference: host[:port]/repository:tag.")
    host, port = split_host(registry)
    digest = None
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        if not DIGEST_RE.match(digest):
            raise RegistryError("Only sha256 digests are supported in references.")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, _, tag = rest.rpartition(":")
        if not TAG_RE.match(tag):
            raise RegistryError(f"{tag[:130]!r} is not a valid tag.")
    if not REPOSITORY_RE.match(rest) or len(rest) > 255:
        raise RegistryError(f"{rest[:100]!r} is not a valid repository name.")
    if tag is None and digest is None:
        tag = "latest"
    registry = f"[{host}]" if ":" in host else host
    if port is not None:
        registry += f":{port}"
    return Reference(registry=registry, host=host, port=port, repository=rest, tag=tag, digest=digest)


def host_allowed(host: str, port: int | None, allowlist: list[str]) -> bool:
    for entry in allowlist:
        try:
            ehost, eport = split_host(entry.strip())
        except RegistryError:
            continue
        if ehost == host.lower() and (eport is None or eport == port):
            return True
    return False


def address_refused(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in BLOCKED_NETWORKS)


def resolve(host: str, port: int) -> list[IPAddress]:
    """All addresses of a host, refusing the lot if any one is link-local or a metadata address."""
    if host in METADATA_NAMES:
        raise RegistryError(f"Connecting to {host} is not allowed.")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RegistryError(f"Cannot resolve {host}: {exc.strerror}") from None
    addresses: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address_refused(ip):
            raise RegistryError(f"{host} resolves to {ip}, a link-local or metadata address: refused.")
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise RegistryError(f"{host} has no address.")
    return addresses


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    address: IPAddress

    @property
    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = 80 if self.scheme == "http" else 443
        return name if self.port == default else f"{name}:{self.port}"

    def url(self, path_and_query: str) -> str:
        ip = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.scheme}://{ip}:{self.port}{path_and_query}"


def endpoint_for(host: str, port: int | None, allowlist: list[str], scheme: str | None = None) -> Endpoint:
    """Check a host against the allowlist and the address rules; pick scheme and address."""
    if not allowlist:
        raise RegistryError("Pulling is disabled: the operator has not allowed any registry.")
    if not host_allowed(host, port, allowlist):
        raise RegistryError(f"The registry {host}{f':{port}' if port else ''} is not in the allowlist.")
    addresses = resolve(host, port or 443)
    loopback = all(ip.is_loopback for ip in addresses)
    chosen = scheme or ("http" if loopback else "https")
    if chosen == "http" and not loopback:
        raise RegistryError(f"{host} is not a loopback registry: only https is allowed.")
    if chosen not in ("http", "https"):
        raise RegistryError(f"Unsupported URL scheme {chosen!r}.")
    return Endpoint(chosen, host, port or (80 if chosen == "http" else 443), addresses[0])


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class RegistryClient:
    """Pulls manifests and blobs of one repository. Use as a context manager."""

    def __init__(
        self,
        ref: Reference,
        *,
        username: str = "",
        password: str = "",
        allowlist: list[str],
        ca_bundle: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.ref = ref
        self.allowlist = allowlist
        self.endpoint = endpoint_for(ref.host, ref.port, allowlist)
        self._basic = (
            "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode() if username else ""
        )
        self._auth_header = ""
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
        self._http = httpx.Client(verify=verify, timeout=timeout, follow_redirects=False, trust_env=False)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._http.close()

    def _send(self, endpoint: Endpoint, path: str, headers: dict[str, str], stream: bool) -> httpx.Response:
        request = self._http.build_request(
            "GET",
            endpoint.url(path),
            headers={**headers, "Host": endpoint.host_header},
            extensions={"sni_hostname": endpoint.host} if endpoint.scheme == "https" else {},
        )
        try:
            return self._http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise RegistryError(f"Cannot reach {endpoint.host_header}: {exc}") from None

    def _token(self, params: dict[str, str]) -> str:
        realm = params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RegistryError("The registry named an invalid token realm.")
        endpoint = endpoint_for(parts.hostname, parts.port, self.allowlist, parts.scheme)
        query = {"scope": params.get("scope") or f"repository:{self.ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        path = (parts.path or "/") + "?" + "&".join(filter(None, [parts.query, urlencode(query)]))
        headers = {"Authorization": self._basic} if self._basic else {}
        response = self._send(endpoint, path, headers, stream=False)
        if response.status_code in (401, 403):
            raise RegistryError("The registry refused the credentials.")
        if response.status_code != 200:
            raise RegistryError(f"The token service answered {response.status_code}.")
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
        except ValueError:
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError("The token service returned no token.")
        return token

    def _get(self, path: str, headers: dict[str, str]) -> httpx.Response:
        """GET with the registry's auth challenge answered once and redirects checked hop by hop."""
        endpoint, target = self.endpoint, path
        authorized = False
        for _hop in range(MAX_REDIRECTS + 1):
            same_host = endpoint == self.endpoint
            auth = {"Authorization": self._auth_header} if self._auth_header and same_host else {}
            response = self._send(endpoint, target, {**headers, **auth}, stream=True)
            if response.status_code == 401 and same_host and not authorized:
                response.close()
                scheme, params = parse_challenge(response.headers.get("www-authenticate", ""))
                if scheme == "bearer":
                    self._auth_header = "Bearer " + self._token(params)
                elif scheme == "basic" and self._basic:
                    self._auth_header = self._basic
                else:
                    raise RegistryError("The registry requires credentials.")
                authorized = True
                continue
            if response.status_code == 401:
                response.close()
                raise RegistryError("The registry refused the credentials.")
            if response.status_code in (301, 302, 303, 307, 308):
                location = response.headers.get("location", "")
                response.close()
                parts = urlsplit(location)
                if parts.scheme or parts.netloc:
                    if not parts.hostname:
                        raise RegistryError("The registry redirected to an invalid URL.")
                    endpoint = endpoint_for(parts.hostname, parts.port, self.allowlist, parts.scheme)
                target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                continue
            return response
        raise RegistryError("The registry redirected too many times.")

    def _read_limited(self, response: httpx.Response, limit: int, what: str) -> bytes:
        data = bytearray()
        try:
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > limit:
                    raise RegistryError(f"The {what} is larger than {limit} bytes.")
        except httpx.HTTPError as exc:
            raise RegistryError(f"Reading the {what} failed: {exc}") from None
        finally:
            response.close()
        return bytes(data)

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index by tag or digest."""
        path = f"/v2/{self.ref.repository}/manifests/{reference}"
        response = self._get(path, {"Accept": c.MANIFEST_ACCEPT})
        if response.status_code == 404:
            response.close()
            raise RegistryError(f"{self.ref.registry}/{self.ref.repository}:{reference} was not found.")
        if response.status_code != 200:
            response.close()
            raise RegistryError(f"The registry answered {response.status_code} for the manifest.")
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        data = self._read_limited(response, c.MAX_JSON_BYTES, "manifest")
        digest = sha256_digest(data)
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"The registry sent a manifest that does not match {reference}.")
        return data, media_type, digest

    def blob_bytes(self, desc: Descriptor, limit: int) -> bytes:
        if desc.size > limit:
            raise RegistryError(f"The blob {desc.digest} is larger than {limit} bytes.")
        with self.blob(desc) as chunks:
            data = b"".join(chunks)
        if sha256_digest(data) != desc.digest:
            raise RegistryError(f"The registry sent content that does not match {desc.digest}.")
        return data

    @contextmanager
    def blob(self, desc: Descriptor) -> Iterator[Iterator[bytes]]:
        """The blob's bytes as chunks; stops with an error past the descriptor's size."""
        response = self._get(f"/v2/{self.ref.repository}/blobs/{desc.digest}", {})
        if response.status_code != 200:
            response.close()
            raise RegistryError(f"The registry answered {response.status_code} for blob {desc.digest}.")

        def chunks() -> Iterator[bytes]:
            seen = 0
            try:
                for chunk in response.iter_bytes(1024 * 1024):
                    seen += len(chunk)
                    if seen > desc.size:
                        raise RegistryError(f"The blob {desc.digest} is longer than its {desc.size} bytes.")
                    yield chunk
            except httpx.HTTPError as exc:
                raise RegistryError(f"Downloading {desc.digest} failed: {exc}") from None

        try:
            yield chunks()
        finally:
            response.close()
