"""The ledger against a reference model: a hypothesis state machine drives the real service.

The service runs in process (the real app over ASGI, the real signer, a real database) with its
clock replaced by one the test moves, so windows, period boundaries and approval expiry are
crossed without sleeping. A small model keeps the same story in plain Python: the policy in
force, every payment and its status, and the ledger entries (time and amount). After every step
the service must agree with the model: the answers, what ``/limits`` reports, the payments and
their statuses, the pending approvals and every ledger row.

Steps: pay (allowed and signed at once, held for approval, or denied), pay exactly what remains
(and one more, one less), pay while the signer is down (nothing may stay reserved), replay a
request by its Idempotency-Key, approve, reject, move the clock (by edge amounts such as exactly
a window's length, and to just before, at and after an approval's expiry), change the policy
(caps and thresholds up or down).

The policy: a calendar-day cap (in a time zone with daylight saving time, or UTC), a rolling
6-hour cap, at most N payments per rolling hour, and approval above an amount (or none).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

import httpx
import pytest
from hypothesis import HealthCheck, Phase
from hypothesis import settings as budget
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select
from web3 import Web3

from custody.payments import service
from custody.payments.ledger import ledger_entries, payments
from custody.settings import Settings
from custody.signer.client import SignerClient
from custody.storage.types import as_utc
from tests.conftest import SignerThread
from tests.payments.helpers import GAS, transfer

CHAIN = 31337
NATIVE = f"{CHAIN}:native"
BOB = Web3.to_checksum_address("0x" + "b0" * 20)
UNIT = 10**15
ROLLING = timedelta(hours=6)
PACE = timedelta(hours=1)
TTL = service.APPROVAL_TTL
TICK = timedelta(microseconds=1)
# Starting points: just before a daylight saving change in Paris (a 23-hour and a 25-hour local
# day), and a few milliseconds before a UTC midnight.
STARTS = (
    datetime(2031, 3, 29, 21, 0, tzinfo=UTC),
    datetime(2031, 10, 25, 21, 30, tzinfo=UTC),
    datetime(2031, 6, 15, 23, 59, 59, 995_000, tzinfo=UTC),
)
STEPS = (
    TICK,
    timedelta(seconds=1),
    timedelta(minutes=59, seconds=59),
    PACE,
    ROLLING - TICK,
    ROLLING,
    timedelta(hours=11),
    timedelta(hours=23),
    TTL,
    timedelta(days=2, hours=1),
)
ZONES = ("UTC", "Europe/Paris")


# The model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyModel:
    zone: str
    daily: int
    rolling: int
    pace: int
    above: int | None

    def document(self) -> dict[str, Any]:
        rules: list[dict[str, Any]] = [
            {"id": "send", "type": "allow_transfers", "kinds": ["native_transfer"]},
            {"id": "payees", "type": "payee_allowlist", "payees": [{"address": BOB, "label": "bob"}]},
            {"id": "daily", "type": "cap", "asset": "eth", "max": str(self.daily), "period": "day"},
            {"id": "rolling", "type": "cap", "asset": "eth", "max": str(self.rolling), "rolling": "6h"},
            {"id": "pace", "type": "velocity", "max_payments": self.pace, "rolling": "1h"},
        ]
        if self.above is not None:
            rules.append(
                {"id": "big", "type": "require_approval", "asset": "eth", "above": str(self.above), "group": "ops"}
            )
        return {
            "schema_version": 1,
            "id": "model",
            "timezone": self.zone,
            "assets": {"eth": {"chain_id": CHAIN, "address": "native", "decimals": 18}},
            "approver_groups": {"ops": {"members": ["admin"]}},
            "rules": rules,
        }


policies = st.builds(
    PolicyModel,
    zone=st.sampled_from(ZONES),
    daily=st.integers(4, 60).map(lambda k: k * UNIT),
    rolling=st.integers(2, 40).map(lambda k: k * UNIT),
    pace=st.integers(1, 5),
    above=st.one_of(st.none(), st.integers(1, 20).map(lambda k: k * UNIT)),
)


@dataclass
class PaymentModel:
    cost: int
    status: str  # signed, denied, pending_approval, rejected, expired, failed
    expires_at: datetime | None = None

    def status_at(self, now: datetime) -> str:
        if self.status == "pending_approval" and self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return self.status


@dataclass(frozen=True)
class Entry:
    payment_id: str
    at: datetime
    cost: int


@dataclass(frozen=True)
class Window:
    rule_id: str
    counter: str
    limit: int
    start: datetime
    end: datetime
    rolling: timedelta | None


@dataclass
class LedgerModel:
    """What the service should know: the policy, every payment, the reserved and signed spend."""

    policy: PolicyModel
    payments: dict[str, PaymentModel] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)

    def windows(self, now: datetime) -> list[Window]:
        zone = ZoneInfo(self.policy.zone)
        today = now.astimezone(zone).date()
        day_start = datetime.combine(today, time(0), tzinfo=zone).astimezone(UTC)
        day_end = datetime.combine(today + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)
        return [
            Window("daily", NATIVE, self.policy.daily, day_start, day_end, None),
            Window("rolling", NATIVE, self.policy.rolling, now - ROLLING + TICK, now + ROLLING, ROLLING),
            Window("pace", "payments", self.policy.pace, now - PACE + TICK, now + PACE, PACE),
        ]

    def _amounts(self, window: Window) -> list[tuple[datetime, int]]:
        inside = sorted(e.at for e in self.entries if window.start <= e.at < window.end)
        if window.counter == "payments":
            return [(at, 1) for at in inside]
        return sorted((e.at, e.cost) for e in self.entries if window.start <= e.at < window.end)

    def spent(self, window: Window) -> int:
        return sum(amount for _, amount in self._amounts(window))

    def _reached(self, window: Window, threshold: int) -> datetime | None:
        running = 0
        for at, amount in self._amounts(window):
            running += amount
            if running >= threshold:
                return at
        return None

    def limits(self, now: datetime) -> list[dict[str, Any]]:
        found = []
        for window in self.windows(now):
            spent = self.spent(window)
            if window.rolling is None:
                resets: datetime | None = window.end
            else:
                oldest = self._reached(window, 1) if spent else None
                resets = None if oldest is None else oldest + window.rolling
            found.append(
                {
                    "rule_id": window.rule_id,
                    "source": "policy",
                    "counter": window.counter,
                    "limit": window.limit,
                    "spent": spent,
                    "remaining": max(0, window.limit - spent),
                    "window_start": window.start,
                    "window_end": window.end,
                    "resets_at": resets,
                }
            )
        return found

    def judge(self, cost: int, now: datetime) -> tuple[str, list[dict[str, Any]]]:
        """The engine's outcome and reasons (without messages) for a payment of ``cost`` at ``now``."""
        denials = []
        for window in self.windows(now):
            amount = 1 if window.counter == "payments" else cost
            spent = self.spent(window)
            if spent + amount <= window.limit:
                continue
            if amount > window.limit:
                resets = None
            elif window.rolling is None:
                resets = window.end
            else:
                reached = self._reached(window, spent + amount - window.limit)
                assert reached is not None
                resets = reached + window.rolling
            code = "velocity_exceeded" if window.counter == "payments" else "cap_exceeded"
            reason: dict[str, Any] = {
                "code": code,
                "rule_id": window.rule_id,
                "counter": window.counter,
                "limit": window.limit,
                "remaining": max(0, window.limit - spent),
            }
            if resets is not None:
                reason["resets_at"] = resets
            denials.append(reason)
        if denials:
            return "deny", denials
        if self.policy.above is not None and cost > self.policy.above:
            return "needs_approval", [{"code": "approval_required", "rule_id": "big"}]
        return "allow", []

    def reserve(self, payment_id: str, cost: int, now: datetime) -> None:
        self.entries.append(Entry(payment_id, now, cost))
        for window in self.windows(now):
            assert self.spent(window) <= window.limit, "the model itself overspent"


