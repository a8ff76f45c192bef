"""``bulkhead``: the command-line client of the portal's REST API.

Configuration from the environment: ``BULKHEAD_URL`` (the portal, e.g. https://cloud.example) and
``BULKHEAD_TOKEN`` (an API token); ``BULKHEAD_TENANT`` (name or id) when the token sees several tenants.

    bulkhead plan -f tenant.yaml          what applying the document would change (nothing is saved)
    bulkhead apply -f tenant.yaml [-m M]  save a revision, plan it, show the plan, apply it, follow it
    bulkhead diff [FROM [TO]]             text and resource diff between two revisions (default: last two)
    bulkhead diff -f tenant.yaml          the latest revision against a local file
    bulkhead export [-o FILE]             the tenant's current resources as a document (adoption)
    bulkhead status | mode off|monitor|autocorrect | revisions | rollback N
    bulkhead workloads list | logs NAME | stop NAME | start NAME
    bulkhead backups list [VOLUME] | create VOLUME | restore ID NAME | verify ID | delete ID
    bulkhead backups download ID -o FILE  the backup as one tar.zst
    bulkhead backups schedule VOLUME --every-hours H --keep N
    bulkhead volumes list | create NAME --size GIB | resize NAME --size GIB | delete NAME
    bulkhead volumes attach NAME WORKLOAD PATH [--read-only] | detach NAME WORKLOAD
    bulkhead volumes snapshot NAME SNAP | snapshots NAME | restore NAME SNAP | clone NAME SNAP NEW
    bulkhead secrets list | set NAME < value-file | delete NAME
                                          a secret's value is read from standard input, never an argument
                                          (arguments are visible to every user of the machine in `ps`)

Exit status: 0 success, 1 failure (invalid document, refused, failed operation), 2 usage errors.
"""

from __future__ import annotations

import argparse
import difflib
import http.client
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

SYMBOLS = {"create": "+", "update": "~", "replace": "-/+", "delete": "-", "keep": "!", "noop": " "}


# Most applies end within a second or two: ask every 50 ms for two seconds (a poll is a few ms of the
# portal's time), then back off to every half second.
FIRST_POLL_SECONDS = 0.05
FAST_POLLS_FOR_SECONDS = 2.0
POLL_SECONDS = 0.5
TIMEOUT_SECONDS = 60


class CliError(Exception):
    """A failure to report on stderr with exit status 1."""


