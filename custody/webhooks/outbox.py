"""Webhooks for operators: a payment needs approval, was approved, rejected, or signed.

Events are written to an outbox table inside the same transaction as the change they
report, so none is lost and none is sent for a change that rolled back. A dispatcher task
in each API process delivers due rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so
replicas never send one twice at the same time), with:

* ``Custody-Signature: t=<unix time>,v1=<hex HMAC-SHA256(key, "<t>.<body>")>``,
  ``Custody-Event`` and ``Custody-Delivery`` (an id receivers can deduplicate on);
* retries with exponential backoff on anything but a 2xx, at most ``MAX_ATTEMPTS`` times,
  after which the delivery is marked ``failed`` (listed by the admin API).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import httpx
from sqlalchemy import Table, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from custody.errors import InvalidRequest, NotFound
from custody.storage.db import write_transaction
from custody.storage.types import as_utc
from custody.webhooks.models import DeliveryRow, WebhookRow

log = logging.getLogger("custody.webhooks")
webhooks: Table = WebhookRow.__table__  # type: ignore[attr-defined]
deliveries: Table = DeliveryRow.__table__  # type: ignore[attr-defined]
EVENTS: Final = frozenset({"payment.pending_approval", "payment.approved", "payment.rejected", "payment.signed"})
MAX_ATTEMPTS: Final = 8
MAX_BACKOFF: Final = timedelta(minutes=10)


def sign(key: str, timestamp: int, body: bytes) -> str:
    """The ``Custody-Signature`` header value for a body sent at ``timestamp``."""
    mac = hmac.new(key.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(key: str, header: str, body: bytes, *, tolerance: int = 300, now: int | None = None) -> bool:
    """Check a ``Custody-Signature`` header (for receivers; constant-time, with a replay window)."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else int(time.time())) - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(key, timestamp, body), f"t={timestamp},v1={parts.get('v1', '')}")


async def add_webhook(engine: AsyncEngine, url: str, events: list[str]) -> tuple[dict[str, Any], str]:
    if not url.startswith(("https://", "http://")):
        raise InvalidRequest("a webhook URL must be http(s)", field="url")
    unknown = sorted(set(events) - EVENTS)
    if unknown:
        raise InvalidRequest(f"unknown events: {', '.join(unknown)}", field="events")
    hook = {
        "id": "whk_" + secrets.token_hex(8),
        "url": url,
        "events": sorted(set(events)),
        "created_at": datetime.now(UTC),
    }
    key = "whsec_" + secrets.token_urlsafe(32)
    async with write_transaction(engine) as conn:
        await conn.execute(
            insert(webhooks).values(
                id=hook["id"],
                url=url,
                signing_key=key,
                events=json.dumps(hook["events"]),
                created_at=hook["created_at"],
            )
        )
    return _public(hook), key


def _public(hook: dict[str, Any]) -> dict[str, Any]:
    created = hook["created_at"]
    return {"id": hook["id"], "url": hook["url"], "events": hook["events"], "created_at": created.isoformat()}


async def list_webhooks(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(webhooks.c.id, webhooks.c.url, webhooks.c.events, webhooks.c.created_at))
        return [
            _public({"id": r.id, "url": r.url, "events": json.loads(r.events), "created_at": as_utc(r.created_at)})
            for r in rows
        ]


async def remove_webhook(engine: AsyncEngine, webhook_id: str) -> None:
    async with write_transaction(engine) as conn:
        # Its deliveries go with it: they reference the webhook row, and without its URL and key
        # none of them could be sent again (keeping them made every removal after a delivery fail).
        await conn.execute(deliveries.delete().where(deliveries.c.webhook_id == webhook_id))
        result = await conn.execute(webhooks.delete().where(webhooks.c.id == webhook_id))
    if result.rowcount != 1:
        raise NotFound("no such webhook")


async def list_deliveries(engine: AsyncEngine, status: str | None = None) -> list[dict[str, Any]]:
    query = select(deliveries).order_by(deliveries.c.created_at)
    if status is not None:
        query = query.where(deliveries.c.status == status)
    async with engine.connect() as conn:
        return [
            {
                "id": r.id,
                "webhook_id": r.webhook_id,
                "event": r.event,
                "status": r.status,
                "attempts": r.attempts,
                "last_error": r.last_error,
                "created_at": as_utc(r.created_at).isoformat(),
            }
            for r in await conn.execute(query)
        ]


