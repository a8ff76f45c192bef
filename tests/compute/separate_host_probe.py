"""What a process on a separate test host can do, run inside that host's namespaces (nsenter).

  python -m tests.compute.separate_host_probe connect ADDRESS PORT   -> prints "open" or why not
  python -m tests.compute.separate_host_probe get PATH               -> the portal's status code for PATH,
      asked with the credential from the host's own var/agent.env (as its agent would, or an intruder on it)
  python -m tests.compute.separate_host_probe env-file               -> the settings file's mode and keys
  python -m tests.compute.separate_host_probe importable MODULE...   -> {module: true, or why not}

Prints one JSON line; the test reads it.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

ENV_FILE = Path(__file__).resolve().parents[2] / "var" / "agent.env"


def agent_env() -> dict[str, str]:
    pairs = (line.partition("=") for line in ENV_FILE.read_text().splitlines())
    return {key: value for key, sep, value in pairs if sep}


def connect(address: str, port: int) -> str:
    try:
        with socket.create_connection((address, port), timeout=2):
            return "open"
    except OSError as error:
        return type(error).__name__


def get(path: str) -> int:
    import httpx

    env = agent_env()
    headers = {"Authorization": f"Bearer {env['BULKHEAD_HOST_CREDENTIAL']}"}
    return httpx.get(env["BULKHEAD_PORTAL_URL"] + path, headers=headers, timeout=10).status_code


def importable(module: str) -> bool | str:
    """True, or why not (absent, or present but unable to load what it needs: either way not usable)."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return True


def main(argv: list[str]) -> None:
    verb, *args = argv
    if verb == "connect":
        answer: object = connect(args[0], int(args[1]))
    elif verb == "get":
        answer = get(args[0])
    elif verb == "env-file":
        answer = {"mode": ENV_FILE.stat().st_mode & 0o777, "keys": sorted(agent_env())}
    elif verb == "importable":
        answer = {module: importable(module) for module in args}
    else:
        raise SystemExit(f"unknown verb {verb}")
    print(json.dumps(answer))


if __name__ == "__main__":
    main(sys.argv[1:])
