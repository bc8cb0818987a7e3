"""The local development chain: eth-tester in process, one lock, an optional HTTP endpoint."""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, cast

from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from web3 import EthereumTesterProvider, Web3
from web3.contract import Contract
from web3.middleware import combine_middleware

from custody.devchain.rpc import RpcServer

__all__ = ["DevChain", "TestToken", "start_chain", "token_artifact"]

_TRANSFER_SELECTOR = keccak(text="transfer(address,uint256)")[:4]


def token_artifact() -> dict[str, Any]:
    """The committed compiled artifact of ``TestUSDC.sol`` (``abi``, ``bytecode``, ``compiler``); a fresh copy."""
    text = resources.files("custody.devchain").joinpath("TestUSDC.json").read_text(encoding="utf-8")
    return cast(dict[str, Any], json.loads(text))


class _LockedTesterProvider(EthereumTesterProvider):
    """eth-tester is not thread-safe: every request to the chain holds one lock."""

    def __init__(self, lock: threading.RLock) -> None:
        super().__init__()
        self._chain_lock = lock

    def make_request(self, method: Any, params: Any) -> Any:
        with self._chain_lock:
            return super().make_request(method, params)


@dataclass(eq=False)
class TestToken:
    """A deployed ``TestUSDC``: 6 decimals, EIP-3009, minted only by the chain's funder."""

    __test__ = False  # not a pytest test class, whatever its name

    address: str
    decimals: int
    name: str
    version: str
    symbol: str
    contract: Contract = field(repr=False)
    _chain: DevChain = field(repr=False)

    def mint(self, to: str, amount: int) -> None:
        """Mint ``amount`` base units to ``to`` (a transaction from the funder, mined at once)."""
        w3 = self._chain.w3
        tx_hash = self.contract.functions.mint(to_checksum_address(to), amount).transact({"from": self._chain.funder})
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash)
        if receipt["status"] != 1:
            raise RuntimeError("mint failed")

    def balance_of(self, address: str) -> int:
        return int(self.contract.functions.balanceOf(to_checksum_address(address)).call())

    def transfer_calldata(self, to: str, amount: int) -> str:
        """``transfer(to, amount)`` calldata as 0x-hex, for an ERC-20 transfer transaction's ``data``."""
        return "0x" + (_TRANSFER_SELECTOR + abi_encode(["address", "uint256"], [to_checksum_address(to), amount])).hex()

    def eip712_domain(self) -> dict[str, Any]:
        """The EIP-712 domain EIP-3009 authorizations for this token are signed in."""
        return {
            "name": self.name,
            "version": self.version,
            "chainId": self._chain.chain_id,
            "verifyingContract": self.address,
        }


class DevChain:
    """An in-process eth-tester chain with prefunded, unlocked accounts; every transaction is mined at once.

    ``w3`` talks to the chain in process; ``serve_rpc()`` adds an HTTP JSON-RPC endpoint for
    clients that need a URL. Both go through one lock. Chain time is real time: nothing here
    moves it, so time-bounded authorizations (EIP-3009 ``validBefore``) behave as on a real chain.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.provider = _LockedTesterProvider(self._lock)
        self.w3 = Web3(self.provider)
        self.chain_id: int = int(self.w3.eth.chain_id)
        self.accounts: list[str] = [str(a) for a in self.w3.eth.accounts]
        self.funder: str = self.accounts[0]
        self._rpc: RpcServer | None = None

    def __repr__(self) -> str:
        return f"DevChain(chain_id={self.chain_id}, rpc={self.rpc_url!r})"

    @property
    def network(self) -> str:
        """The CAIP-2 network id (``eip155:<chain id>``), as x402 names chains."""
        return f"eip155:{self.chain_id}"

    @property
    def rpc_url(self) -> str | None:
        return self._rpc.url if self._rpc is not None else None

    def fund(self, address: str, wei: int) -> None:
        """Send ``wei`` of the native coin from the funder to ``address``."""
        tx_hash = self.w3.eth.send_transaction(
            {"from": cast(Any, self.funder), "to": to_checksum_address(address), "value": cast(Any, wei)}
        )
        self.w3.eth.wait_for_transaction_receipt(tx_hash)

    def new_account(self, wei: int = 10**18) -> LocalAccount:
        """A fresh random key (for example a facilitator's gas payer), funded with ``wei``."""
        account: LocalAccount = Account.from_key(secrets.token_bytes(32))
        if wei:
            self.fund(account.address, wei)
        return account

    def deploy_test_usdc(self, name: str = "USD Coin", symbol: str = "USDC", version: str = "2") -> TestToken:
        """Deploy a USDC-like token (EIP-712 domain name and version as USDC's by default)."""
        artifact = token_artifact()
        factory = self.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        tx_hash = factory.constructor(name, symbol, version).transact({"from": self.funder})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash)
        if receipt["status"] != 1 or not receipt["contractAddress"]:
            raise RuntimeError("deploying TestUSDC failed")
        address = to_checksum_address(receipt["contractAddress"])
        contract = self.w3.eth.contract(address=address, abi=artifact["abi"])
        return TestToken(
            address=address,
            decimals=int(contract.functions.decimals().call()),
            name=name,
            version=version,
            symbol=symbol,
            contract=contract,
            _chain=self,
        )

    def serve_rpc(self) -> str:
        """Start (once) an HTTP JSON-RPC endpoint on 127.0.0.1 forwarding to this chain; its URL."""
        with self._lock:
            if self._rpc is None:
                request_fn = combine_middleware(
                    middleware=self.provider._middleware,
                    w3=self.w3,
                    provider_request_fn=self.provider.make_request,
                )
                self._rpc = RpcServer(cast(Any, request_fn))
            return self._rpc.url

    def close(self) -> None:
        """Stop the RPC endpoint (the in-process chain stays usable through ``w3``)."""
        with self._lock:
            rpc, self._rpc = self._rpc, None
        if rpc is not None:
            rpc.close()

    def __enter__(self) -> DevChain:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_chain() -> DevChain:
    """A fresh in-process chain (eth-tester), with prefunded accounts and auto-mining."""
    return DevChain()
