"""Supervising a machine's processes: start them, restart one that dies (and say so), stop them all in
reverse order on Ctrl-C or SIGTERM, or when one keeps dying.

Django-free: `make run` (portal/stack.py) and a joined host's `python -m compute.host run` both use it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if `make run` itself dies (even by SIGKILL), so that no
    worker, agent or Redis outlives the stack that owns it."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _popen(args: list[str], kwargs: dict[str, object]) -> subprocess.Popen[bytes]:
    # Own session: Ctrl-C reaches `make run` once and it stops the children in order.
    return subprocess.Popen(args, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)  # type: ignore[call-overload]


class Stack:
    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        # How each child was started, to start it again the same way when it dies.
        self._commands: dict[str, tuple[list[str], dict[str, object]]] = {}
        self._restarts: dict[str, list[float]] = {}

    def spawn(self, name: str, args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        # Own process group: Ctrl-C reaches us once and we stop the children in order.
        proc = _popen(args, kwargs)
        self.children.append((name, proc))
        self._commands[name] = (args, kwargs)
        return proc

    def restart_dead_children(self, now: float | None = None) -> list[str]:
        """Start again, in place, each child that exited; one line per restart saying so.

        A child that keeps dying (RESTART_LIMIT exits within RESTART_WINDOW_SECONDS) is not restarted:
        CrashLoop, so that `make run` stops with the reason rather than spinning.
        """
        now = time.monotonic() if now is None else now
        said = []
        for index, (name, proc) in enumerate(self.children):
            if proc.poll() is None:
                continue
            recent = [t for t in self._restarts.get(name, []) if now - t < RESTART_WINDOW_SECONDS]
            if len(recent) >= RESTART_LIMIT:
                raise CrashLoop(
                    f"{name} exited with {proc.returncode} {len(recent) + 1} times within "
                    f"{RESTART_WINDOW_SECONDS:.0f} s; not restarting it"
                )
            self._restarts[name] = [*recent, now]
            args, kwargs = self._commands[name]
            replacement = _popen(args, kwargs)
            self.children[index] = (name, replacement)
            said.append(f"{name} exited with {proc.returncode}; restarted it (pid {replacement.pid})")
        return said

    def stop(self) -> None:
        """Stop the children one by one, the last started first: the web server goes before the agent,
        and the agent (which stops the host's workloads) while Redis and the worker still answer."""
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_SECONDS.get(name, 15))
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in time; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()


class CrashLoop(RuntimeError):
    """A child died again and again: restarting it would only spin."""


RESTART_LIMIT = 5
RESTART_WINDOW_SECONDS = 60.0

# The agent stops every workload of the host (each with a short grace period) before it exits.
STOP_TIMEOUT_SECONDS = {"agent": 180}


def ensure_libvirtd_if_available() -> None:
    try:
        from compute.runtimes.libvirtd import ensure_libvirtd
    except ImportError:
        return
    ensure_libvirtd()


@dataclass
class StopSignal:
    """Whether SIGTERM or SIGINT came since `stop_signals` (a loop runs until it did)."""

    received: bool = False


def stop_signals() -> StopSignal:
    """A flag that SIGTERM and SIGINT set from now on, instead of ending the process at once: the
    supervisor and the agent loop stop what they run in order first."""
    flag = StopSignal()

    def on_signal(signum: int, _frame: object) -> None:
        flag.received = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return flag


def supervise(start: Callable[[Stack], str]) -> int:
    """Start processes with `start`, print its message, restart a child that dies (and say so), and stop
    them all on Ctrl-C or when a child keeps dying."""
    stack = Stack()
    stop = stop_signals()
    try:
        print(start(stack), flush=True)
        print("Press Ctrl-C to stop.\n", flush=True)
        while not stop.received:
            try:
                for line in stack.restart_dead_children():
                    print(line, file=sys.stderr, flush=True)
            except CrashLoop as crash:
                print(f"{crash}; stopping", file=sys.stderr, flush=True)
                stop.received = True
            time.sleep(0.5)
    finally:
        print("Stopping…", flush=True)
        stack.stop()
    return 0


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key and not key.startswith("#"):
            values[key.strip()] = value.strip()
    return values
