"""A paid HTTP resource on the dev chain: x402's own FastAPI middleware and facilitator, all local.

Needs the ``x402`` extra and FastAPI. The facilitator runs in process (no facilitator URL, no
start-up call to one) and settles through the chain's HTTP endpoint, paying gas from a fresh
funded account: the settle transaction really executes ``transferWithAuthorization``.

    paywall = x402_paywall(chain, usdc, pay_to=merchant, price=10_000, path="/report")
    transport = httpx.ASGITransport(app=paywall.app)      # or serve paywall.app with uvicorn
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from custody.devchain.chain import DevChain, TestToken

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from fastapi import FastAPI

__all__ = ["Paywall", "x402_paywall"]


@dataclass(eq=False)
class Paywall:
    """The app, and the hash of every settlement the local facilitator made (oldest first)."""

    app: FastAPI
    network: str
    settled: list[str] = field(default_factory=list)


def x402_paywall(
    chain: DevChain,
    token: TestToken,
    *,
    pay_to: str,
    price: int,
    path: str = "/report",
    content: Mapping[str, Any] | None = None,
    gas_payer: LocalAccount | None = None,
    description: str = "a paid resource",
) -> Paywall:
    """A FastAPI app whose ``GET path`` costs ``price`` base units of ``token``, paid to ``pay_to`` over x402."""
    from fastapi import FastAPI
    from x402 import AssetAmount, x402Facilitator, x402ResourceServer
    from x402.http import PaymentOption, RouteConfig
    from x402.http.middleware.fastapi import payment_middleware
    from x402.mechanisms.evm import FacilitatorWeb3Signer
    from x402.mechanisms.evm.exact import register_exact_evm_facilitator, register_exact_evm_server

    if isinstance(price, bool) or not isinstance(price, int) or price <= 0:
        raise ValueError("price must be a positive integer in base units")
    payer = gas_payer if gas_payer is not None else chain.new_account(10**18)
    facilitator_signer = FacilitatorWeb3Signer(
        private_key="0x" + bytes(payer.key).hex(), rpc_url=chain.serve_rpc(), confirmation_timeout_seconds=10
    )
    facilitator = x402Facilitator()
    register_exact_evm_facilitator(facilitator, facilitator_signer, networks=[chain.network])
    paywall = Paywall(app=FastAPI(), network=chain.network)

    def record(context: Any) -> None:
        paywall.settled.append(str(context.result.transaction))

    facilitator.on_after_settle(record)
    server = x402ResourceServer(facilitator)  # the facilitator object itself: no URL to call
    register_exact_evm_server(server, networks=chain.network)
    server.initialize()  # here, so the middleware needs no start-up call (turned off below)
    amount = AssetAmount(amount=str(price), asset=token.address, extra={"name": token.name, "version": token.version})
    routes = {
        f"GET {path}": RouteConfig(
            accepts=PaymentOption(scheme="exact", pay_to=pay_to, price=amount, network=chain.network),
            description=description,
        )
    }
    paywall.app.middleware("http")(payment_middleware(routes, server, sync_facilitator_on_start=False))
    body = dict(content) if content is not None else {"paid": True}

    async def resource() -> dict[str, Any]:
        return body

    paywall.app.add_api_route(path, resource, methods=["GET"])
    return paywall
