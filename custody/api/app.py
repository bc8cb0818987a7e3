"""Application factory: ``create_app(settings)``; nothing global."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from custody import __version__
from custody.api import admin_routes, agent_routes, problems
from custody.api.deps import Admin, AnyOperator, Ctx, problem_responses
from custody.errors import CustodyError
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


def create_app(settings: Settings, *, background: bool = True) -> FastAPI:
    """The application; ``background=False`` (the CLI's in-process use) runs no webhook dispatcher."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.require_safe("api")
        ctx = await Context.open(settings)
        app.state.ctx = ctx
        dispatcher = Dispatcher(
            ctx.engine, interval=settings.webhook_interval_seconds, backoff=settings.webhook_backoff_seconds
        )
        dispatcher.wake = ctx.outbox_wake
        if background:
            dispatcher.start()
        try:
            yield
        finally:
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
    restore_recursion_limit()

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok", version=__version__)

    @app.get("/readyz", response_model=Readiness, tags=["health"], responses=_PROBLEMS)
    async def readyz(ctx: Ctx) -> JSONResponse:
        """Readiness: the database answers and the signer is reachable and unsealed."""
        database = signer = "ok"
        try:
            await ctx.wallets.count_envelopes()
        except Exception:
            database = "unavailable"
        try:
            status = await ctx.signer.status()
            signer = "sealed" if status.get("sealed") else "ok"
        except CustodyError:
            signer = "unavailable"
        ready = database == signer == "ok"
        body = Readiness(status="ready" if ready else "not_ready", database=database, signer=signer)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @app.post("/admin/v1/wallets", response_model=WalletOut, status_code=201, tags=["wallets"], responses=_PROBLEMS)
    async def create_wallet(body: WalletCreate, ctx: Ctx, operator: Admin) -> WalletOut:
        """Create a wallet; its key is generated inside the signer and never leaves it."""
        return WalletOut.of(await wallet_service.create_wallet(ctx, body.name, actor=f"operator:{operator.id}"))

    @app.get("/admin/v1/wallets", response_model=WalletList, tags=["wallets"], responses=_PROBLEMS)
    async def list_wallets(ctx: Ctx, _: AnyOperator) -> WalletList:
        return WalletList(wallets=[WalletOut.of(w) for w in await ctx.wallets.list()])

    @app.get("/admin/v1/wallets/{wallet_id}", response_model=WalletOut, tags=["wallets"], responses=_PROBLEMS)
    async def get_wallet(wallet_id: str, ctx: Ctx, _: AnyOperator) -> WalletOut:
        return WalletOut.of(await wallet_service.get_wallet(ctx, wallet_id))

    return app
