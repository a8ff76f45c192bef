"""`make agent PORTAL=... JOIN_TOKEN=...`: a new machine joins headless and starts its agent.

It probes its facts, redeems the single-use join token at the portal (which answers with the host's
id, queue and profile, its own credential and the broker's address; never a database URL), writes
them to var/agent.env and hands over to `python -m compute.host run` (no Django). Nothing on the host is
done by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def local_facts() -> dict[str, Any]:
    """Facts that need no database: the portal stores them; the agent refines them on start."""
    import platform
    import shutil

    from compute.runtimes import probe

    with open("/proc/meminfo") as f:
        mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    data_dir = _existing(Path(os.environ.get("BULKHEAD_DATA_DIR", ROOT / "var")))
    return {
        "cpus": os.cpu_count() or 1,
        "memory_mib": mem_kib // 1024,
        # Capacity approved at join (the operator's token): later reports may not exceed it.
        "disk_gib": shutil.disk_usage(data_dir).total // 1024**3,
        "kernel": platform.release(),
        "cgroup_mode": probe.cgroup_mode(),
    }


def _existing(path: Path) -> Path:
    """The data directory, or the nearest parent that exists (it is made when the agent starts)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def redeem(portal: str, token: str, facts: dict[str, Any], *, verify: str | bool = True) -> dict[str, Any]:
    response = httpx.post(
        f"{portal.rstrip('/')}/api/v1/hosts/join/",
        json={"token": token, "facts": facts},
        timeout=30,
        verify=verify,
    )
    if response.status_code != 201:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError):
            message = response.text[:200]
        raise SystemExit(f"The portal refused the join ({response.status_code}): {message}")
    return dict(response.json())


def write_env(path: Path, joined: dict[str, Any]) -> None:
    lines = [f"BULKHEAD_HOST_ID={joined['host']}", f"BULKHEAD_HOST_NAME={joined['name']}"]
    for key, value in sorted((joined.get("env") or {}).items()):
        # No database URL, whoever sends one: a host's agent reads and writes no row.
        if key.startswith(("BULKHEAD_", "REDIS_URL")) and "\n" not in str(value):
            lines.append(f"{key}={value}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 (not chmod'ed after writing): the settings hold credentials from the first byte.
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compute.join")
    parser.add_argument("--portal", required=True, help="the portal's URL, e.g. https://cloud.example.com")
    parser.add_argument("--token", required=True, help="the join token an operator copied from the portal")
    parser.add_argument("--ca-bundle", default=None, help="CA bundle for the portal's TLS certificate")
    parser.add_argument("--env-file", default=str(ROOT / "var" / "agent.env"))
    parser.add_argument("--no-start", action="store_true", help="register only; do not start the agent")
    args = parser.parse_args(argv)
    joined = redeem(args.portal, args.token, local_facts(), verify=args.ca_bundle or True)
    write_env(Path(args.env_file), joined)
    print(json.dumps({"host": joined["host"], "name": joined["name"], "queue": joined["queue"]}))
    if args.no_start:
        return 0
    os.execv(sys.executable, [sys.executable, "-m", "compute.host", "run", "--env-file", args.env_file])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
