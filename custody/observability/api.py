"""``GET /metrics`` and the HTTP middleware, installed on the app by :func:`install`."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client.exposition import choose_encoder
from sqlalchemy import func, or_, select

from custody.api.deps import Ctx, operator_bearer, problem_responses
from custody.observability.logging import RequestIdMiddleware
from custody.observability.metrics import HttpMetrics, Metrics
from custody.payments.ledger import payments
from custody.services import operators as operator_service
from custody.services.context import Context
from custody.settings import Settings


def install(app: FastAPI, settings: Settings) -> Metrics:
    """Add ``/metrics``, HTTP metrics and request ids to ``app`` (call after its other middleware)."""
    metrics = Metrics()
    app.state.metrics = metrics
    app.add_api_route(
        "/metrics",
        scrape,
        methods=["GET"],
        tags=["health"],
        summary="Metrics",
        response_class=Response,
        responses={**problem_responses(401), 200: {"content": {"text/plain": {}}}},
    )
    app.add_middleware(HttpMetrics, metrics=metrics)
    app.add_middleware(RequestIdMiddleware, access_log=settings.access_log)  # outermost: ids for everything
    return metrics


async def _scraper(
    ctx: Ctx, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(operator_bearer)]
) -> None:
    """Any operator token, unless CUSTODY_METRICS_PUBLIC=true."""
    if not ctx.settings.metrics_public:
        await operator_service.authenticate(ctx, credentials.credentials if credentials else None)


async def _pending_approvals(ctx: Context) -> int:
    now = datetime.now(UTC)
    async with ctx.engine.connect() as conn:
        count = await conn.scalar(
            select(func.count())
            .select_from(payments)
            .where(
                payments.c.status == "pending_approval",
                or_(payments.c.expires_at.is_(None), payments.c.expires_at > now),
            )
        )
    return int(count or 0)


async def refresh(ctx: Context) -> None:
    """Read what the gauges report: pending approvals, and whether the database and signer answer."""
    state = ctx.metrics.state
    pending, status = await asyncio.gather(
        asyncio.wait_for(_pending_approvals(ctx), ctx.settings.signer_timeout_seconds),
        ctx.signer.status(),
        return_exceptions=True,
    )
    state.database_up = isinstance(pending, int)
    state.pending_approvals = pending if isinstance(pending, int) else None
    state.signer_up = isinstance(status, dict)
    state.signer_sealed = bool(status.get("sealed")) if isinstance(status, dict) else None


async def scrape(request: Request, ctx: Ctx, _: Annotated[None, Depends(_scraper)]) -> Response:
    """Prometheus metrics (text exposition). Needs an operator token unless CUSTODY_METRICS_PUBLIC=true."""
    await refresh(ctx)
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(ctx.metrics.registry), media_type=content_type)
