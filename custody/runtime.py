"""Process-wide safety settings applied at start-up by the API, the signer and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import signal
import sys

SAFE_RECURSION_LIMIT = 1000


def restore_recursion_limit() -> None:
    """Undo py_ecc's import-time ``sys.setrecursionlimit(100000)``.

    py_ecc comes with eth-account. With its limit, a deeply nested JSON document overflows
    the C stack while parsing and kills the process; with the default limit the parser
    raises ``RecursionError``, which becomes a clear 400 or a protocol error.
    """
    import eth_account  # noqa: F401  (imports py_ecc, whose side effect is undone below)

    sys.setrecursionlimit(SAFE_RECURSION_LIMIT)


def die_with_parent() -> None:  # pragma: no cover - runs in a child between fork and exec
    """Ask Linux to SIGTERM this child process when its parent dies, however the parent dies.

    Used as ``preexec_fn`` for the processes we start (the signer under `custody serve`,
    `custody serve` under the demo). Elsewhere it does nothing: the parent stops them itself.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def freeze_startup_objects() -> None:
    """Keep what a server process holds at start-up out of every later garbage collection.

    The import graph (web3, eth-account, pydantic models, compiled statements) is a few
    hundred thousand objects that live as long as the process. Python's full collections
    walked all of them each time: measured under load, 60–120 ms in which the API or the
    signer answered nothing. ``gc.freeze`` moves every object alive now to a generation the
    collector never scans; what the process allocates later is collected as before. Call it
    once, after start-up, in a process that will serve for a long time (not in a test run:
    cyclic garbage among frozen objects is never freed).
    """
    gc.collect()
    gc.freeze()
    logging.getLogger("custody").info("%d start-up objects kept out of garbage collection", gc.get_freeze_count())


class Periodic:
    """A background task of an API process: :meth:`tick` every ``interval`` seconds until stopped.

    A tick that fails (a database outage, say) is logged by type and tried again at the next one.
    """

    name = "custody-periodic"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def tick(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as error:
                logging.getLogger("custody").warning("%s failed: %s", self.name, type(error).__name__)
            await asyncio.sleep(self.interval)
