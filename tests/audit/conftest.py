"""An opened service context and its audit log, on each backend (``settings`` is parametrized)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from custody.audit import AuditLog
from custody.services.context import Context
from custody.settings import Settings


@pytest.fixture
async def opened(settings: Settings) -> AsyncIterator[Context]:
    context = await Context.open(settings)
    try:
        yield context
    finally:
        await context.close()


@pytest.fixture
def log(opened: Context) -> AuditLog:
    return AuditLog(opened.engine)
