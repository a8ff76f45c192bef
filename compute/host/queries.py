"""The host's answers to the portal's questions about one workload (`compute.host.rpc.WorkloadQueries`):
logs, output, stats, captured changes and the micro-VM console, from the runtime drivers.

A question names its workload by the values the portal put in the request (`rpc.Target`: id, runtime id,
isolation, state, layer diff ids), already checked against this host's desired set by the answerer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from compute.host import agent
from compute.host.context import HostContext
from compute.host.rpc import Target


@dataclass(frozen=True)
class TargetWorkload:
    """What the drivers' read helpers use of a workload: its ids, isolation and state."""

    id: uuid.UUID
    runtime_id: str
    isolation: str
    state: str

    @classmethod
    def of(cls, target: Target) -> TargetWorkload:
        return cls(uuid.UUID(target.workload_id), target.runtime_id, target.isolation, target.state)


class SpecQueries:
    def __init__(self, ctx: HostContext) -> None:
        self.ctx = ctx

    def logs(self, target: Target, tail_bytes: int) -> bytes:
        return agent.logs(self.ctx, TargetWorkload.of(target), tail_bytes)

    def output(self, target: Target, position: int | None) -> tuple[bytes, int]:
        return agent.output_since(self.ctx, TargetWorkload.of(target), position)

    def stats(self, target: Target) -> dict[str, Any]:
        return agent.stats(self.ctx, TargetWorkload.of(target))

    def changes(self, target: Target) -> list[dict[str, str]]:
        return agent.changes(self.ctx, TargetWorkload.of(target), list(target.diff_ids))

    def open_console(self, target: Target) -> Any:
        """The micro-VM's serial console as a nonblocking libvirt stream (relayed by the agent)."""
        from compute.host.drivers.microvm import vm_runtime

        return vm_runtime(self.ctx).open_console(uuid.UUID(target.workload_id), nonblocking=True)
