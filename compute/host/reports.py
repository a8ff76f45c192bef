"""What a host tells the portal about a workload: conditional state changes through its link.

Every change is applied by the portal only from an expected state (a concurrent change wins and the
host moves on); the answer carries the row's state as it is now, which the host keeps in its view of
the spec (`WorkloadSpec.seen`) instead of reading a row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from compute.host import spec as s
from compute.host.context import HostContext, noop_progress
from compute.host.locks import workload_lock
from compute.host.spec import WorkloadSpec

log = logging.getLogger(__name__)
K = TypeVar("K")
M = TypeVar("M")

# States a workload is started from (a create, start, restart, or an exit its policy restarts).
RESUMABLE_STATES = [s.PENDING, s.STOPPED, s.FAILED, s.UNKNOWN]
NOW = "now"  # the portal's clock: a host cannot backdate a start or an end


def report(
    ctx: HostContext,
    spec: WorkloadSpec,
    expected: list[str],
    changes: dict[str, Any],
    *,
    never_started: bool = False,
    count_restart: bool = False,
) -> tuple[bool, WorkloadSpec]:
    """(applied, the spec as the row is now)."""
    answer = ctx.link.report_state(
        spec.id, list(expected), changes, never_started=never_started, count_restart=count_restart
    )
    return bool(answer.get("applied")), spec.seen(answer)


# A start's first report: the workload is being created (from any state a start begins in, or from a
# creation cut short: the caller holds the workload's lock, so a creation found half-done is taken over).
CREATING_FROM = [*RESUMABLE_STATES, s.CREATING]
CREATING_CHANGES: dict[str, Any] = {"state": s.CREATING, "status_message": ""}


def creating_report(*, first_start: bool) -> dict[str, Any]:
    """The `creating` report as a claim carries it (the portal applies it as `report` would)."""
    return {"expected": list(CREATING_FROM), "changes": dict(CREATING_CHANGES), "never_started": first_start}


def report_creating(ctx: HostContext, spec: WorkloadSpec, *, first_start: bool) -> tuple[bool, WorkloadSpec]:
    return report(ctx, spec, CREATING_FROM, CREATING_CHANGES, never_started=first_start)


def transition(ctx: HostContext, spec: WorkloadSpec, expected: list[str], **changes: Any) -> bool:
    return report(ctx, spec, expected, changes)[0]


def record_exit(
    ctx: HostContext, spec: WorkloadSpec, code: int | None, *, expected: list[str], requested: bool = False
) -> tuple[bool, WorkloadSpec]:
    """Record an exit: stopped when asked for or clean, failed otherwise."""
    state = s.STOPPED if requested or code == 0 else s.FAILED
    return report(
        ctx,
        spec,
        expected,
        {
            "state": state,
            "exit_code": code,
            "finished_at": NOW,
            "status_message": "" if state == s.STOPPED else f"exited with {code}",
        },
    )


def count_restart(ctx: HostContext, spec: WorkloadSpec) -> None:
    """One more restart by policy (the exit was just recorded: stopped or failed)."""
    ctx.link.report_state(spec.id, [s.STOPPED, s.FAILED], {}, count_restart=True)


def wants_restart(spec: WorkloadSpec, code: int | None) -> bool:
    if not spec.desired_running:
        return False
    if spec.restart_policy == s.ALWAYS:
        return True
    return spec.restart_policy == s.ON_FAILURE and code != 0


def record_ended(
    ctx: HostContext,
    ended: dict[K, M],
    placed: dict[K, WorkloadSpec],
    examined: dict[K, M],
    record: Callable[[WorkloadSpec], bool],
) -> list[K]:
    """A driver's round of ended workloads (id -> what marks this end): each one placed here that was
    running is recorded by `record` (True: handled) under its workload's lock; while an operation works
    on it (a create whose process has just exited, a stop) it is left to a later round, so the restart
    its policy wants is neither lost nor taken over. An end looked at once goes into `examined`: it is
    not asked about again. The ids handled."""
    handled = []
    for key, marker in ended.items():
        spec = placed.get(key)
        if spec is None or spec.state not in (s.RUNNING, s.UNKNOWN):
            examined[key] = marker
            continue
        with workload_lock(ctx, spec.id, blocking=False) as mine:
            if not mine:
                continue
            examined[key] = marker
            if record(spec):
                handled.append(key)
    return handled


def restart_if_wanted(
    ctx: HostContext,
    seen: WorkloadSpec,
    code: int | None,
    start: Callable[[HostContext, WorkloadSpec, Any], Any],
) -> None:
    """After an exit was recorded: count a restart and start it again when its policy says so (a failed
    start is logged; the row says what the start reported)."""
    if not wants_restart(seen, code):
        return
    count_restart(ctx, seen)
    try:
        start(ctx, seen, noop_progress)
    except Exception:
        log.exception("restart of %s failed", seen.id)


def report_removed(ctx: HostContext, spec: WorkloadSpec) -> None:
    """Everything of a workload being deleted is gone from this host: the portal drops the row."""
    ctx.link.report_removed(spec.id)
