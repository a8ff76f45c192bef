"""One host as its code sees it: the portal's link, the host's served profile and the machine's config.

`host_context(host_id)` is the only way host code learns about its host: the profile (runtime, network
labels) is asked from the portal (`GET hosts/self/`) and kept a few seconds; nothing is read from rows.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from compute.host import config
from compute.host.link import PortalLink, link_to_portal
from compute.host.spec import HostProfile, WorkloadSpec
from imaging.store import LayerStore

T = TypeVar("T")

Progress = Callable[..., None]

# A profile changes when an operator relabels a host: rarely. Read again after this many seconds.
PROFILE_SECONDS = 10.0


def noop_progress(percent: float, message: str = "", **_: Any) -> None:
    return None


@functools.lru_cache(maxsize=4)
def _store_at(root: str) -> LayerStore:
    Path(root).mkdir(parents=True, exist_ok=True)
    return LayerStore(root)


@dataclass
class HostContext:
    host_id: str
    local: config.LocalConfig
    _profile: HostProfile | None = None
    _read_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def link(self) -> PortalLink:
        return link_to_portal(self.host_id)  # asked each time: a forked worker child has its own client

    @property
    def profile(self) -> HostProfile:
        with self._lock:
            if self._profile is None or time.monotonic() - self._read_at > PROFILE_SECONDS:
                self._profile = HostProfile.parse(self.link.host_self())
                self._read_at = time.monotonic()
            return self._profile

    def forget_profile(self) -> None:
        with self._lock:
            self._profile = None

    @property
    def state_dir(self) -> Path:
        return self.local.host_state_dir(self.host_id)

    def store(self) -> LayerStore:
        return _store_at(str(self.local.store_dir))

    def spec(self, workload_id: Any) -> WorkloadSpec:
        """The workload's spec as the portal resolves it now (HostApiError 404: not on this host)."""
        return WorkloadSpec.parse(self.link.workload(workload_id))

    def specs(self) -> list[WorkloadSpec]:
        """The host's desired set: every workload placed on it."""
        return [WorkloadSpec.parse(data) for data in self.link.workloads()]

    def aside(self, name: str, work: Callable[[], T]) -> Future[T]:
        """Run `work` on a thread of its own: its result (or exception) in the future returned. An
        in-process link's database connection, opened by that thread, is closed when it ends."""
        done: Future[T] = Future()

        def run() -> None:
            try:
                done.set_result(work())
            except BaseException as error:  # handed to whoever waits for it
                done.set_exception(error)
            finally:
                thread_done = getattr(self.link, "thread_done", None)
                if thread_done is not None:
                    thread_done()

        threading.Thread(target=run, name=name, daemon=True).start()
        return done


_contexts: dict[str, HostContext] = {}
_contexts_lock = threading.Lock()


def host_context(host_id: Any) -> HostContext:
    """The context of host `host_id` in this process (one per host; the link registered at start)."""
    key = str(host_id)
    with _contexts_lock:
        context = _contexts.get(key)
        if context is None:
            context = _contexts[key] = HostContext(key, config.local())
        return context