def _reasons(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A service reason, without its message, with figures as integers and instants."""
    out = []
    for reason in raw:
        item: dict[str, Any] = {k: reason[k] for k in ("code", "rule_id", "counter") if k in reason}
        for key in ("limit", "remaining"):
            if key in reason:
                item[key] = int(reason[key])
        if "resets_at" in reason:
            item["resets_at"] = datetime.fromisoformat(reason["resets_at"])
        out.append(item)
    return out


# The service under test -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = STARTS[0]

    def __call__(self) -> datetime:
        return self.now


class Harness:
    """The real app in process, on an event loop of its own that the (synchronous) state machine drives."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clock = Clock()
        self.runner = asyncio.Runner()
        self.stack = AsyncExitStack()
        self.serial = 0
        self.run(self._open())

    async def _open(self) -> None:
        from custody.api.app import create_app
        from custody.services.operators import ensure_first_admin

        app = create_app(self.settings, background=False)
        await self.stack.enter_async_context(app.router.lifespan_context(app))
        self.ctx = app.state.ctx
        token = await ensure_first_admin(self.ctx)
        transport = httpx.ASGITransport(app=app)
        self.admin = await self.stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://custody.test")
        )
        self.admin.headers["Authorization"] = f"Bearer {token}"

    def run(self, coroutine: Any) -> Any:
        return self.runner.run(coroutine)

    def close(self) -> None:
        try:
            self.run(self.stack.aclose())
        finally:
            self.runner.close()


