"""A thread that does one small thing every few seconds while a block of work runs (operation heartbeats)."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class PeriodicThread:
    """Calls `tick()` every `interval()` seconds from a daemon thread while the `with` block runs, and
    `finish()` in that thread when it ends (its own resources, e.g. a database connection). A tick that
    raises ends the beats (logged); the work in the block goes on."""

    def __init__(self, name: str) -> None:
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> PeriodicThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)

    def interval(self) -> float:
        raise NotImplementedError

    def tick(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        return None

    def _run(self) -> None:
        try:
            while not self.stopped.wait(self.interval()):
                self.tick()
        except Exception:
            log.exception("%s stopped", self.thread.name)
        finally:
            self.finish()
