"""How the CLI reaches the service.

With ``CUSTODY_URL`` set, commands go to the admin API with ``CUSTODY_ADMIN_TOKEN``.
Otherwise they work on the local data directory (``CUSTODY_DATA_DIR``) directly,
through the same application services the API uses, and reach the local signer
socket. Some operations exist only locally (importing a key, rotating the KEK):
they touch the signer and must run on its host.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import httpx

from custody.errors import CustodyError, DependencyUnavailable, InvalidRequest, error_from_code
from custody.schemas import WalletOut
from custody.services import wallets as wallet_service
from custody.services.context import Context
from custody.settings import Settings

T = TypeVar("T")


class Operator(Protocol):
    def create_wallet(self, name: str) -> WalletOut: ...

    def list_wallets(self) -> list[WalletOut]: ...

    def get_wallet(self, wallet_id: str) -> WalletOut: ...


def run_local(settings: Settings, work: Callable[[Context], Awaitable[T]]) -> T:
    async def _run() -> T:
        ctx = await Context.open(settings)
        try:
            return await work(ctx)
        finally:
            await ctx.close()

    return asyncio.run(_run())


class LocalOperator:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def create_wallet(self, name: str) -> WalletOut:
        return WalletOut.of(run_local(self.settings, lambda ctx: wallet_service.create_wallet(ctx, name)))

    def list_wallets(self) -> list[WalletOut]:
        return [WalletOut.of(w) for w in run_local(self.settings, lambda ctx: ctx.wallets.list())]

    def get_wallet(self, wallet_id: str) -> WalletOut:
        return WalletOut.of(run_local(self.settings, lambda ctx: wallet_service.get_wallet(ctx, wallet_id)))


class RemoteOperator:
    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            with httpx.Client(base_url=self.url, headers=self.headers, timeout=30.0) as http:
                response = http.request(method, path, **kwargs)
        except httpx.HTTPError:
            raise DependencyUnavailable(f"cannot reach the service at {self.url}") from None
        if response.is_success:
            return response.json()
        try:
            problem = response.json()
        except ValueError:
            raise CustodyError(f"HTTP {response.status_code} from the service") from None
        extra = {k: v for k, v in problem.items() if k not in {"type", "title", "status", "detail", "code", "instance"}}
        raise error_from_code(str(problem.get("code")), str(problem.get("detail")), **extra)

    def create_wallet(self, name: str) -> WalletOut:
        return WalletOut.model_validate(self._request("POST", "/admin/v1/wallets", json={"name": name}))

    def list_wallets(self) -> list[WalletOut]:
        data = self._request("GET", "/admin/v1/wallets")
        return [WalletOut.model_validate(item) for item in data["wallets"]]

    def get_wallet(self, wallet_id: str) -> WalletOut:
        return WalletOut.model_validate(self._request("GET", f"/admin/v1/wallets/{wallet_id}"))


def operator_for(settings: Settings) -> Operator:
    if settings.url:
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        return RemoteOperator(settings.url, token)
    return LocalOperator(settings)


def require_local(settings: Settings, what: str) -> None:
    if settings.url:
        raise InvalidRequest(
            f"{what} runs on the signer's host, against its data directory: unset CUSTODY_URL and run it there"
        )
