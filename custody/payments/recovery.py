"""The recovery sweep: every API process releases reservations that a crashed request left behind.

A payment now commits with its signature, so a crash leaves nothing behind. Earlier versions
reserved, committed, then signed: a process that died in between left the reservation, and
a database they wrote may still hold one. Once it is older than ``reservation_lease_seconds``
the sweep releases it (status ``failed``, audit ``payment.interrupted``), exactly once,
however many replicas sweep at the same time (the release is conditional on the status).
"""

from __future__ import annotations

import logging

from custody.payments.service import recover_interrupted
from custody.runtime import Periodic
from custody.services.context import Context

log = logging.getLogger("custody.recovery")


class Sweeper(Periodic):
    name = "custody-recovery-sweep"

    def __init__(self, ctx: Context) -> None:
        super().__init__(min(30.0, max(0.2, ctx.settings.reservation_lease_seconds / 4)))
        self.ctx = ctx

    async def tick(self) -> None:
        # One replica sweeps per interval; if the lock is lost, two sweeps are still safe.
        if await self.ctx.shared.try_lock("recovery-sweep", self.interval) is None:
            return
        released = await recover_interrupted(self.ctx)
        if released:
            log.warning("released %d reservation(s) left by interrupted requests", released)
