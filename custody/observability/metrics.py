"""Prometheus metrics, one registry per application (several apps can share a process).

Label values are bounded: outcomes and results are fixed words, reasons are the engine's
stable codes (anything else becomes ``other``), routes are route templates, never raw paths.
No update here may break a payment: every recording method swallows its own errors.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ParamSpec

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from custody.observability.logging import route_template
from policies import Decision

log = logging.getLogger("custody.metrics")
P = ParamSpec("P")

# Seconds. A decision is a few database round trips; a signature is well under a millisecond.
_FAST_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MAX_REASONS = 200
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_SIGNING_METHODS = frozenset({"transaction", "typed_data", "message"})
_OUTCOMES = {"allow": "allowed", "deny": "denied", "needs_approval": "pending"}
_AFTER_APPROVAL = {"allow": "approved", "deny": "denied", "needs_approval": "pending"}
_warned: set[str] = set()


def _never_raises(method: Callable[P, None]) -> Callable[P, None]:
    """Metrics are best effort: a failure is logged once per method and otherwise ignored."""

    @functools.wraps(method)
    def safe(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(*args, **kwargs)
        except Exception as exc:
            if method.__name__ not in _warned:
                _warned.add(method.__name__)
                log.warning("metrics update %s failed: %s", method.__name__, type(exc).__name__)

    return safe


@dataclass
class ServiceState:
    """What the gauges report, refreshed just before each scrape (None: unknown, not reported)."""

    pending_approvals: int | None = None
    database_up: bool | None = None
    signer_up: bool | None = None
    signer_sealed: bool | None = None


class _StateCollector:
    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        state = self.state
        if state.pending_approvals is not None:
            yield GaugeMetricFamily(
                "custody_pending_approvals", "Payments waiting for an approval quorum.", state.pending_approvals
            )
        if state.database_up is not None:
            yield GaugeMetricFamily("custody_database_up", "1 if the database answered.", int(state.database_up))
        if state.signer_up is not None:
            yield GaugeMetricFamily("custody_signer_up", "1 if the signer answered.", int(state.signer_up))
        if state.signer_up and state.signer_sealed is not None:
            yield GaugeMetricFamily(
                "custody_signer_sealed", "1 if the signer is sealed (signs nothing).", int(state.signer_sealed)
            )


class Metrics:
    """The service's metrics and the registry that exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "custody_decisions",
            "Payment decisions by outcome, one increment per distinct reason code.",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "custody_decision_seconds",
            "Time to decide a payment: wallet lock, policy evaluation, reservation, commit.",
            ["outcome"],
            buckets=_FAST_BUCKETS,
            registry=self.registry,
        )
        self.signing_seconds = Histogram(
            "custody_signing_seconds",
            "Time to have a reserved payment signed: fetch the wrapped key, ask the signer.",
            ["method", "result"],
            buckets=_FAST_BUCKETS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "custody_http_requests",
            "HTTP requests by method, route template and status class.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "custody_http_request_seconds",
            "HTTP request duration by method and route template.",
            ["method", "route"],
            buckets=_FAST_BUCKETS,
            registry=self.registry,
        )
        self.state = ServiceState()
        self.registry.register(_StateCollector(self.state))
        self._reasons: set[str] = set()

    # Payment decisions ---------------------------------------------------------------

    @_never_raises
    def decided(self, decision: Decision, started: float | None = None) -> None:
        """An agent's request decided by the engine (``started``: its ``time.perf_counter()``)."""
        outcome = _OUTCOMES[decision.outcome]
        self._count(outcome, [reason.code for reason in decision.reasons])
        self._time(outcome, started)

    @_never_raises
    def decided_after_approval(self, decision: Decision) -> None:
        """The new evaluation made when the last approval needed came in."""
        self._count(_AFTER_APPROVAL[decision.outcome], [reason.code for reason in decision.reasons])

    @_never_raises
    def rejected(self) -> None:
        """An approver rejected a pending payment."""
        self._count("rejected", ["approval_rejected"])

    @_never_raises
    def refused(self, code: str, started: float | None = None) -> None:
        """A request refused without a policy decision (frozen, unknown wallet, bad input)."""
        self._count("refused", [code])
        self._time("refused", started)

    @_never_raises
    def signed(self, method: str, started: float, error: str | None = None) -> None:
        """A signing attempt finished (``error``: it failed)."""
        label = method if method in _SIGNING_METHODS else "other"
        result = "ok" if error is None else "error"
        self.signing_seconds.labels(label, result).observe(time.perf_counter() - started)

    def _count(self, outcome: str, codes: Iterable[str]) -> None:
        for code in sorted(set(codes)) or ["none"]:
            self.decisions.labels(outcome, self._reason(code)).inc()

    def _time(self, outcome: str, started: float | None) -> None:
        if started is not None:
            self.decision_seconds.labels(outcome).observe(time.perf_counter() - started)

    def _reason(self, code: str) -> str:
        if code in self._reasons:
            return code
        if not _CODE.fullmatch(code) or len(self._reasons) >= _MAX_REASONS:
            return "other"
        self._reasons.add(code)
        return code

    # HTTP ----------------------------------------------------------------------------

    @_never_raises
    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in _METHODS else "other"
        self.http_requests.labels(method, route, f"{status // 100}xx").inc()
        self.http_seconds.labels(method, route).observe(seconds)


class HttpMetrics:
    """ASGI middleware: count and time every HTTP request by route template and status class."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an error that escapes the app becomes a 5xx answer further out

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            self.metrics.http_request(
                str(scope.get("method", "")), route_template(scope), status, time.perf_counter() - started
            )