class PortalError(CliError):
    """The portal answered with an error; ``field`` is the input it names, if any."""

    def __init__(self, message: str, status: int, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not followed: the token is never sent on to another address."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Client:
    """The portal's JSON API over the standard library (``urllib``): the CLI starts ~50 ms sooner than
    with httpx. Proxies from the environment (``http_proxy``, ``https_proxy``, ``no_proxy``), TLS
    verified against the system's trust store (``SSL_CERT_FILE``/``SSL_CERT_DIR`` honoured), no
    redirects followed; errors raise CliError with the API's message."""

    def __init__(self, url: str, token: str) -> None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise CliError(f"BULKHEAD_URL must be an http:// or https:// address, not {url!r}")
        self.base = url.rstrip("/") + "/api/v1/"
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        handlers: list[Any] = [_NoRedirects]
        if self.base.startswith("https:"):
            # One verifying context for the process (loading the trust store is the slow part).
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context()))
        self.opener = urllib.request.build_opener(*handlers)

    def _open(self, method: str, path: str, params: dict[str, Any] | None, body: Any) -> Any:
        url = self.base + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = dict(self.headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        # The scheme is http or https (checked in __init__), never file: or another opener's.
        request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310
        try:
            return self.opener.open(request, timeout=TIMEOUT_SECONDS)
        except urllib.error.HTTPError as error:
            with error:
                raise _portal_error(error.code, error.read()) from None
        except urllib.error.URLError as error:
            raise CliError(f"cannot reach the portal: {error.reason}") from None
        except (OSError, http.client.HTTPException) as error:
            raise CliError(f"cannot reach the portal: {error}") from None

    def request(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None
    ) -> Any:
        with self._open(method, path, params, json) as response:
            try:
                content = response.read()
            except (OSError, http.client.HTTPException) as error:
                raise CliError(f"cannot reach the portal: {error}") from None
        return _json.loads(content) if content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, json=body or {})

    def put(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("PUT", path, json=body)

    def download(self, path: str, output: str) -> None:
        """GET ``path`` into the file ``output`` a MiB at a time (the file is made once the portal agrees)."""
        try:
            response = self._open("GET", path, None, None)
        except PortalError as error:
            raise CliError(f"download refused ({error.status})") from None
        with response, open(output, "wb") as handle:
            while block := response.read(1 << 20):
                handle.write(block)


_json = json  # ``request`` takes a ``json`` argument (the body), as httpx's did


def _portal_error(status: int, content: bytes) -> PortalError:
    try:
        error = _json.loads(content).get("error", {})
    except (ValueError, AttributeError):
        text = content[:200].decode(errors="replace")
        return PortalError(f"HTTP {status}: {text}", status)
    lines = [f"{error.get('message', 'request failed')} (HTTP {status})"]
    for issue in error.get("issues", []):
        where = f"line {issue['line']}" if issue.get("line") else "document"
        lines.append(f"  {where}: {issue.get('path') or '(document)'}: {issue['message']}")
    fields = error.get("fields")
    field = next(iter(fields), None) if isinstance(fields, dict) else None
    return PortalError("\n".join(lines), status, field)


# --------------------------------------------------------------------------------------------------------
# Output


def render_plan(plan: dict[str, Any], out: TextIO) -> None:
    """Terraform-like: one line per change, field differences under it, a summary line."""
    steps = [step for step in plan["steps"] if step["action"] != "noop"]
    if not steps:
        out.write("No changes: the resources match the document.\n")
        return
    for step in steps:
        out.write(f"{SYMBOLS[step['action']]:>3} {step['key']}  ({step['action']}: {step['reason']})\n")
        for change in step.get("changes", []):
            before, after = json.dumps(change["before"]), json.dumps(change["after"])
            out.write(f"      {change['path']}: {before} -> {after}\n")
    summary = plan["summary"]
    kept = summary.get("keep", 0)
    out.write(
        f"Plan: {summary['create']} to create, {summary['update']} to update, "
        f"{summary['replace']} to replace, {summary['delete']} to delete"
        + (f", {kept} volume{'s' if kept != 1 else ''} kept" if kept else "")
        + ".\n"
    )


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror}") from None


# --------------------------------------------------------------------------------------------------------
# Commands


