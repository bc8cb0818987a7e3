"""An EIP-1559 transfer signed by the service's signer is mined on an in-process EVM."""

from __future__ import annotations

import pytest
from web3 import EthereumTesterProvider, Web3

from custody.services import wallets as wallet_service
from custody.services.context import Context


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_service_signed_eip1559_transfer_is_mined_with_the_expected_balance_change(ctx: Context) -> None:
    w3 = Web3(EthereumTesterProvider())
    funder = w3.eth.accounts[0]
    wallet = await wallet_service.create_wallet(ctx, "payer")
    payee = w3.eth.accounts[1]
    w3.eth.send_transaction({"from": funder, "to": wallet.address, "value": w3.to_wei(2, "ether")})
    before = w3.eth.get_balance(payee)
    envelope = await ctx.wallets.envelope(wallet.id)
    assert envelope is not None
    tx = {
        "type": 2,
        "chainId": w3.eth.chain_id,
        "nonce": w3.eth.get_transaction_count(wallet.address),
        "to": payee,
        "value": w3.to_wei(0.4, "ether"),
        "gas": 21_000,
        "maxFeePerGas": w3.to_wei(3, "gwei"),
        "maxPriorityFeePerGas": w3.to_wei(1, "gwei"),
    }
    signed = await ctx.signer.sign_transaction(envelope, tx)
    tx_hash = w3.eth.send_raw_transaction(bytes.fromhex(signed["raw_transaction"][2:]))
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash)
    assert receipt["status"] == 1
    assert receipt["from"] == wallet.address
    assert "0x" + tx_hash.hex().removeprefix("0x") == signed["hash"]
    assert w3.eth.get_balance(payee) - before == w3.to_wei(0.4, "ether")
