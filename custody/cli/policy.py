"""``custody policy``: validate a policy, print its JSON Schema, dry-run an intent against it.

Exit codes: 0 success (for ``explain``, whatever the decision), 1 invalid input.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from custody.policyfile import (
    PolicyFileError,
    load_grant_file,
    load_intent_file,
    load_policy_file,
    load_spend_file,
)
from policies import Decision, MemorySpend, evaluate, grant_json_schema, policy_json_schema

policy_app = typer.Typer(help="Validate and dry-run wallet policies.", no_args_is_help=True)

JSON_FLAG = typer.Option(False, "--json", help="Print machine-readable JSON.")


def _fail(error: PolicyFileError, as_json: bool) -> typer.Exit:
    if as_json:
        problem = {
            "code": error.code,
            "file": str(error.path),
            "errors": [{"field": field, "message": message} for field, message in error.errors],
        }
        typer.echo(json.dumps(problem, indent=2, sort_keys=True))
    else:
        for field, message in error.errors:
            typer.echo(f"error [{error.code}]: {error.path}: {field}: {message}", err=True)
    return typer.Exit(1)


@policy_app.command()
def validate(
    file: Path = typer.Argument(..., help="Policy (.yaml, .yml or .json)."), as_json: bool = JSON_FLAG
) -> None:
    """Check a policy document; name every invalid field."""
    try:
        policy = load_policy_file(file)
    except PolicyFileError as error:
        raise _fail(error, as_json) from None
    if as_json:
        typer.echo(json.dumps({"valid": True, "file": str(file), "rules": len(policy.rules)}, sort_keys=True))
    else:
        typer.echo(f"{file}: valid (schema_version {policy.schema_version}, {len(policy.rules)} rules)")


@policy_app.command()
def schema(
    grant: bool = typer.Option(False, "--grant", help="The grant schema instead of the policy schema."),
    as_json: bool = JSON_FLAG,
) -> None:
    """Print the JSON Schema of policy documents (for editors). Always JSON."""
    typer.echo(json.dumps(grant_json_schema() if grant else policy_json_schema(), indent=2, sort_keys=True))


def _print_decision(decision: Decision) -> None:
    for verdict in decision.verdicts:
        typer.echo(f"  {verdict.source:6} {verdict.rule_id:24} {verdict.rule_type:20} {verdict.verdict}")
        for reason in verdict.reasons:
            typer.echo(f"           - {reason.code}: {reason.message}")
    typer.echo(f"decision: {decision.outcome}")
    if decision.quorum is not None:
        typer.echo("approvals: " + ", ".join(f"{q.m} of {q.group}" for q in decision.approvals))
    for reason in decision.reasons:
        extra = []
        if reason.remaining is not None:
            extra.append(f"remaining {reason.remaining}")
        if reason.resets_at is not None:
            extra.append(f"resets at {reason.resets_at.isoformat()}")
        suffix = f" ({', '.join(extra)})" if extra else ""
        typer.echo(f"  {reason.code} [{reason.rule_id}]: {reason.message}{suffix}")


def _parse_now(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        now = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter("use ISO 8601 with an offset, e.g. 2026-01-01T12:00:00Z") from None
    if now.tzinfo is None:
        raise typer.BadParameter("--now needs a UTC offset, e.g. 2026-01-01T12:00:00Z")
    return now


@policy_app.command()
def explain(
    file: Path = typer.Argument(..., help="Policy (.yaml, .yml or .json)."),
    intent_file: Path = typer.Option(..., "--intent", help="An intent, or a transaction/typed_data/message request."),
    spend_file: Path | None = typer.Option(None, "--spend", help="Past payments: a list of spend records."),
    grant_file: Path | None = typer.Option(None, "--grant", help="An agent's grant on the wallet."),
    now_text: str | None = typer.Option(None, "--now", help="Evaluate at this time (ISO 8601); default: now."),
    as_json: bool = JSON_FLAG,
) -> None:
    """Dry run: each rule's verdict and the final decision for one intent."""
    now = _parse_now(now_text)
    try:
        policy = load_policy_file(file)
        intent = load_intent_file(intent_file)
        records = load_spend_file(spend_file) if spend_file is not None else []
        grant = load_grant_file(grant_file, policy) if grant_file is not None else None
    except PolicyFileError as error:
        raise _fail(error, as_json) from None
    decision = evaluate(policy, intent, MemorySpend(records), now, grant)
    if as_json:
        data: dict[str, Any] = {"intent": intent.model_dump(mode="json"), "decision": decision.model_dump(mode="json")}
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        typer.echo(f"intent: {intent.kind.value} on chain {intent.chain_id} at {now.isoformat()}")
        _print_decision(decision)
