"""How the CLI reaches the service: always through the admin API.

With ``CUSTODY_URL`` set, requests go over HTTP with ``CUSTODY_ADMIN_TOKEN``. Otherwise
the CLI runs the same application in-process on the local data directory
(``CUSTODY_DATA_DIR``) and acts as a local operator: the one named by ``--operator`` /
``CUSTODY_OPERATOR`` (default ``admin``, the operator ``custody init`` creates), with that
operator's role. Whoever can run commands on the data directory already owns it, so no
token is needed there. One code path serves both modes.

Some operations exist only locally (importing a key, rotating the KEK): they touch the
signer and must run on its host.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx

from custody.errors import CustodyError, DependencyUnavailable, InvalidRequest, Unauthorized, error_from_code
from custody.services.context import Context
from custody.settings import Settings

T = TypeVar("T")
_PROBLEM_FIELDS = {"type", "title", "status", "detail", "code", "instance"}


def run_local(settings: Settings, work: Callable[[Context], Awaitable[T]]) -> T:
    async def _run() -> T:
        ctx = await Context.open(settings)
        try:
            return await work(ctx)
        finally:
            await ctx.close()

    return asyncio.run(_run())


def _decode(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json() if response.content else None
    try:
        problem = response.json()
    except ValueError:
        raise CustodyError(f"HTTP {response.status_code} from the service") from None
    extra = {k: v for k, v in problem.items() if k not in _PROBLEM_FIELDS}
    raise error_from_code(str(problem.get("code")), str(problem.get("detail")), **extra)


async def _local(
    settings: Settings, operator_name: str, method: str, path: str, *, credential_required: bool, **kwargs: Any
) -> Any:
    from custody.api.app import create_app
    from custody.api.deps import _operator
    from custody.services.operators import authenticate

    app = create_app(settings, background=False)
    async with app.router.lifespan_context(app):
        ctx: Context = app.state.ctx
        if settings.admin_token is not None:
            operator = await authenticate(ctx, settings.admin_token.get_secret_value())
        elif credential_required:
            # An approval quorum of M people must mean M credentials, not M names typed in one shell.
            raise Unauthorized("votes need the approver's own credential: set CUSTODY_ADMIN_TOKEN to your token")
        else:
            found = await ctx.operators.get_by_name(operator_name)
            if found is None or found.revoked_at is not None:
                raise Unauthorized(
                    f"no active operator named {operator_name!r} (run `custody init`, or pass --operator)"
                )
            operator = found
        app.dependency_overrides[_operator] = lambda: operator
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://custody.local") as http:
            return _decode(await http.request(method, path, **kwargs))


async def _remote(settings: Settings, method: str, path: str, **kwargs: Any) -> Any:
    assert settings.url is not None
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with httpx.AsyncClient(base_url=settings.url.rstrip("/"), headers=headers, timeout=60.0) as http:
            response = await http.request(method, path, **kwargs)
    except httpx.HTTPError:
        raise DependencyUnavailable(f"cannot reach the service at {settings.url}") from None
    return _decode(response)


def admin_request(
    settings: Settings,
    method: str,
    path: str,
    *,
    operator: str | None = None,
    credential_required: bool = False,
    **kwargs: Any,
) -> Any:
    """One admin API call, remote or in-process; problems come back as CustodyError.

    Locally, ``CUSTODY_ADMIN_TOKEN`` (when set) says who acts; otherwise the named local
    operator does, except where ``credential_required`` (approval votes).
    """
    if settings.url:
        return asyncio.run(_remote(settings, method, path, **kwargs))
    name = operator or os.environ.get("CUSTODY_OPERATOR") or "admin"
    return asyncio.run(_local(settings, name, method, path, credential_required=credential_required, **kwargs))


def require_local(settings: Settings, what: str) -> None:
    if settings.url:
        raise InvalidRequest(
            f"{what} runs on the signer's host, against its data directory: unset CUSTODY_URL and run it there"
        )