class Commands:
    def __init__(self, client: Client, tenant: str | None, out: TextIO, stdin: TextIO | None = None) -> None:
        self.client = client
        self.tenant_hint = tenant
        self.out = out
        self.stdin = stdin or sys.stdin
        self._tenant: dict[str, Any] | None = None

    @property
    def tenant(self) -> dict[str, Any]:
        """The tenant to act on: BULKHEAD_TENANT/--tenant (name or id), else the only one visible."""
        if self._tenant is None:
            tenants = self.client.get("tenants/", page_size=500)["results"]
            if self.tenant_hint:
                matches = [t for t in tenants if self.tenant_hint in (t["name"], str(t["id"]))]
            else:
                matches = tenants
            if len(matches) != 1:
                names = ", ".join(sorted(t["name"] for t in tenants)) or "none"
                raise CliError(f"say which tenant with --tenant or BULKHEAD_TENANT (visible: {names})")
            self._tenant = matches[0]
        return self._tenant

    def plan(self, args: argparse.Namespace) -> int:
        plan = self.client.post("desired/plans/", {"tenant": self.tenant["id"], "text": _read(args.file)})
        render_plan(plan["plan"], self.out)
        return 0

    def apply(self, args: argparse.Namespace) -> int:
        text = _read(args.file)
        if args.yes:
            return self._apply_at_once(text, args)
        revision = self.client.post(
            "desired/revisions/", {"tenant": self.tenant["id"], "text": text, "message": args.message or ""}
        )
        self.out.write(f"Revision {revision['number']} ({revision['author_label']}).\n")
        plan = self.client.post("desired/plans/", {"revision": revision["id"]})
        render_plan(plan["plan"], self.out)
        if all(step["action"] in ("noop", "keep") for step in plan["plan"]["steps"]):
            state = self.client.get(f"desired/{self.tenant['id']}/")
            if state["target_revision"] == revision["number"]:
                return 0
            # Nothing to change, but this revision becomes the one the reconciler keeps the tenant at.
            op = self.client.post(f"desired/plans/{plan['id']}/apply/")
            return self.follow(op, args.timeout)
        if not args.yes:
            if not sys.stdin.isatty():
                raise CliError("refusing to apply without confirmation: pass --yes")
            if input("Apply this plan? [y/N] ").strip().lower() not in ("y", "yes"):
                self.out.write("Not applied.\n")
                return 1
        op = self.client.post(f"desired/plans/{plan['id']}/apply/")
        return self.follow(op, args.timeout)

    def _apply_at_once(self, text: str, args: argparse.Namespace) -> int:
        """Nothing to confirm: save, plan and apply in one request (the portal decides, as ``apply``
        does without --yes, whether an unchanged plan still needs applying)."""
        body = {"text": text, "message": args.message or ""}
        if self.tenant_hint:
            body["tenant"] = self.tenant["id"]
        try:
            done = self.client.post("desired/apply/", body)
        except PortalError as error:
            if error.field != "tenant" or self.tenant_hint:
                raise
            body["tenant"] = self.tenant["id"]  # which tenant is unclear: say so as the other commands do
            done = self.client.post("desired/apply/", body)
        revision = done["revision"]
        self.out.write(f"Revision {revision['number']} ({revision['author_label']}).\n")
        render_plan(done["plan"]["plan"], self.out)
        if done["operation"] is None:
            return 0
        return self.follow(done["operation"], args.timeout)

    def follow(self, op: dict[str, Any], timeout: float, done: str = "Applied") -> int:
        """Print an operation's progress until it finishes; 0 when it succeeded."""
        deadline = time.monotonic() + timeout
        last = None
        interval = FIRST_POLL_SECONDS
        waited = 0.0
        while op["state"] not in ("succeeded", "failed", "cancelled"):
            line = f"[{op['progress']:3d}%] {op['message'] or op['state']}"
            if line != last:
                self.out.write(line + "\n")
                last = line
            if time.monotonic() > deadline:
                raise CliError(f"operation {op['id']} still {op['state']} after {timeout:.0f} s")
            time.sleep(interval)
            waited += interval
            if waited >= FAST_POLLS_FOR_SECONDS - 1e-9:  # forty 0.05 s waits are two seconds
                interval = min(interval * 2, POLL_SECONDS)
            op = self.client.get(f"operations/{op['id']}/")
        if op["state"] != "succeeded":
            raise CliError(f"operation {op['kind']} {op['state']}: {op['error']}")
        self.out.write(f"{done}: operation {op['id']} succeeded.\n")
        for step in op.get("result", {}).get("steps", []):
            self.out.write(f"  {step['key']}: {step['action']} {step['outcome']} {step['detail']}\n")
        return 0

    def _revisions(self) -> list[dict[str, Any]]:
        return list(
            self.client.get(
                "desired/revisions/", tenant=self.tenant["id"], ordering="-number", page_size=500
            )["results"]
        )

    def _revision(self, number: int) -> dict[str, Any]:
        found = self.client.get("desired/revisions/", tenant=self.tenant["id"], number=number)["results"]
        if not found:
            raise CliError(f"no revision {number}")
        return dict(found[0])

    def diff(self, args: argparse.Namespace) -> int:
        revisions = self._revisions()
        if args.file:
            if not revisions:
                raise CliError("the tenant has no revision yet")
            latest = revisions[0]
            diff = difflib.unified_diff(
                latest["text"].splitlines(keepends=True),
                _read(args.file).splitlines(keepends=True),
                fromfile=f"revision {latest['number']}",
                tofile=args.file,
            )
            self.out.write("".join(diff) or "No differences.\n")
            return 0
        if args.to is not None:
            new = self._revision(args.to)
        elif revisions:
            new = revisions[0]
        else:
            raise CliError("the tenant has no revision yet")
        params = {"against": str(args.source)} if args.source is not None else {}
        diff = self.client.get(f"desired/revisions/{new['id']}/diff/", **params)
        self.out.write(diff["diff"] or "No differences.\n")
        for step in diff["changes"]:
            self.out.write(f"{SYMBOLS[step['action']]:>3} {step['key']} ({step['reason']})\n")
        return 0

    def export(self, args: argparse.Namespace) -> int:
        document = self.client.get(f"desired/{self.tenant['id']}/export/")["document"]
        if args.output:
            with open(args.output, "w", encoding="utf-8") as handle:
                handle.write(document)
        else:
            self.out.write(document)
        return 0

    def status(self, args: argparse.Namespace) -> int:
        status = self.client.get(f"desired/{self.tenant['id']}/status/")
        self.out.write(
            f"mode {status['mode']}, revision {status['target_revision']}, "
            f"observed {status['observed_revision']}\n"
        )
        for condition in status["conditions"]:
            message = f": {condition['message']}" if condition.get("message") else ""
            self.out.write(f"  {condition['type']}={condition['status']} ({condition['reason']}){message}\n")
        return 0

    def mode(self, args: argparse.Namespace) -> int:
        state = self.client.request("PATCH", f"desired/{self.tenant['id']}/", json={"mode": args.mode})
        self.out.write(f"mode {state['mode']}\n")
        return 0

    def revisions(self, args: argparse.Namespace) -> int:
        for revision in self._revisions():
            self.out.write(
                f"{revision['number']:>5}  {revision['created_at'][:19]}  {revision['author_label']}  "
                f"{revision['message']}\n"
            )
        return 0

    def rollback(self, args: argparse.Namespace) -> int:
        revision = self._revision(args.number)
        new = self.client.post(
            f"desired/revisions/{revision['id']}/rollback/", {"message": args.message or ""}
        )
        self.out.write(f"Revision {new['number']} restores revision {args.number}; plan and apply it.\n")
        return 0

    def _workload(self, name: str) -> dict[str, Any]:
        found = self.client.get("workloads/", tenant=self.tenant["id"], name=name)["results"]
        if not found:
            raise CliError(f"no workload named {name!r}")
        return dict(found[0])

    def workloads(self, args: argparse.Namespace) -> int:
        if args.action == "list":
            rows = self.client.get("workloads/", tenant=self.tenant["id"], page_size=500)["results"]
            for row in rows:
                self.out.write(f"{row['name']:<30} {row['state']:<10} {row.get('isolation', '')}\n")
            return 0
        if not args.name:
            raise CliError(f"workloads {args.action} needs a NAME")
        workload = self._workload(args.name)
        if args.action == "logs":
            self.out.write(self.client.get(f"workloads/{workload['id']}/logs/")["logs"])
            return 0
        op = self.client.post(f"workloads/{workload['id']}/{args.action}/")
        if args.no_wait:
            self.out.write(f"{args.action} {args.name}: operation {op['id']} {op['state']}\n")
            return 0
        return self.follow(op, args.timeout, done=f"{args.action.capitalize()} {args.name}")

    def secrets(self, args: argparse.Namespace) -> int:
        found = self.client.get("secrets/", tenant=self.tenant["id"], page_size=500)["results"]
        if args.action == "list":
            for row in found:
                used = ", ".join(row["used_by"]) or "-"
                self.out.write(f"{row['name']:<30} set, updated {row['updated_at'][:19]}, used by {used}\n")
            return 0
        if not args.name:
            raise CliError(f"secrets {args.action} needs a NAME")
        existing = next((row for row in found if row["name"] == args.name), None)
        if args.action == "delete":
            if existing is None:
                raise CliError(f"no secret named {args.name!r}")
            self.client.request("DELETE", f"secrets/{existing['id']}/")
            self.out.write(f"Deleted secret {args.name}.\n")
            return 0
        value = self.stdin.read()
        # A value typed or piped ends with one newline that is not part of it.
        value = value[:-1] if value.endswith("\n") else value
        if not value:
            raise CliError("give the secret's value on standard input")
        if existing is None:
            self.client.post("secrets/", {"tenant": self.tenant["id"], "name": args.name, "value": value})
            self.out.write(f"Created secret {args.name}.\n")
        else:
            self.client.put(f"secrets/{existing['id']}/", {"value": value})
            self.out.write(
                f"Changed secret {args.name}; workloads using it get the value when they restart.\n"
            )
        return 0

    def _volume(self, name: str) -> dict[str, Any]:
        found = self.client.get("volumes/", tenant=self.tenant["id"], name=name)["results"]
        if not found:
            raise CliError(f"no volume named {name!r}")
        return dict(found[0])

    def backups(self, args: argparse.Namespace) -> int:
        """Backups of the tenant's volumes: list, create, restore into a new volume, verify, download."""
        if args.action == "list":
            params: dict[str, Any] = {"tenant": self.tenant["id"], "page_size": 500}
            if args.target:
                params["volume"] = self._volume(args.target)["id"]
            for row in self.client.get("backups/", **params)["results"]:
                ratio = f"{row['dedup_ratio']}x" if row["dedup_ratio"] else "all reused"
                self.out.write(
                    f"{row['id']}  {row['volume_name']:<20} {row['state']:<8} {row['created_at'][:19]}  "
                    f"{row['source_bytes']} B, {row['stored_bytes']} B stored, "
                    f"{row['new_bytes']} B new ({ratio})\n"
                )
            return 0
        if not args.target:
            raise CliError(f"backups {args.action} needs a volume name or backup id")
        if args.action == "create":
            volume = self._volume(args.target)
            op = self.client.post("backups/", {"volume": volume["id"]})
            return self.follow(op, args.timeout, done=f"Backed up {args.target}")
        if args.action == "schedule":
            volume = self._volume(args.target)
            row = self.client.post(
                "backup-schedules/",
                {"volume": volume["id"], "every_hours": args.every_hours, "keep_last": args.keep},
            )
            self.out.write(
                f"Backing up {args.target} every {row['every_hours']} h, keeping {row['keep_last']}.\n"
            )
            return 0
        path = f"backups/{args.target}/"
        if args.action == "delete":
            self.client.request("DELETE", path)
            self.out.write(f"Deleted backup {args.target}.\n")
            return 0
        if args.action == "restore":
            if not args.name:
                raise CliError("backups restore needs the NAME of the new volume")
            op = self.client.post(path + "restore/", {"name": args.name})
            return self.follow(op, args.timeout, done=f"Restored into {args.name}")
        if args.action == "verify":
            op = self.client.post(path + "verify/")
            code = self.follow(op, args.timeout, done="Verified")
            bad = self.client.get(f"operations/{op['id']}/")["result"].get("bad", [])
            if bad:
                raise CliError(f"{len(bad)} chunk(s) damaged or missing: {', '.join(bad[:5])}")
            return code
        if not args.output:
            raise CliError("backups download needs -o FILE")
        op = self.client.post(path + "export/")
        self.follow(op, args.timeout, done="Exported")
        url = self.client.get(f"operations/{op['id']}/")["result"]["download"].removeprefix("/api/v1/")
        self.client.download(url, args.output)
        self.out.write(f"Wrote {args.output}.\n")
        return 0

    def _volume_op(self, args: argparse.Namespace, op: dict[str, Any], done: str) -> int:
        if args.no_wait:
            self.out.write(f"{done}: operation {op['id']} {op['state']}\n")
            return 0
        return self.follow(op, args.timeout, done=done)

    def volumes(self, args: argparse.Namespace) -> int:
        """Volumes and their snapshots; operations are followed to the end unless --no-wait."""
        if args.action == "list":
            for row in self.client.get("volumes/", tenant=self.tenant["id"], page_size=500)["results"]:
                attached = ", ".join(f"{a['workload_name']}:{a['path']}" for a in row["attachments"]) or "-"
                used = row["used_bytes"] * 100 // max(row["size_bytes"], 1)
                self.out.write(
                    f"{row['name']:<24} {row['size_gib']:>5} GiB {used:>3}% used  {row['state']:<9} "
                    f"on {row['host_name']:<16} attached to {attached}\n"
                )
            return 0
        extra = list(args.args)
        if not args.name:
            raise CliError(f"volumes {args.action} needs a NAME")
        if args.action == "create":
            if not args.size:
                raise CliError("volumes create needs --size GIB")
            body = {"tenant": self.tenant["id"], "name": args.name, "size_gib": args.size}
            return self._volume_op(args, self.client.post("volumes/", body), f"Created volume {args.name}")
        volume = self._volume(args.name)
        url = f"volumes/{volume['id']}/"
        if args.action == "resize":
            if not args.size:
                raise CliError("volumes resize needs --size GIB")
            op = self.client.request("PATCH", url, json={"size_gib": args.size})
            return self._volume_op(args, op, f"Resized {args.name} to {args.size} GiB")
        if args.action == "delete":
            return self._volume_op(args, self.client.request("DELETE", url), f"Deleted volume {args.name}")
        if args.action in ("attach", "detach"):
            if len(extra) != (2 if args.action == "attach" else 1):
                raise CliError(
                    f"volumes {args.action} NAME WORKLOAD{' PATH' if args.action == 'attach' else ''}"
                )
            workload = self._workload(extra[0])
            if args.action == "attach":
                body = {"workload": workload["id"], "path": extra[1], "read_only": args.read_only}
                self.client.post(f"{url}attach/", body)
                self.out.write(
                    f"Attached {args.name} to {extra[0]} at {extra[1]} (mounted at its next start).\n"
                )
            else:
                self.client.post(f"{url}detach/", {"workload": workload["id"]})
                self.out.write(f"Detached {args.name} from {extra[0]}.\n")
            return 0
        if args.action == "snapshots":
            for snap in volume["snapshots"]:
                self.out.write(f"{snap['name']:<24} {snap['state']:<9} {snap['created_at'][:19]}\n")
            return 0
        if not extra:
            raise CliError(f"volumes {args.action} NAME SNAPSHOT")
        if args.action == "snapshot":
            op = self.client.post(f"{url}snapshot/", {"name": extra[0]})
            return self._volume_op(args, op, f"Snapshot {extra[0]} of {args.name}")
        snap = next((s for s in volume["snapshots"] if s["name"] == extra[0]), None)
        if snap is None:
            raise CliError(f"{args.name} has no snapshot named {extra[0]!r}")
        if args.action == "restore":
            op = self.client.post(f"snapshots/{snap['id']}/restore/", {})
            return self._volume_op(args, op, f"Restored {args.name} to {extra[0]}")
        if len(extra) != 2:
            raise CliError("volumes clone NAME SNAPSHOT NEW-NAME")
        op = self.client.post(f"snapshots/{snap['id']}/clone/", {"name": extra[1]})
        return self._volume_op(args, op, f"Cloned {extra[0]} into {extra[1]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bulkhead", description="Bulkhead portal client.")
    parser.add_argument("--tenant", default=os.environ.get("BULKHEAD_TENANT"), help="tenant name or id")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="show what applying a document would change")
    plan.add_argument("-f", "--file", required=True)
    apply = sub.add_parser("apply", help="save a document as a revision and apply it")
    apply.add_argument("-f", "--file", required=True)
    apply.add_argument("-m", "--message")
    apply.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    apply.add_argument("--timeout", type=float, default=600)
    diff = sub.add_parser("diff", help="diff two revisions, or the latest one and a file")
    diff.add_argument("source", nargs="?", type=int, help="older revision number (default: previous)")
    diff.add_argument("to", nargs="?", type=int, help="newer revision number (default: latest)")
    diff.add_argument("-f", "--file")
    export = sub.add_parser("export", help="the current resources as a document")
    export.add_argument("-o", "--output")
    sub.add_parser("status", help="reconciler mode and conditions")
    mode = sub.add_parser("mode", help="set the reconciler mode")
    mode.add_argument("mode", choices=["off", "monitor", "autocorrect"])
    sub.add_parser("revisions", help="list revisions")
    rollback = sub.add_parser("rollback", help="new revision from an old one")
    rollback.add_argument("number", type=int)
    rollback.add_argument("-m", "--message")
    workloads = sub.add_parser("workloads", help="list workloads, show logs, stop or start one")
    workloads.add_argument("action", choices=["list", "logs", "stop", "start"])
    workloads.add_argument("--no-wait", action="store_true", help="stop/start: do not wait for it to finish")
    workloads.add_argument("--timeout", type=float, default=120)
    workloads.add_argument("name", nargs="?")
    backups = sub.add_parser("backups", help="back volumes up, restore, verify and download backups")
    backups.add_argument(
        "action", choices=["list", "create", "restore", "verify", "download", "delete", "schedule"]
    )
    backups.add_argument("target", nargs="?", help="a volume name (list, create, schedule) or a backup id")
    backups.add_argument("name", nargs="?", help="restore: the new volume's name")
    backups.add_argument("-o", "--output", help="download: the file to write")
    backups.add_argument("--every-hours", type=int, default=24)
    backups.add_argument("--keep", type=int, default=7)
    backups.add_argument("--timeout", type=float, default=3600)
    volumes = sub.add_parser("volumes", help="volumes: create, attach, snapshot, restore, clone, delete")
    volumes.add_argument(
        "action",
        choices=[
            "list",
            "create",
            "resize",
            "delete",
            "attach",
            "detach",
            "snapshot",
            "snapshots",
            "restore",
            "clone",
        ],
    )
    volumes.add_argument("name", nargs="?")
    volumes.add_argument("args", nargs="*", help="WORKLOAD [PATH], SNAPSHOT [NEW-NAME]")
    volumes.add_argument("--size", type=int, help="size in GiB (create, resize)")
    volumes.add_argument("--read-only", action="store_true", help="attach read-only")
    volumes.add_argument("--no-wait", action="store_true", help="do not wait for the operation")
    volumes.add_argument("--timeout", type=float, default=300)
    secrets = sub.add_parser("secrets", help="list secrets, set one's value from standard input, delete one")
    secrets.add_argument("action", choices=["list", "set", "delete"])
    secrets.add_argument("name", nargs="?")
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    out: TextIO | None = None,
    stdin: TextIO | None = None,
) -> int:
    """Entry point of the ``bulkhead`` console script."""
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    url, token = os.environ.get("BULKHEAD_URL"), os.environ.get("BULKHEAD_TOKEN")
    if not url or not token:
        sys.stderr.write("bulkhead: set BULKHEAD_URL and BULKHEAD_TOKEN\n")
        return 2
    try:
        commands = Commands(Client(url, token), args.tenant, out, stdin)
        return int(getattr(commands, args.command)(args))
    except CliError as error:
        sys.stderr.write(f"bulkhead: {error}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
