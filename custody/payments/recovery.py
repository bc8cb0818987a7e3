"""The recovery sweep: every API process releases reservations that a crashed request left behind.

A payment is reserved, then signed within seconds. If the process handling it dies in
between, the reservation stays; once it is older than ``reservation_lease_seconds`` the
sweep releases it (status ``failed``, audit ``payment.interrupted``), exactly once, however
many replicas sweep at the same time (the release is conditional on the status).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from custody.payments.service import recover_interrupted
from custody.services.context import Context

log = logging.getLogger("custody.recovery")


class Sweeper:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        lease = ctx.settings.reservation_lease_seconds
        self.interval = min(30.0, max(0.2, lease / 4))
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="custody-recovery-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                # One replica sweeps per interval; if the lock is lost, two sweeps are still safe.
                if await self.ctx.shared.try_lock("recovery-sweep", self.interval) is None:
                    await asyncio.sleep(self.interval)
                    continue
                released = await recover_interrupted(self.ctx)
                if released:
                    log.warning("released %d reservation(s) left by interrupted requests", released)
            except Exception as error:  # a database outage: try again at the next tick
                log.warning("recovery sweep failed: %s", type(error).__name__)
            await asyncio.sleep(self.interval)
