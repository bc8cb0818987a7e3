"""The audit log over an opened service context (``opened`` from tests/conftest.py), on each backend."""

from __future__ import annotations

import pytest

from custody.audit import AuditLog
from custody.services.context import Context


@pytest.fixture
def log(opened: Context) -> AuditLog:
    return AuditLog(opened.engine)
