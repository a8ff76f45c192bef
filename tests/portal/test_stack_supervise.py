"""`make run` restarts a child that died (and says so) instead of stopping the whole portal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from compute.host.supervisor import RESTART_LIMIT, CrashLoop, Stack
from tests.processes import wait_until

BASE_DIR = Path(__file__).resolve().parent.parent.parent

# A supervisor whose only child is a long sleep named "redis"; it prints the child's pid when started.
SUPERVISOR = """
import sys
from compute.host.supervisor import supervise

def start(stack):
    proc = stack.spawn("redis", ["sleep", "600"])
    return f"child {proc.pid}"

sys.exit(supervise(start))
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_it_restarts_a_child_killed_with_sigkill_and_says_so() -> None:
    stack = Stack()
    try:
        first = stack.spawn("worker", ["sleep", "600"])
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        said = stack.restart_dead_children()
        assert said and "worker exited with -9; restarted" in said[0]
        (name, second), *_ = stack.children
        assert name == "worker" and second.pid != first.pid and _alive(second.pid)
        assert stack.restart_dead_children() == []  # a live child is left alone
    finally:
        stack.stop()


def test_it_gives_up_on_a_child_that_keeps_dying() -> None:
    stack = Stack()
    try:
        stack.spawn("beat", ["false"])
        with pytest.raises(CrashLoop):
            for _ in range(RESTART_LIMIT + 1):
                stack.children[0][1].wait()
                stack.restart_dead_children()
    finally:
        stack.stop()


def test_make_runs_supervisor_keeps_the_portal_up_when_a_child_dies() -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR],
        cwd=BASE_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert supervisor.stdout is not None and supervisor.stderr is not None
        line = supervisor.stdout.readline()
        while not line.startswith("child "):
            line = supervisor.stdout.readline()
        child = int(line.split()[1])
        os.kill(child, signal.SIGKILL)
        said = supervisor.stderr.readline()
        assert "redis exited with -9; restarted it" in said, said
        assert supervisor.poll() is None  # the portal did not stop
        restarted = int(said.rsplit("pid ", 1)[1].rstrip(")\n"))
        wait_until(lambda: _alive(restarted), timeout=10, what="the restarted child runs")
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=30)
    # Stopping the portal stops the restarted child too.
    wait_until(lambda: not _alive(restarted), timeout=10, what="the restarted child stops with the portal")
