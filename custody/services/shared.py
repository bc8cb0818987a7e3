"""What API replicas share and may lose: rate limits, wake-ups, short locks. Redis, or this process.

Nothing here is the spend record, and nothing here can make a payment pass: the ledger
and its locks live in SQL. If Redis is down or slow, each operation degrades to this
process's own view within ``REDIS_TIMEOUT`` and the request goes on:

* rate limits count per process instead of across replicas;
* wake-ups reach only waiters in this process (waiters also look at the database on a
  short interval, so they answer late, never wrong);
* a short lock is taken locally only (the work it guards is already safe to run twice).

Without ``CUSTODY_REDIS_URL`` (the embedded default) the same in-process behaviour is the
design, not a degradation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator

from redis.asyncio import Redis

log = logging.getLogger("custody.shared")

REDIS_TIMEOUT = 0.25  # seconds: a paused Redis costs a request at most about this much
RETRY_REDIS_AFTER = 2.0  # after a failure, local only for this long before trying Redis again

# A fixed-window counter: INCR, set the expiry on the first hit, return the count and the TTL.
_RATE_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
"""
_UNLOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _LocalWindows:
    """Fixed-window counters for this process."""

    def __init__(self) -> None:
        self._windows: dict[str, tuple[int, int]] = {}

    def hit(self, key: str, limit: int, window: float) -> float | None:
        now = time.monotonic()
        slot = int(now // window)
        current_slot, count = self._windows.get(key, (slot, 0))
        if current_slot != slot:
            count = 0
        count += 1
        self._windows[key] = (slot, count)
        if len(self._windows) > 100_000:  # forget stale windows now and then
            self._windows = {k: v for k, v in self._windows.items() if v[0] == slot}
        if count <= limit:
            return None
        return (slot + 1) * window - now


class Shared:
    """Rate limits, wake-ups and short locks; through Redis when configured and answering."""

    def __init__(self, redis_url: str | None = None, prefix: str = "custody:") -> None:
        self.prefix = prefix
        self._url = redis_url
        self._redis: Redis | None = None
        self._down_until = 0.0
        self._local = _LocalWindows()
        self._events: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._local_locks: dict[str, float] = {}
        self._listener: asyncio.Task[None] | None = None
        # With wake-ups through Redis, waiters look at the database themselves only this often.
        self.redis_poll_interval = 1.0
        if redis_url:
            self._redis = Redis.from_url(
                redis_url,
                socket_timeout=REDIS_TIMEOUT,
                socket_connect_timeout=REDIS_TIMEOUT,
                health_check_interval=5,
                retry_on_timeout=False,
            )
            # Sent by their SHA-1 (EVALSHA), loaded again by redis-py if the server lost them.
            self._rate = self._redis.register_script(_RATE_SCRIPT)
            self._unlock = self._redis.register_script(_UNLOCK_SCRIPT)

    @property
    def configured(self) -> bool:
        return self._redis is not None

    def _usable(self) -> Redis | None:
        if self._redis is None or time.monotonic() < self._down_until:
            return None
        return self._redis

    def _failed(self, what: str, error: BaseException) -> None:
        if time.monotonic() >= self._down_until:
            log.warning("redis unavailable (%s: %s); using this process's own state", what, type(error).__name__)
        self._down_until = time.monotonic() + RETRY_REDIS_AFTER

    async def ping(self) -> str:
        """``ok``, ``unavailable`` or ``disabled`` (for /readyz)."""
        if self._redis is None:
            return "disabled"
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self._redis.ping()
        except Exception:
            return "unavailable"
        self._down_until = 0.0
        return "ok"

    # Rate limits ------------------------------------------------------------------------
    async def hit(self, key: str, limit: int, window: float = 60.0) -> float | None:
        """Count one request under ``key``; None if within ``limit`` per ``window``, else seconds to wait."""
        redis = self._usable()
        if redis is not None:
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    count, ttl = await self._rate(keys=[f"{self.prefix}rate:{key}"], args=[int(window * 1000)])
            except Exception as error:
                self._failed("rate limit", error)
            else:
                return None if int(count) <= limit else max(0.001, int(ttl) / 1000)
        return self._local.hit(key, limit, window)

    # Wake-ups ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen for wake-ups published by other replicas (no-op without Redis)."""
        if self._redis is not None and self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="custody-shared-listener")
            # Load the scripts now, so no request pays for it (a Redis that lost them gets them again on first use).
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    for script in (_RATE_SCRIPT, _UNLOCK_SCRIPT):
                        await self._redis.script_load(script)
            except Exception as error:
                self._failed("script load", error)

    async def _listen(self) -> None:
        assert self._redis is not None
        pattern = f"{self.prefix}wake:*"
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.psubscribe(pattern)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "pmessage":
                        channel = message["channel"]
                        name = channel.decode() if isinstance(channel, bytes) else str(channel)
                        self._wake_local(name.removeprefix(f"{self.prefix}wake:"))
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                raise
            except Exception as error:
                self._failed("wake-up listener", error)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                await asyncio.sleep(0.5)

    def _wake_local(self, name: str) -> None:
        for event in self._events.get(name, ()):
            event.set()

    async def wake(self, name: str) -> None:
        """Wake every waiter on ``name``, in this process and (through Redis) in the others."""
        self._wake_local(name)
        redis = self._usable()
        if redis is None:
            return
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                await redis.publish(f"{self.prefix}wake:{name}", b"1")
        except Exception as error:
            self._failed("wake-up", error)

    @contextlib.asynccontextmanager
    async def waiter(self, name: str) -> AsyncIterator[asyncio.Event]:
        """An event set by :meth:`wake`; register before checking the state, then wait on it."""
        event = asyncio.Event()
        self._events[name].add(event)
        try:
            yield event
        finally:
            self._events[name].discard(event)
            if not self._events[name]:
                del self._events[name]

    @property
    def poll_interval(self) -> float:
        """How often a waiter should also look at the database itself."""
        return self.redis_poll_interval if self._usable() is not None and self._listener is not None else 0.2

    # Short locks ------------------------------------------------------------------------
    async def try_lock(self, name: str, seconds: float) -> str | None:
        """Take ``name`` for at most ``seconds`` unless someone holds it; a token to unlock, or None."""
        token = secrets.token_hex(8)
        redis = self._usable()
        if redis is not None:
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    taken = await redis.set(
                        f"{self.prefix}lock:{name}", token, nx=True, px=max(1, math.ceil(seconds * 1000))
                    )
            except Exception as error:
                self._failed("lock", error)
            else:
                return token if taken else None
        now = time.monotonic()
        if self._local_locks.get(name, 0.0) > now:
            return None
        self._local_locks[name] = now + seconds
        return token

    async def unlock(self, name: str, token: str) -> None:
        self._local_locks.pop(name, None)
        redis = self._usable()
        if redis is None:
            return
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self._unlock(keys=[f"{self.prefix}lock:{name}"], args=[token])
        except Exception as error:
            self._failed("unlock", error)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
