"""Adapter: the host's questions (`compute.host.rpc.WorkloadQueries`) answered by today's `compute.agent`
functions, which still take Workload rows. The row is a stand-in built from the portal's request (id,
runtime id, isolation, state) and the agent's own Host: nothing is read from the database.

To go when the agent's runtime functions take specs (issue 16, h14-spec): then the drivers implement
`WorkloadQueries` themselves.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from compute.host.rpc import Target
from compute.models import Host, Workload


class AgentQueries:
    def __init__(self, host: Host) -> None:
        self.host = host

    def _stand_in(self, target: Target) -> Workload:
        # Unsaved: never written, never refreshed; only the fields the runtime functions read.
        return Workload(
            id=uuid.UUID(target.workload_id),
            runtime_id=target.runtime_id,
            isolation=target.isolation,
            state=target.state,
            host=self.host,
        )

    def logs(self, target: Target, tail_bytes: int) -> bytes:
        from compute import agent

        return agent.logs(self._stand_in(target), tail_bytes)

    def output(self, target: Target, position: int | None) -> tuple[bytes, int]:
        from compute import agent

        return agent.output_since(self._stand_in(target), position)

    def stats(self, target: Target) -> dict[str, Any]:
        from compute import agent

        return agent.stats(self._stand_in(target))

    def changes(self, target: Target) -> list[dict[str, str]]:
        from compute import agent

        upper: Path = agent.upper_dir(self._stand_in(target))
        if not upper.is_dir():
            return []
        return [{"kind": c.kind, "path": c.path} for c in agent.store().changes(upper, list(target.diff_ids))]

    def open_console(self, target: Target) -> Any:
        """The micro-VM's serial console as a nonblocking libvirt stream (relayed by the agent)."""
        from compute.vm_agent import vm_runtime

        return vm_runtime(self.host).open_console(uuid.UUID(target.workload_id), nonblocking=True)
