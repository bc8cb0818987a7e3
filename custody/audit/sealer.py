"""Each API process chains queued audit records in the background (see custody.audit.log)."""

from __future__ import annotations

import contextlib

from custody.audit.log import AuditLog
from custody.runtime import Periodic


class Sealer(Periodic):
    """Calls :meth:`AuditLog.seal` every ``interval`` seconds until stopped, and once more at the end."""

    name = "custody-audit-sealer"

    def __init__(self, audit: AuditLog, interval: float) -> None:
        super().__init__(interval)
        self.audit = audit

    async def tick(self) -> None:
        await self.audit.seal()

    async def stop(self) -> None:
        await super().stop()
        # What this process queued last is chained now rather than by the next reader.
        with contextlib.suppress(Exception):
            await self.audit.seal()
