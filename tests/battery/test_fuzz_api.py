"""Fuzz the API with schemathesis against its own OpenAPI document, as an agent and as an operator.

The service runs for real (uvicorn on a loopback port, the signer, a seeded database). Every
operation is fuzzed with schema-valid and schema-violating requests; most generated requests
use ids that exist, so the fuzzer gets past "not found". Each response must be no
server error, have a documented status code and content type, match its documented schema,
carry no stack trace and never echo the caller's credential.

The CI run uses SQLite and a few dozen examples per operation; ``--soak`` runs many more on both
backends. Long polls (``wait`` on a payment) are capped at a fraction of a second; the bound
itself is still fuzzed (values above 30 must be refused).
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from custody.api.app import create_app
from custody.settings import Settings
from custody.storage.db import create_engine
from tests.battery.api_seed import World, redact, seed
from tests.conftest import LiveServer, SignerThread
from tests.processes import first_admin_token

AGENT_PATHS = r"^/v1/|^/healthz$"
OPERATOR_PATHS = r"^/(?!v1/)"  # everything else: the admin API, readiness, metrics
STACK_TRACE = re.compile(
    r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+|\b(sqlalchemy|asyncpg|sqlite3|pydantic_core)\.",
)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def no_stack_trace(ctx: Any, response: Any, case: Any) -> None:
    assert not STACK_TRACE.search(response.text or ""), "the response contains a stack trace or a driver's error"


def never_echoes(secret: str) -> Callable[[Any, Any, Any], None]:
    def no_credential_echo(ctx: Any, response: Any, case: Any) -> None:
        assert secret not in (response.text or ""), "the response contains the caller's credential"

    return no_credential_echo


class QuietServer(LiveServer):
    """The live server without background tasks: no fuzzed webhook URL is ever called."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.server.config.app = create_app(settings, background=False)


async def _seed(url: str, token: str, settings: Settings) -> World:
    engine = create_engine(settings.sqlalchemy_url)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await seed(client, token, engine)
    finally:
        await engine.dispose()


@pytest.fixture
def served(settings: Settings, signer: SignerThread) -> Iterator[tuple[str, World]]:
    """A seeded service on a loopback port; the agent rate limit is out of the way of the fuzzer."""
    settings = settings.model_copy(update={"agent_rate_limit_per_minute": 1_000_000})
    token = asyncio.run(first_admin_token(settings))
    server = QuietServer(settings).start()
    try:
        yield server.url, asyncio.run(_seed(server.url, token, settings))
    finally:
        server.stop()


def _schema(url: str) -> Any:
    """The service's own OpenAPI document, as it serves it."""
    schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json").json())
    schema.config.update(base_url=url)
    return schema


def _known(world: World) -> dict[str, list[str]]:
    """Ids that exist. Keys, operators and webhooks are spares, so the caller's own stay valid."""
    return {
        "wallet_id": [world.wallet_a, world.wallet_b, world.spare_wallet],
        "payment_id": [world.signed_a, world.pending_a, world.signed_b],
        "agent_id": [world.agent_a, world.agent_b],
        "key_id": list(world.spare_key_ids),
        "operator_id": list(world.spare_operator_ids),
        "webhook_id": list(world.webhook_ids),
    }


def _cases(operation: Any, mode: GenerationMode, known: dict[str, list[str]]) -> Any:
    names = [parameter.name for parameter in operation.path_parameters]
    strategies = [operation.as_strategy(generation_mode=mode)]
    if names and all(name in known for name in names):
        strategies += [
            operation.as_strategy(generation_mode=mode, path_parameters=dict(zip(names, ids, strict=True)))
            for ids in itertools.product(*(known[name] for name in names))
        ]
    return st.one_of(strategies)


def _has_inputs(operation: Any) -> bool:
    """Whether there is anything to make invalid (no negative case exists otherwise)."""
    inputs = (operation.path_parameters, operation.query, operation.headers, operation.body)
    return any(len(parameters) for parameters in inputs)