_HOOKS = select(webhooks.c.id, webhooks.c.events)


async def enqueue(conn: AsyncConnection, event: str, data: dict[str, Any], now: datetime) -> int:
    """Queue ``event`` for every webhook that wants it, inside the caller's transaction.

    Returns how many deliveries were queued: the caller wakes the dispatcher (after its
    commit) only when there is something to deliver.
    """
    assert event in EVENTS
    rows = []
    for hook in await conn.execute(_HOOKS):
        wanted = json.loads(hook.events)
        if wanted and event not in wanted:
            continue
        delivery_id = "dlv_" + secrets.token_hex(10)
        payload = json.dumps({"id": delivery_id, "event": event, "created_at": now.isoformat(), "data": data})
        rows.append(
            {
                "id": delivery_id,
                "webhook_id": hook.id,
                "event": event,
                "payload": payload,
                "status": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
        )
    if rows:
        await conn.execute(insert(deliveries), rows)
    return len(rows)


class Dispatcher:
    """Delivers due outbox rows until stopped; one per API process."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        interval: float = 1.0,
        backoff: float = 2.0,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.engine = engine
        self.interval = interval
        self.backoff = backoff
        self.http = httpx.AsyncClient(timeout=timeout, transport=transport, follow_redirects=False)
        self.wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Let the current round finish (cancelling a database call midway can wedge the pool)."""
        self._stopping = True
        self.wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 10)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await self.http.aclose()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                while not self._stopping and await self.deliver_due() > 0:
                    pass
            except Exception as exc:  # the database may be down: try again later, never crash the API
                log.warning("webhook dispatch failed: %s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.interval)
            self.wake.clear()

    async def deliver_due(self, limit: int = 20) -> int:
        """Deliver up to ``limit`` due deliveries; returns how many were attempted."""
        now = datetime.now(UTC)
        async with self.engine.connect() as probe:  # a plain read first: no write lock while idle
            due_query = select(deliveries.c.id).where(
                deliveries.c.status == "pending", deliveries.c.next_attempt_at <= now
            )
            if (await probe.execute(due_query.limit(1))).first() is None:
                return 0
        async with write_transaction(self.engine) as conn:
            query = (
                select(deliveries, webhooks.c.url, webhooks.c.signing_key)
                .join(webhooks, webhooks.c.id == deliveries.c.webhook_id)
                .where(deliveries.c.status == "pending", deliveries.c.next_attempt_at <= now)
                .order_by(deliveries.c.next_attempt_at)
                .limit(limit)
            )
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True, of=deliveries)
            due = (await conn.execute(query)).all()
            # Claim them: push the next attempt out, so another process skips them meanwhile.
            for row in due:
                await conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id == row.id)
                    .values(next_attempt_at=now + timedelta(seconds=60))
                )
        results = await asyncio.gather(*(self._attempt(row) for row in due))
        async with write_transaction(self.engine) as conn:
            for row, error in zip(due, results, strict=True):
                attempts = row.attempts + 1
                if error is None:
                    values: dict[str, Any] = {"status": "delivered", "attempts": attempts, "last_error": None}
                elif attempts >= MAX_ATTEMPTS:
                    values = {"status": "failed", "attempts": attempts, "last_error": error}
                else:
                    delay = min(timedelta(seconds=self.backoff * 2 ** (attempts - 1)), MAX_BACKOFF)
                    values = {"attempts": attempts, "last_error": error, "next_attempt_at": datetime.now(UTC) + delay}
                await conn.execute(update(deliveries).where(deliveries.c.id == row.id).values(**values))
        return len(due)

    async def _attempt(self, row: Any) -> str | None:
        body = row.payload.encode()
        headers = {
            "Content-Type": "application/json",
            "Custody-Event": row.event,
            "Custody-Delivery": row.id,
            "Custody-Signature": sign(row.signing_key, int(time.time()), body),
        }
        try:
            response = await self.http.post(row.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}"
        return None if response.is_success else f"HTTP {response.status_code}"
