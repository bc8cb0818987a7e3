"""``custody demo``: the whole product in one command, offline, on a throwaway service and a local chain.

It starts `custody serve` (the API, and the signer as its own process) in a temporary data
directory, an in-process dev chain, sets up a wallet, a policy and an agent key as an operator
would, then plays the agent: a payment allowed and mined, one denied with its reasons, one held
for approval and approved with the real `custody approvals approve` command, and (with the x402
extra) an API call paid over x402. Everything is removed at the end unless ``--keep``.
Needs the ``devchain`` extra. Credentials are handed over in memory and never printed.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from eth_typing import ChecksumAddress

    from custody.client import CustodyAccount, CustodyClient, Limit, Reason
    from custody.devchain import DevChain, TestToken
    from custody.devchain.sandbox import Sandbox

ETH = 10**18
USDC = 10**6
FUNDING = 5 * ETH
DAILY_CAP = ETH
APPROVAL_ABOVE = ETH // 4
ALLOWED = ETH // 10
DENIED = ETH * 95 // 100  # fits the cap alone, not on top of today's payments
NEEDS_APPROVAL = ETH // 2
USDC_FUNDING = USDC
USDC_DAILY_CAP = USDC // 10
REPORT_PRICE = USDC // 100
_GAS = {"gas": 21_000, "maxFeePerGas": 2 * 10**9, "maxPriorityFeePerGas": 10**9}
_INSTALL = 'pip install -e ".[server,devchain]" (in a checkout) or pip install "agent-custody[server,devchain]"'


def register_demo_command(app: typer.Typer) -> None:
    app.command("demo")(demo_command)


def _say(text: str = "") -> None:
    typer.echo(text)
    sys.stdout.flush()  # shown as it happens, also through a pipe


def _missing(*modules: str) -> str | None:
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


_interrupted: list[int] = []


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Remembered as well as raised: Python drops an exception raised inside a finalizer
    # (`Exception ignored in ... __del__`), so the demo also checks at every step.
    _interrupted.append(signum)
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def _stop_if_interrupted() -> None:
    if _interrupted:
        raise KeyboardInterrupt


def demo_command(
    keep: bool = typer.Option(False, "--keep", help="Keep the temporary data directory for inspection (says where)."),
) -> None:
    """Show the whole product on a throwaway local service and dev chain: allowed, denied, approved (offline)."""
    missing = _missing("web3", "eth_tester", "eth_account")
    if missing is not None:
        typer.echo(
            f"error [missing_dependency]: `custody demo` needs the devchain extra ({missing} is not installed): "
            f"{_INSTALL}",
            err=True,
        )
        raise typer.Exit(2)
    from custody.devchain.sandbox import SandboxError, start_sandbox
    from custody.errors import CustodyError

    _interrupted.clear()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    previous_int = signal.signal(signal.SIGINT, _interrupt)
    started = time.monotonic()
    directory = None
    try:
        _say("Agent Custody demo: a throwaway service and a local chain on this machine, offline.")
        _say("Development mode: test keys and test money only. Credentials stay in memory and are never printed.")
        chains: list[tuple[DevChain, TestToken]] = []
        try:
            # The chain starts while the service boots.
            with start_sandbox(keep=keep, while_starting=lambda: chains.append(_dev_chain())) as sandbox:
                directory = sandbox.data_dir
                Demo(sandbox, *chains[0]).play()
                _stop_if_interrupted()
                _say()
                _say(f"Done in {time.monotonic() - started:.1f} s. Stopping the service (the signer stops with it).")
        finally:
            for chain, _ in chains:
                chain.close()
    except KeyboardInterrupt:
        kept = f"; its data is kept in {directory}" if keep and directory else ""
        typer.echo("\ninterrupted: the service was stopped" + (kept if keep else " and its data removed"), err=True)
        raise typer.Exit(130) from None
    except (SandboxError, DemoFailed) as exc:
        typer.echo(f"error [demo_failed]: {exc}", err=True)
        raise typer.Exit(1) from None
    except CustodyError as exc:  # the service refused a step the demo expected to pass
        typer.echo(f"error [{exc.code}]: {exc.detail}", err=True)
        raise typer.Exit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    if keep:
        _say(f"Kept {directory}: the database, the development KEK file, demo-policy.yaml and serve.log (the log).")
        _say(f"  CUSTODY_DATA_DIR={directory} custody audit verify")
        _say(f"  CUSTODY_DATA_DIR={directory} custody wallet list")
        _say(f"Delete it when done: rm -r {directory}")
    else:
        _say(f"Removed {directory}.")


def _dev_chain() -> tuple[DevChain, TestToken]:
    from custody.devchain import start_chain

    chain = start_chain()
    return chain, chain.deploy_test_usdc()


class DemoFailed(RuntimeError):
    """A step did not end as the demo expects (a bug, not a user error)."""


@dataclass
class Demo:
    sandbox: Sandbox
    chain: DevChain
    usdc: TestToken
    step: int = 0
    client: CustodyClient = field(init=False)
    account: CustodyAccount = field(init=False)
    wallet_id: str = field(init=False)
    shop: ChecksumAddress = field(init=False)
    seller: ChecksumAddress = field(init=False)
    approver_token: str = field(init=False, repr=False)

    def title(self, text: str) -> None:
        _stop_if_interrupted()
        self.step += 1
        _say()
        _say(f"{self.step}. {text}")

    def play(self) -> None:
        sandbox = self.sandbox
        self.title("The service is running")
        _say(f"   data directory {sandbox.data_dir} (temporary; SQLite and a development KEK file)")
        _say(f"   API     pid {sandbox.api_pid}  {sandbox.url}  (the `custody serve` process; holds no private key)")
        _say(f"   signer  pid {sandbox.signer_pid}  {sandbox.data_dir / 'signer.sock'} (mode 0600; holds the keys)")
        _say(
            f"   dev chain: in-process Ethereum test chain, chain id {self.chain.chain_id}, "
            f"test USDC at {self.usdc.address}"
        )
        try:
            self.operator_setup()
            self.allowed()
            self.denied()
            self.approval()
            self.x402()
            self.audit()
        finally:
            client = getattr(self, "client", None)
            if client is not None:
                client.close()

    # -- the operator

    def operator_setup(self) -> None:
        import yaml
        from eth_account import Account
        from eth_utils.address import to_checksum_address

        from custody.client import CustodyAccount, CustodyClient

        sandbox, chain = self.sandbox, self.chain
        self.title("An operator sets up a wallet, a policy and an agent key")
        _say("   (through the admin API; each line shows the CLI command that does the same)")
        wallet = sandbox.create_wallet("demo-wallet")
        self.wallet_id = wallet["id"]
        _say(f"   custody wallet create demo-wallet    -> {wallet['address']} ({wallet['id']})")
        _say("     the private key was generated inside the signer and never leaves it")
        chain.fund(wallet["address"], FUNDING)
        self.usdc.mint(wallet["address"], USDC_FUNDING)
        _say(f"   funded on the dev chain with {_eth(FUNDING)} and {_usdc(USDC_FUNDING)}")
        operator_id, self.approver_token = sandbox.create_operator("ana", "approver")
        _say(f"   custody operator create ana --role approver    -> {operator_id} (her token goes to her only)")
        self.shop = to_checksum_address(Account.create().address)
        self.seller = to_checksum_address(Account.create().address)
        document = self.policy()
        policy_file = sandbox.data_dir / "demo-policy.yaml"
        policy_file.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        version = sandbox.set_policy(self.wallet_id, document)
        _say(f"   custody policy set {self.wallet_id} {policy_file}    -> version {version}:")
        _say(f"     - pay only the shop {self.shop} and the report seller {self.seller}")
        _say(f"     - at most {_eth(DAILY_CAP)} and {_usdc(USDC_DAILY_CAP)} a day (calendar day, UTC)")
        _say(f"     - a payment above {_eth(APPROVAL_ABOVE)} waits for ana's approval")
        _say("     - anything else is denied (deny by default)")
        agent_id = sandbox.create_agent("demo-agent")
        api_key = sandbox.issue_key(agent_id, [self.wallet_id])
        _say(f"   custody agent create demo-agent; custody agent issue-key {agent_id} --wallet {self.wallet_id}")
        _say("     the API key is shown once; here it goes straight to the agent's SDK client")
        self.client = CustodyClient(sandbox.url, api_key, max_retries=0)
        self.account = CustodyAccount.from_client(self.client, self.wallet_id, purpose="custody demo")

    def policy(self) -> dict[str, Any]:
        chain_id = self.chain.chain_id
        return {
            "schema_version": 1,
            "id": "demo-policy",
            "assets": {
                "eth": {"chain_id": chain_id, "address": "native", "decimals": 18},
                "usdc": {"chain_id": chain_id, "address": self.usdc.address, "decimals": 6},
            },
            "approver_groups": {"ops": {"members": ["ana"]}},
            "rules": [
                {"id": "transfers", "type": "allow_transfers", "kinds": ["native_transfer", "payment_authorization"]},
                {
                    "id": "payees",
                    "type": "payee_allowlist",
                    "payees": [
                        {"address": self.shop, "label": "shop"},
                        {"address": self.seller, "label": "report seller"},
                    ],
                },
                {"id": "daily-eth", "type": "cap", "asset": "eth", "max": str(DAILY_CAP), "period": "day"},
                {"id": "daily-usdc", "type": "cap", "asset": "usdc", "max": str(USDC_DAILY_CAP), "period": "day"},
                {
                    "id": "big-payments",
                    "type": "require_approval",
                    "asset": "eth",
                    "above": str(APPROVAL_ABOVE),
                    "group": "ops",
                    "m": 1,
                },
            ],
        }

    # -- the agent

    def transfer(self, to: str, value: int) -> dict[str, Any]:
        nonce = self.chain.w3.eth.get_transaction_count(self.account.address)
        return {"type": 2, "chainId": self.chain.chain_id, "nonce": nonce, "to": to, "value": value, **_GAS}

    def send(self, raw: bytes, before: int) -> None:
        w3 = self.chain.w3
        receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(raw), timeout=30)
        if receipt["status"] != 1:
            raise DemoFailed("the transaction reverted")
        gas = int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])
        after = int(w3.eth.get_balance(self.account.address))
        _say(
            f"   mined in block {receipt['blockNumber']}: wallet {_eth(before)} -> {_eth(after)} "
            f"({_eth(before - after - gas)} paid + {_eth(gas)} gas)"
        )

    def eth_limit(self) -> Limit:
        for limit in self.client.limits(self.wallet_id):
            if limit.rule_id == "daily-eth":
                return limit
        raise DemoFailed("the daily cap is missing from the wallet's limits")

    def allowed(self) -> None:
        from custody.client import PolicyDenied

        self.title(f"Allowed: the agent pays the shop {_eth(ALLOWED)}")
        _say("   account.sign_transaction(tx)    (CustodyAccount: an eth-account account whose key is in the signer)")
        before = int(self.chain.w3.eth.get_balance(self.account.address))
        try:
            signed = self.account.sign_transaction(self.transfer(self.shop, ALLOWED))
        except PolicyDenied as denied:
            raise DemoFailed(f"the allowed payment was denied: {[r.code for r in denied.reasons]}") from None
        _say(f"   200 signed: tx {signed.hash.to_0x_hex()} (signature checked against the wallet's address)")
        self.send(bytes(signed.raw_transaction), before)
        _say(f"   shop balance: {_eth(int(self.chain.w3.eth.get_balance(self.shop)))}")
        limit = self.eth_limit()
        _say(f"   left today: {_eth(limit.remaining)} of {_eth(limit.limit)}; resets at {_when(limit.resets_at)}")
        _say("   (a payment counts its value plus the most its gas may cost)")

    def denied(self) -> None:
        from eth_account import Account

        from custody.client import PolicyDenied

        stranger = str(Account.create().address)
        self.title(f"Denied: the agent tries to pay {_eth(DENIED)} to an address that is not on the list")
        block = self.chain.w3.eth.block_number
        try:
            self.account.sign_transaction(self.transfer(stranger, DENIED))
        except PolicyDenied as denied:
            _say("   403 policy_denied, nothing signed. Every reason, with what remains:")
            for reason in denied.reasons:
                _say(f"     - {reason.code} (rule {reason.rule_id}): {reason.message}")
                if reason.remaining is not None:
                    _say(
                        f"       remaining {_amount(reason, reason.remaining)} of {_amount(reason, reason.limit)}, "
                        f"resets at {_when(reason.resets_at)}"
                    )
        else:
            raise DemoFailed("the payment to an unknown address was signed")
        if self.chain.w3.eth.block_number != block:
            raise DemoFailed("a block was mined after a denial")
        _say("   An agent reads the codes and adapts (a smaller amount, an allowed payee, or waits for the reset);")
        _say("   repeating the same request would be denied again.")

    def approval(self) -> None:
        from custody.client import ApprovalPending

        self.title(f"Held for approval: the agent pays the shop {_eth(NEEDS_APPROVAL)} (above {_eth(APPROVAL_ABOVE)})")
        before = int(self.chain.w3.eth.get_balance(self.account.address))
        try:
            self.account.sign_transaction(self.transfer(self.shop, NEEDS_APPROVAL))
        except ApprovalPending as held:
            payment_id = held.payment_id
            result = held.result
            expires = result.expires_at if result is not None else None
            quorum = f"{result.quorum.m} of group {result.quorum.group}" if result and result.quorum else "a quorum"
            _say(f"   202 pending_approval: payment {payment_id} needs {quorum}; expires at {_when(expires)}")
        else:
            raise DemoFailed("a payment above the approval threshold was signed at once")

        waited: dict[str, Any] = {}

        def wait() -> None:
            try:
                waited["signed"] = self.account.wait_for_transaction(payment_id, timeout=60)
            except Exception as exc:  # reported by the main thread
                waited["error"] = exc

        waiter = threading.Thread(target=wait, name="demo-agent-wait", daemon=True)
        waiter.start()
        _say(f"   the agent waits: account.wait_for_transaction({payment_id!r})  (long poll, no busy loop)")
        args = ["approvals", "approve", payment_id, "--comment", "demo: expected purchase"]
        _say("   ana approves with her own credential (an agent can never approve):")
        _say(f"     $ CUSTODY_URL={self.sandbox.url} CUSTODY_ADMIN_TOKEN=<ana's token> custody {shlex.join(args)}")
        done = self.sandbox.run_cli(args, self.approver_token)
        for line in (done.stdout + done.stderr).splitlines():
            _say(f"     {line}")
        if done.returncode != 0:
            raise DemoFailed(f"`custody approvals approve` exited with code {done.returncode}")
        waiter.join(60)
        if "error" in waited:
            raise DemoFailed(f"the agent's wait failed: {type(waited['error']).__name__}")
        if "signed" not in waited:
            raise DemoFailed("the agent's wait did not return")
        signed = waited["signed"]
        _say(f"   the agent's wait returned: signed, tx {signed.hash.to_0x_hex()}")
        self.send(bytes(signed.raw_transaction), before)
        limit = self.eth_limit()
        _say(f"   left today: {_eth(limit.remaining)} of {_eth(limit.limit)}")

    def x402(self) -> None:
        missing = _missing("x402", "fastapi")
        if missing is not None:
            self.title("x402: skipped")
            _say(f'   needs the x402 extra ({missing} is not installed): pip install "agent-custody[x402]"')
            return
        import asyncio

        self.title(f"x402: the agent buys a report for {_usdc(REPORT_PRICE)} from a paid API")
        asyncio.run(self._buy_report())

    async def _buy_report(self) -> None:
        import httpx
        from x402.http.clients.httpx import x402_httpx_transport

        from custody.devchain.paywall import x402_paywall
        from custody.integrations.x402 import CustodyX402Signer, allow_asset, x402_client

        chain, usdc = self.chain, self.usdc
        paywall = x402_paywall(
            chain, usdc, pay_to=self.seller, price=REPORT_PRICE, path="/report", content={"report": "all green"}
        )
        signer = CustodyX402Signer(self.client, self.wallet_id, purpose="daily report")
        payer = x402_client(signer, networks=chain.network, allowed_assets=[allow_asset(chain.network, usdc.address)])
        transport = x402_httpx_transport(payer, httpx.ASGITransport(app=paywall.app))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=paywall.app)) as plain:
            first = await plain.get("http://reports.local/report")
        if first.status_code != 402:
            raise DemoFailed(f"the paid API answered {first.status_code} without a payment")
        _say(f"   GET /report -> {first.status_code} Payment Required ({_usdc(REPORT_PRICE)} to the report seller)")
        async with httpx.AsyncClient(transport=transport, base_url="http://reports.local") as http:
            paid = await http.get("/report")
        if paid.status_code != 200 or not paywall.settled:
            raise DemoFailed(f"the paid request answered {paid.status_code}")
        _say("   the x402 client asked the service to sign an EIP-3009 authorization; the policy saw the token,")
        _say("   the payee and the amount, and allowed it within the daily USDC cap")
        _say(f"   200 {json.dumps(paid.json())}; the seller's facilitator settled it: tx {paywall.settled[-1]}")
        _say(f"   seller's balance: {_usdc(usdc.balance_of(self.seller))}")

    def audit(self) -> None:
        self.title("Everything above is in the audit log")
        result = self.sandbox.audit_verify()
        if not result.get("ok"):
            raise DemoFailed("the audit log does not verify")
        _say(
            f"   {result['count']} hash-chained records (requests, decisions, the approval, signatures, admin "
            "changes); the chain verifies"
        )


def _eth(wei: int | None) -> str:
    from custody.devchain.sandbox import format_units

    return format_units(wei or 0, 18, "ETH")


def _usdc(units: int) -> str:
    from custody.devchain.sandbox import format_units

    return format_units(units, 6, "USDC")


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment is not None else "never (more than the whole limit)"


def _amount(reason: Reason, value: int | None) -> str:
    """A reason's amount in its asset, from the counter (``<chain id>:native`` or ``<chain id>:<token>``)."""
    from custody.devchain.sandbox import format_units

    if value is None:
        return "-"
    counter = reason.counter or ""
    if counter.endswith(":native"):
        return format_units(value, 18, "ETH")
    if ":0x" in counter:
        return format_units(value, 6, "USDC")
    return f"{value} base units"
