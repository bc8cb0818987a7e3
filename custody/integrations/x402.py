"""x402 payments whose authorizations are signed by the custody service, within policy.

Needs the ``x402`` extra (the x402 package with its EVM mechanism, and eth-account).

    from custody.client import CustodyClient
    from custody.integrations.x402 import CustodyX402Signer, allow_asset, x402_client
    from x402.http.clients import x402HttpxClient

    custody = CustodyClient(url, api_key)
    signer = CustodyX402Signer(custody, wallet_id, purpose="API calls")
    client = x402_client(signer, allowed_assets=[allow_asset("eip155:8453", token, max_per_payment=50_000)])
    async with x402HttpxClient(client) as http:
        response = await http.get("https://api.example/paid")

The x402 client calls :meth:`CustodyX402Signer.sign_typed_data` with the EIP-3009
``TransferWithAuthorization`` it built; the signer sends the whole EIP-712 document to the
service, whose policy sees the token (the domain's verifying contract), the payee (``to``) and
the amount (``value``), and counts it against the same budgets as every other payment.
A denial raises :class:`~custody.client.PolicyDenied` (with its reasons) and a payment held for
a human raises :class:`~custody.client.ApprovalPending`: no signature is returned in either case.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from custody.client._account import CustodyAccount
from custody.client._client import CustodyClient

if TYPE_CHECKING:
    from x402 import SpendControlAsset, x402Client, x402ClientSync

    ClientT = TypeVar("ClientT", x402Client, x402ClientSync)

__all__ = ["CustodyX402Signer", "allow_asset", "typed_data_document", "x402_client"]

_DOMAIN_KEYS = {
    "name": "name",
    "version": "version",
    "chainId": "chainId",
    "chain_id": "chainId",
    "verifyingContract": "verifyingContract",
    "verifying_contract": "verifyingContract",
    "salt": "salt",
}


def _domain(domain: Any) -> dict[str, Any]:
    """x402 passes a ``TypedDataDomain`` dataclass (snake_case) or, for Permit2, a plain dict."""
    if isinstance(domain, Mapping):
        items = dict(domain)
    else:
        fields = ("name", "version", "chain_id", "verifying_contract", "salt")
        items = {key: getattr(domain, key, None) for key in fields}
    out: dict[str, Any] = {}
    for key, value in items.items():
        if value is None:
            continue
        if key not in _DOMAIN_KEYS:
            raise ValueError(f"unknown EIP-712 domain field {key!r}")
        out[_DOMAIN_KEYS[key]] = value
    return out


def _field(entry: Any) -> dict[str, str]:
    if isinstance(entry, Mapping):
        name, kind = entry.get("name"), entry.get("type")
    else:
        name, kind = getattr(entry, "name", None), getattr(entry, "type", None)
    if not isinstance(name, str) or not isinstance(kind, str):
        raise ValueError("every EIP-712 field needs a string name and type")
    return {"name": name, "type": kind}


def typed_data_document(
    domain: Any, types: Mapping[str, Sequence[Any]], primary_type: str, message: Mapping[str, Any]
) -> dict[str, Any]:
    """The full EIP-712 document (``types``, ``primaryType``, ``domain``, ``message``) from x402's four parts."""
    return {
        "types": {str(name): [_field(entry) for entry in fields] for name, fields in types.items()},
        "primaryType": primary_type,
        "domain": _domain(domain),
        "message": dict(message),
    }


class CustodyX402Signer:
    """An x402 EVM client signer (``address`` and ``sign_typed_data``) backed by a custody wallet.

    ``address`` is looked up with the API key when not given. ``purpose`` is sent with every
    request (it appears in approvals and the audit log). Each signature is checked before it is
    returned: the EIP-712 hash is computed locally and the wallet's address recovered from it.
    """

    def __init__(
        self, client: CustodyClient, wallet_id: str, *, purpose: str | None = None, address: str | None = None
    ) -> None:
        if address is None:
            self.account = CustodyAccount.from_client(client, wallet_id, purpose=purpose)
        else:
            self.account = CustodyAccount(client, wallet_id, address, purpose=purpose)

    def __repr__(self) -> str:
        return f"CustodyX402Signer(wallet_id={self.account.wallet_id!r}, address={self.address!r})"

    @property
    def address(self) -> str:
        return str(self.account.address)

    @property
    def wallet_id(self) -> str:
        return self.account.wallet_id

    def sign_typed_data(
        self, domain: Any, types: Mapping[str, Sequence[Any]], primary_type: str, message: Mapping[str, Any]
    ) -> bytes:
        """The 65-byte signature of the full document; raises ``PolicyDenied`` or ``ApprovalPending`` instead."""
        document = typed_data_document(domain, types, primary_type, message)
        signed = self.account.sign_typed_data(full_message=document)
        return bytes(signed.signature)


def allow_asset(network: str, asset: str, *, max_per_payment: int | None = None) -> SpendControlAsset:
    """An entry for the x402 client's own spend controls that lets it pay in ``asset`` on ``network``.

    x402 clients pay only in the USDC deployments they know unless told otherwise; a token of your
    own (a test token, another stablecoin) must be listed. ``max_per_payment`` is in base units.
    """
    entry: dict[str, str] = {"network": network, "asset": asset}
    if max_per_payment is not None:
        if isinstance(max_per_payment, bool) or not isinstance(max_per_payment, int) or max_per_payment < 0:
            raise ValueError("max_per_payment must be a non-negative integer in base units")
        entry["max_amount_per_payment"] = str(max_per_payment)
    return entry  # type: ignore[return-value]  # a TypedDict built from checked values


@overload
def x402_client(
    signer: CustodyX402Signer,
    *,
    networks: str | Sequence[str] | None = None,
    allowed_assets: Iterable[SpendControlAsset] = (),
    client: None = None,
) -> x402Client: ...


@overload
def x402_client(
    signer: CustodyX402Signer,
    *,
    networks: str | Sequence[str] | None = None,
    allowed_assets: Iterable[SpendControlAsset] = (),
    client: ClientT,
) -> ClientT: ...


def x402_client(
    signer: CustodyX402Signer,
    *,
    networks: str | Sequence[str] | None = None,
    allowed_assets: Iterable[SpendControlAsset] = (),
    client: x402Client | x402ClientSync | None = None,
) -> x402Client | x402ClientSync:
    """An x402 client that pays with ``signer``: a new async ``x402Client``, or ``client`` (async or sync).

    Registers the exact EVM scheme for ``networks`` (default: every ``eip155`` chain). With
    ``allowed_assets``, the client's spend controls are replaced by ones that also allow those
    assets. The custody policy still decides every payment.
    """
    from x402 import x402Client
    from x402.mechanisms.evm.exact import register_exact_evm_client

    target = client if client is not None else x402Client()
    selected = [networks] if isinstance(networks, str) else list(networks) if networks is not None else None
    register_exact_evm_client(cast(Any, target), signer, networks=selected)
    assets = list(allowed_assets)
    if assets:
        target.set_spend_controls({"allowed_assets": assets})
    return target
