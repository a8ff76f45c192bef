"""One driver per isolation, selected once (`driver_for`): the runtime side of every workload verb.

A driver turns a spec into a running workload and reports every state change through the host's link;
the caller (a host task or the agent loop) holds the workload's lock (`compute.host.agent.workload_lock`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from compute.host.context import HostContext, Progress
from compute.host.spec import MICROVM, NAMESPACE, WorkloadSpec


@dataclass
class CreatedAhead:
    """A workload created (not started) from the spec its create's message carried, while the portal
    answered the claim (`Driver.create_ahead`). `handled`: given to `ensure_running`, which started it
    (the claim's spec agreed) or removed it; otherwise the task removes it (`Driver.discard_ahead`)."""

    sent: WorkloadSpec  # the message's spec it was made from
    isolation: str
    made: Any  # what the driver made of it (compared with what the claim's spec would make)
    network: Any = None  # the network it was attached to, if any
    handled: bool = False


class Driver(Protocol):
    isolation: str

    def ensure_running(
        self,
        ctx: HostContext,
        spec: WorkloadSpec,
        progress: Progress,
        *,
        first_start: bool = False,
        creating_reported: bool = False,
        ahead: CreatedAhead | None = None,
    ) -> str:
        """Create (if needed) and start the workload; the resulting state. `creating_reported`: the
        operation's claim carried the `creating` report and it applied (the driver does not send it).
        `ahead`: what `create_ahead` made under the caller's lock; started if the spec agrees, else
        removed."""
        ...

    def create_ahead(self, ctx: HostContext, sent: WorkloadSpec) -> CreatedAhead | None:
        """Before the claim is answered, create (never start, never report) the workload from the spec
        the message carried, where that changes nothing else on the host; None when nothing was made."""
        ...

    def discard_ahead(self, ctx: HostContext, ahead: CreatedAhead) -> None:
        """Remove what `create_ahead` made (it never ran: nothing to keep)."""
        ...

    def stop(self, ctx: HostContext, spec: WorkloadSpec, grace_seconds: float) -> None: ...

    def remove(self, ctx: HostContext, spec: WorkloadSpec, grace_seconds: float) -> None:
        """Everything of the workload gone from this host (its captured changes too)."""
        ...

    def shut_down(self, ctx: HostContext, spec: WorkloadSpec, grace_seconds: float) -> None:
        """Stopped for a host shutdown: runtime state removed, captured changes kept."""
        ...

    def resync(self, ctx: HostContext, specs: list[WorkloadSpec], report: dict[str, list[str]]) -> None:
        """After an agent (re)start: adopt, record, remove orphans, finish what was cut short."""
        ...

    def handle_exits(self, ctx: HostContext) -> list[str]:
        """Record what exited since the last round; restart per policy."""
        ...

    def logs(self, ctx: HostContext, spec: Any, tail_bytes: int) -> bytes: ...

    def output_since(self, ctx: HostContext, spec: Any, position: int | None) -> tuple[bytes, int]: ...

    def stats(self, ctx: HostContext, spec: Any) -> dict[str, Any]: ...

    def upper_dir(self, ctx: HostContext, spec: Any) -> Path: ...

    def upper_id_shift(self, ctx: HostContext, spec: Any) -> tuple[int, int] | None: ...


def driver_for(isolation: str) -> Driver:
    """The driver of an isolation (one instance per process)."""
    if isolation == NAMESPACE:
        from compute.host.drivers.container import CONTAINERS

        return CONTAINERS
    if isolation == MICROVM:
        from compute.host.drivers.microvm import MICROVMS

        return MICROVMS
    raise ValueError(f"no driver for isolation {isolation!r}")


def all_drivers() -> list[Driver]:
    return [driver_for(NAMESPACE), driver_for(MICROVM)]