def _fuzz_operation(
    operation: Any, mode: GenerationMode, known: dict[str, list[str]], token: str, examples: int, max_wait: float
) -> set[int]:
    """Run one operation's cases; returns the statuses seen (a check failure raises)."""
    headers = {"Authorization": f"Bearer {token}"}
    extra_checks = [no_stack_trace, never_echoes(token)]
    seen: set[int] = set()

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @given(case=_cases(operation, mode, known))
    def run(case: Any) -> None:
        wait = case.query.get("wait") if case.query else None
        if isinstance(wait, int | float) and not isinstance(wait, bool) and max_wait < wait <= 30:
            case.query["wait"] = max_wait
        response = case.call_and_validate(headers=headers, checks=CHECKS, additional_checks=extra_checks)
        seen.add(response.status_code)

    run()
    return seen


def fuzz(url: str, world: World, token: str, paths: str, examples: int, max_wait: float) -> dict[str, set[int]]:
    """Fuzz the operations whose path matches ``paths``; returns the statuses seen per operation."""
    operations = [result.ok() for result in _schema(url).include(path_regex=paths).get_all_operations()]
    assert operations, f"no operation matches {paths}"
    known = _known(world)
    failures: list[str] = []
    seen: dict[str, set[int]] = {}
    for operation in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if _has_inputs(operation) else [])
        for mode in modes:
            try:
                statuses = _fuzz_operation(operation, mode, known, token, examples, max_wait)
            except (AssertionError, BaseExceptionGroup) as failure:
                failures.append(f"{operation.label} ({mode.value}): {failure}")
            else:
                seen.setdefault(operation.label, set()).update(statuses)
    assert not failures, redact("\n\n".join(failures))
    return seen


@pytest.mark.parametrize("backend", ["sqlite"])
def test_agent_api_fuzzing_finds_no_server_error_or_undocumented_response(served: tuple[str, World]) -> None:
    url, world = served
    seen = fuzz(url, world, world.key_a, AGENT_PATHS, examples=25, max_wait=0.05)
    # The seeded ids let the fuzzer reach real answers, not only refusals.
    assert 200 in seen["GET /v1/payments/{payment_id}"]
    assert 200 in seen["GET /v1/wallets/{wallet_id}/limits"]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_operator_api_fuzzing_finds_no_server_error_or_undocumented_response(served: tuple[str, World]) -> None:
    url, world = served
    seen = fuzz(url, world, world.admin, OPERATOR_PATHS, examples=20, max_wait=0.05)
    assert 200 in seen["GET /admin/v1/wallets/{wallet_id}"]
    assert 204 in seen["DELETE /admin/v1/webhooks/{webhook_id}"]


@pytest.mark.soak
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_agent_api_soak_fuzzing(served: tuple[str, World]) -> None:
    url, world = served
    fuzz(url, world, world.key_a, AGENT_PATHS, examples=400, max_wait=0.5)


@pytest.mark.soak
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_operator_api_soak_fuzzing(served: tuple[str, World]) -> None:
    url, world = served
    fuzz(url, world, world.admin, OPERATOR_PATHS, examples=250, max_wait=0.5)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_not_ready_answer_matches_its_documented_schema(served: tuple[str, World], signer: SignerThread) -> None:
    url, _ = served
    operation = _schema(url)["/readyz"]["GET"]
    signer.stop()
    conformance = [check for check in CHECKS if check is not not_a_server_error]  # a 503 is the point here
    response = operation.Case().call_and_validate(checks=conformance, additional_checks=[no_stack_trace])
    assert response.status_code == 503
    assert response.json()["signer"] == "unavailable"


def test_the_openapi_document_promises_400_problems_for_invalid_requests_never_422(tmp_path: Path) -> None:
    document = create_app(Settings(data_dir=tmp_path), background=False).openapi()
    operations = [op for path in document["paths"].values() for op in path.values()]
    assert all("422" not in op["responses"] for op in operations)
    with_inputs = [op for op in operations if op.get("parameters") or op.get("requestBody")]
    assert with_inputs
    assert all("400" in op["responses"] for op in with_inputs)
    assert "HTTPValidationError" not in document["components"]["schemas"]
