"""The real app with changed settings (the shared ``api`` fixture uses the defaults)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from custody.api.app import create_app
from custody.services.operators import ensure_first_admin
from custody.settings import Settings


@asynccontextmanager
async def running(settings: Settings, **changes: Any) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI, str]]:
    """The app (lifespan included) over ASGI with ``changes`` applied to ``settings``; the admin token."""
    app = create_app(settings.model_copy(update=changes))
    async with app.router.lifespan_context(app):
        token = await ensure_first_admin(app.state.ctx)
        assert token is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://custody.test") as client:
            yield client, app, token
