"""Application factory: ``create_app(settings)``; nothing global."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from custody import __version__
from custody.api import admin_routes, agent_routes, problems
from custody.api.deps import Admin, AnyOperator, Ctx, WalletId, problem_responses
from custody.audit.sealer import Sealer
from custody.errors import CustodyError
from custody.observability import api as observability
from custody.payments.recovery import Sweeper
from custody.runtime import restore_recursion_limit
from custody.schemas import WalletCreate, WalletList, WalletOut
from custody.services import wallets as wallet_service
from custody.services.context import Context
from custody.settings import Settings
from custody.webhooks.outbox import Dispatcher

log = logging.getLogger("custody.api")
_PROBLEMS = problem_responses(400, 401, 403, 404, 409, 413, 503)


class Health(BaseModel):
    status: str
    version: str


class Readiness(BaseModel):
    status: str
    database: str
    signer: str
    redis: str


_NOT_READY = _PROBLEMS | {503: {"model": Readiness, "description": "Not ready: the same fields, saying what is down."}}


def create_app(settings: Settings, *, background: bool = True, started: Callable[[], None] | None = None) -> FastAPI:
    """The application; ``background=False`` (the CLI's in-process use) runs no webhook dispatcher.

    ``started`` is called once the application has started, before it serves a request.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.require_safe("api")
        ctx = await Context.open(settings)
        app.state.ctx = ctx
        ctx.metrics = app.state.metrics
        dispatcher = Dispatcher(
            ctx.engine, interval=settings.webhook_interval_seconds, backoff=settings.webhook_backoff_seconds
        )
        dispatcher.wake = ctx.outbox_wake
        sweeper = Sweeper(ctx)
        sealer = Sealer(ctx.audit, settings.audit_seal_interval_seconds)
        await ctx.shared.start()
        if background:
            dispatcher.start()
            sweeper.start()
            sealer.start()
        if started is not None:
            started()
        try:
            yield
        finally:
            await sealer.stop()
            await sweeper.stop()
            await dispatcher.stop()
            await ctx.close()

    app = FastAPI(
        title="Agent Custody",
        version=__version__,
        summary="Keys in an isolated signer; payments signed only within human-set policy.",
        lifespan=lifespan,
    )
    problems.install(app)
    app.include_router(agent_routes.router)
    app.include_router(admin_routes.router)
    app.add_middleware(problems.BodyLimit)
    observability.install(app, settings)  # /metrics, HTTP metrics, request ids (outermost)
    restore_recursion_limit()

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok", version=__version__)

    @app.get("/readyz", response_model=Readiness, tags=["health"], responses=_NOT_READY)
    async def readyz(ctx: Ctx) -> JSONResponse:
        """Readiness: the database answers and the signer is reachable and unsealed.

        Redis is reported too (``ok``, ``unavailable`` or ``disabled``). Its outage makes the
        service ``degraded``, still ready: spend control never depends on it, and taking
        every replica out of a load balancer for it would turn a degradation into an outage.
        """
        database = signer = "ok"
        try:
            await ctx.wallets.count_envelopes()
        except Exception:
            database = "unavailable"
        try:
            signer_status = await ctx.signer.status()
            signer = "sealed" if signer_status.get("sealed") else "ok"
        except CustodyError:
            signer = "unavailable"
        redis = await ctx.shared.ping()
        ready = database == signer == "ok"
        overall = ("degraded" if redis == "unavailable" else "ready") if ready else "not_ready"
        body = Readiness(status=overall, database=database, signer=signer, redis=redis)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @app.post("/admin/v1/wallets", response_model=WalletOut, status_code=201, tags=["wallets"], responses=_PROBLEMS)
    async def create_wallet(body: WalletCreate, ctx: Ctx, operator: Admin) -> WalletOut:
        """Create a wallet; its key is generated inside the signer and never leaves it."""
        return WalletOut.of(await wallet_service.create_wallet(ctx, body.name, actor=f"operator:{operator.id}"))

    @app.get("/admin/v1/wallets", response_model=WalletList, tags=["wallets"], responses=_PROBLEMS)
    async def list_wallets(ctx: Ctx, _: AnyOperator) -> WalletList:
        return WalletList(wallets=[WalletOut.of(w) for w in await ctx.wallets.list()])

    @app.get("/admin/v1/wallets/{wallet_id}", response_model=WalletOut, tags=["wallets"], responses=_PROBLEMS)
    async def get_wallet(wallet_id: WalletId, ctx: Ctx, _: AnyOperator) -> WalletOut:
        return WalletOut.of(await wallet_service.get_wallet(ctx, wallet_id))

    return app
