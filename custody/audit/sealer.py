"""Each API process chains queued audit records in the background (see custody.audit.log)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from custody.audit.log import AuditLog

log = logging.getLogger("custody.audit")


class Sealer:
    """Calls :meth:`AuditLog.seal` every ``interval`` seconds until stopped."""

    def __init__(self, audit: AuditLog, interval: float) -> None:
        self.audit = audit
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="custody-audit-sealer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # What this process queued last is chained now rather than by the next reader.
        with contextlib.suppress(Exception):
            await self.audit.seal()

    async def _run(self) -> None:
        while True:
            try:
                await self.audit.seal()
            except Exception as error:  # an outage: the records wait, committed, for the next tick
                log.warning("audit sealing failed: %s", type(error).__name__)
            await asyncio.sleep(self.interval)