class LedgerMachine(RuleBasedStateMachine):
    harness: ClassVar[Harness]

    def __init__(self) -> None:
        super().__init__()
        self.h = type(self).harness
        self.model: LedgerModel
        self.wallet_id = ""
        self.headers: dict[str, str] = {}
        # Idempotency-Key -> the body sent, its value, the status and the answer received.
        self.requests: dict[str, tuple[dict[str, Any], int, int, dict[str, Any]]] = {}

    # Plumbing ---------------------------------------------------------------------------------

    @property
    def now(self) -> datetime:
        return self.h.clock.now

    def _call(self, method: str, url: str, **kw: Any) -> httpx.Response:
        response: httpx.Response = self.h.run(self.h.admin.request(method, url, **kw))
        return response

    def _set_policy(self, policy: PolicyModel) -> None:
        response = self._call("PUT", f"/admin/v1/wallets/{self.wallet_id}/policy", json={"document": policy.document()})
        assert response.status_code == 200, response.text

    def _submit(self, body: dict[str, Any], key: str) -> httpx.Response:
        return self._call(
            "POST",
            f"/v1/wallets/{self.wallet_id}/sign/transaction",
            json=body,
            headers=self.headers | {"Idempotency-Key": key},
        )

    def _pay(self, value: int, *, signer_up: bool = True, key: str | None = None) -> None:
        """Send a payment and check the answer against the model's judgement; update the model."""
        cost = value + GAS
        outcome, reasons = self.model.judge(cost, self.now)
        if key is None:
            self.h.serial += 1
            key = f"k{self.h.serial}"
            body = {"transaction": transfer(CHAIN, BOB, value, self.h.serial)}
        else:
            body = self.requests[key][0]
        if signer_up:
            response = self._submit(body, key)
        else:
            with self._signer_down():
                response = self._submit(body, key)
        answer = response.json()
        payment_id = answer.get("payment_id")
        if outcome == "deny":
            assert response.status_code == 403, response.text
            assert _reasons(answer["reasons"]) == reasons
            self.model.payments[payment_id] = PaymentModel(cost, "denied")
        elif outcome == "needs_approval":
            assert response.status_code == 202, response.text
            assert _reasons(answer["reasons"]) == reasons
            assert datetime.fromisoformat(answer["expires_at"]) == self.now + TTL
            self.model.payments[payment_id] = PaymentModel(cost, "pending_approval", self.now + TTL)
        elif signer_up:
            assert response.status_code == 200, response.text
            assert answer["status"] == "signed"
            self.model.payments[payment_id] = PaymentModel(cost, "signed")
            self.model.reserve(payment_id, cost, self.now)
        else:
            assert response.status_code == 503, response.text
            assert answer["code"] == "signer_unavailable"
            # The failed payment is recorded, but its reservation must be gone.
            self.model.payments[self._newest_payment()] = PaymentModel(cost, "failed")
        self.requests[key] = (body, value, response.status_code, answer)

    def _newest_payment(self) -> str:
        async def newest() -> str:
            async with self.h.ctx.engine.connect() as conn:
                rows = await conn.execute(select(payments.c.id).where(payments.c.wallet_id == self.wallet_id))
                unknown = [str(r.id) for r in rows if r.id not in self.model.payments]
            assert len(unknown) == 1, unknown
            return unknown[0]

        found: str = self.h.run(newest())
        return found

    @contextmanager
    def _signer_down(self) -> Iterator[None]:
        """The service's signer client points at a socket nobody listens on."""
        ctx = self.h.ctx
        saved, ctx.signer = ctx.signer, SignerClient(ctx.settings.data_dir / "no-signer-here.sock", timeout=1)
        try:
            yield
        finally:
            ctx.signer = saved

    def _pending(self) -> list[str]:
        return sorted(pid for pid, p in self.model.payments.items() if p.status_at(self.now) == "pending_approval")

    def _votable(self) -> list[str]:
        return sorted(pid for pid, p in self.model.payments.items() if p.status == "pending_approval")

    # Set-up -------------------------------------------------------------------------------------

    @initialize(policy=policies, start=st.sampled_from(STARTS))
    def open_wallet(self, policy: PolicyModel, start: datetime) -> None:
        self.h.clock.now = start
        self.h.serial += 1
        name = f"model-{self.h.serial}"
        created = self._call("POST", "/admin/v1/wallets", json={"name": name})
        assert created.status_code == 201, created.text
        self.wallet_id = created.json()["id"]
        agent = self._call("POST", "/admin/v1/agents", json={"name": name})
        assert agent.status_code == 201, agent.text
        issued = self._call(
            "POST", f"/admin/v1/agents/{agent.json()['id']}/keys", json={"wallet_ids": [self.wallet_id]}
        )
        assert issued.status_code == 201, issued.text
        self.headers = {"Authorization": f"Bearer {issued.json()['api_key']}"}
        self.model = LedgerModel(policy)
        self._set_policy(policy)

    # Rules --------------------------------------------------------------------------------------

    @rule(value=st.integers(1, 30 * UNIT))
    def pay(self, value: int) -> None:
        self._pay(value)

    @rule(which=st.sampled_from(["daily", "rolling"]), offset=st.sampled_from([-1, 0, 1]))
    def pay_exactly_what_remains(self, which: str, offset: int) -> None:
        window = next(w for w in self.model.windows(self.now) if w.rule_id == which)
        value = window.limit - self.model.spent(window) - GAS + offset
        if value >= 1:
            self._pay(value)

    @rule(value=st.integers(1, 30 * UNIT))
    def pay_while_the_signer_is_down(self, value: int) -> None:
        self._pay(value, signer_up=False)

    @precondition(lambda self: bool(self.requests))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.requests)))
        body, value, status, answer = self.requests[key]
        if status == 503:
            # A transient failure released the key: the same request again is a new attempt.
            self._pay(value, key=key)
            return
        response = self._submit(body, key)
        assert response.status_code == status, response.text
        assert response.json() == answer

    def _vote(self, payment_id: str, choice: str, *, signer_up: bool = True) -> None:
        payment = self.model.payments[payment_id]
        url = f"/admin/v1/approvals/{payment_id}/{choice}"
        if signer_up:
            response = self._call("POST", url, json={})
        else:
            with self._signer_down():
                response = self._call("POST", url, json={})
        if payment.status_at(self.now) == "expired":
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "expired"
            payment.status = "expired"
            return
        if choice == "reject":
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "rejected"
            payment.status = "rejected"
            return
        outcome, reasons = self.model.judge(payment.cost, self.now)
        if outcome == "deny":
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "denied"
            assert _reasons(response.json()["reasons"]) == reasons
            payment.status = "denied"
        elif signer_up:
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "signed"
            payment.status = "signed"
            self.model.reserve(payment_id, payment.cost, self.now)
        else:
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "signer_unavailable"
            payment.status = "failed"

    @precondition(lambda self: bool(self._votable()))
    @rule(data=st.data(), signer_up=st.sampled_from([True, True, True, False]))
    def approve(self, data: st.DataObject, signer_up: bool) -> None:
        self._vote(data.draw(st.sampled_from(self._votable())), "approve", signer_up=signer_up)

    @precondition(lambda self: bool(self._votable()))
    @rule(data=st.data())
    def reject(self, data: st.DataObject) -> None:
        self._vote(data.draw(st.sampled_from(self._votable())), "reject")

    @precondition(lambda self: any(p.status != "pending_approval" for p in self.model.payments.values()))
    @rule(data=st.data())
    def vote_on_a_settled_payment(self, data: st.DataObject) -> None:
        settled = sorted(pid for pid, p in self.model.payments.items() if p.status != "pending_approval")
        payment_id = data.draw(st.sampled_from(settled))
        response = self._call("POST", f"/admin/v1/approvals/{payment_id}/approve", json={})
        assert response.status_code == 409, response.text
        assert response.json()["code"] == "conflict"

    @rule(step=st.sampled_from(STEPS))
    def advance_the_clock(self, step: timedelta) -> None:
        self.h.clock.now += step

    @rule(seconds=st.integers(1, 3 * 86_400))
    def advance_the_clock_at_random(self, seconds: int) -> None:
        self.h.clock.now += timedelta(seconds=seconds)

    @precondition(lambda self: bool(self._pending()))
    @rule(data=st.data(), offset=st.sampled_from([-TICK, timedelta(0), TICK]))
    def move_to_an_approval_expiry(self, data: st.DataObject, offset: timedelta) -> None:
        payment = self.model.payments[data.draw(st.sampled_from(self._pending()))]
        assert payment.expires_at is not None
        self.h.clock.now = max(self.now, payment.expires_at + offset)

    @precondition(lambda self: bool(self.model.entries))
    @rule(
        data=st.data(),
        length=st.sampled_from([ROLLING, PACE]),
        offset=st.sampled_from([-TICK, timedelta(0), TICK]),
    )
    def move_to_where_a_payment_leaves_its_window(
        self, data: st.DataObject, length: timedelta, offset: timedelta
    ) -> None:
        entry = data.draw(st.sampled_from(self.model.entries))
        self.h.clock.now = max(self.now, entry.at + length + offset)

    @rule(step=st.sampled_from([TICK, timedelta(seconds=1), timedelta(minutes=30), timedelta(hours=2)]))
    def the_clock_steps_back(self, step: timedelta) -> None:
        # A replica whose clock is behind: payments already made are in its future, and still count.
        self.h.clock.now -= step

    @rule(policy=policies)
    def change_the_policy(self, policy: PolicyModel) -> None:
        self._set_policy(policy)
        self.model.policy = policy

    @rule(double=st.booleans())
    def halve_or_double_the_caps(self, double: bool) -> None:
        old = self.model.policy
        daily, rolling = (old.daily * 2, old.rolling * 2) if double else (old.daily // 2, old.rolling // 2)
        policy = PolicyModel(old.zone, daily, rolling, old.pace, old.above)
        self._set_policy(policy)
        self.model.policy = policy

    # What must always hold ----------------------------------------------------------------------

    @invariant()
    def the_service_agrees_with_the_model(self) -> None:
        limits = self._call("GET", f"/v1/wallets/{self.wallet_id}/limits", headers=self.headers)
        assert limits.status_code == 200, limits.text
        seen = [
            {
                **item,
                "limit": int(item["limit"]),
                "spent": int(item["spent"]),
                "remaining": int(item["remaining"]),
                "window_start": datetime.fromisoformat(item["window_start"]),
                "window_end": datetime.fromisoformat(item["window_end"]),
                "resets_at": datetime.fromisoformat(item["resets_at"]) if item["resets_at"] else None,
            }
            for item in limits.json()["limits"]
        ]
        assert seen == self.model.limits(self.now)

        approvals = self._call("GET", "/admin/v1/approvals")
        listed = sorted(p["payment_id"] for p in approvals.json()["pending"] if p["wallet_id"] == self.wallet_id)
        assert listed == self._pending()

        async def stored() -> tuple[dict[str, str], list[tuple[str, str, int, datetime]]]:
            async with self.h.ctx.engine.connect() as conn:
                rows = await conn.execute(
                    select(payments.c.id, payments.c.status, payments.c.expires_at).where(
                        payments.c.wallet_id == self.wallet_id
                    )
                )
                statuses = {}
                for r in rows:
                    expires = as_utc(r.expires_at)
                    expired = r.status == "pending_approval" and expires is not None and expires <= self.now
                    statuses[r.id] = "expired" if expired else r.status
                entries = await conn.execute(
                    select(
                        ledger_entries.c.payment_id,
                        ledger_entries.c.counter,
                        ledger_entries.c.amount,
                        ledger_entries.c.at,
                    ).where(ledger_entries.c.wallet_id == self.wallet_id)
                )
                return statuses, sorted((e.payment_id, e.counter, int(e.amount), as_utc(e.at)) for e in entries)

        statuses, entries = self.h.run(stored())
        assert statuses == {pid: p.status_at(self.now) for pid, p in self.model.payments.items()}
        expected = []
        for entry in self.model.entries:
            expected += [(entry.payment_id, NATIVE, entry.cost, entry.at), (entry.payment_id, "payments", 1, entry.at)]
        assert entries == sorted(expected)


def _run(settings: Settings, monkeypatch: pytest.MonkeyPatch, examples: int, steps: int, derandomize: bool) -> None:
    harness = Harness(settings)
    monkeypatch.setattr(service, "_now", harness.clock)
    LedgerMachine.harness = harness
    try:
        run_state_machine_as_test(
            LedgerMachine,
            settings=budget(
                max_examples=examples,
                stateful_step_count=steps,
                deadline=None,
                derandomize=derandomize,
                database=None,
                phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        del LedgerMachine.harness
        harness.close()


def test_the_ledger_agrees_with_the_reference_model(
    settings: Settings, signer: SignerThread, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    # Sized for CI (about a minute for both backends on a busy 2-core machine); --soak runs far more.
    _run(settings, monkeypatch, examples=8 if backend == "sqlite" else 6, steps=30, derandomize=True)


@pytest.mark.soak
def test_soak_the_ledger_agrees_with_the_reference_model(
    settings: Settings, signer: SignerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(settings, monkeypatch, examples=100, steps=50, derandomize=False)
