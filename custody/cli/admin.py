"""Operator commands over the admin API: agents and keys, policies and grants, approvals, freezes."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import typer

from custody.cli.operator import admin_request
from custody.cli.output import JsonOption, emit, errors_to_exit
from custody.policyfile import PolicyFileError, read_document
from custody.settings import Settings

agent_app = typer.Typer(help="Agents and their API keys.", no_args_is_help=True)
grant_app = typer.Typer(help="Agent grants (narrow a wallet's policy for one agent).", no_args_is_help=True)
approvals_app = typer.Typer(help="Payments waiting for human approval.", no_args_is_help=True)
OperatorOption = typer.Option(
    None, "--operator", help="Local mode: act as this operator (default CUSTODY_OPERATOR or admin)."
)


def _call(method: str, path: str, **kwargs: Any) -> Any:
    return admin_request(Settings(), method, path, **kwargs)


def _document(path: Path) -> dict[str, Any]:
    try:
        data = read_document(path)
    except PolicyFileError as error:
        raise typer.BadParameter(str(error)) from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path} must hold a mapping")
    return data


def _print(data: Any, as_json: bool, *lines: str) -> None:
    def human() -> None:
        for line in lines:
            typer.echo(line)

    emit(data, as_json, human)


@agent_app.command("create")
def agent_create(name: str, as_json: bool = JsonOption) -> None:
    """Create an agent (an identity that keys are issued to)."""
    with errors_to_exit(as_json):
        agent = _call("POST", "/admin/v1/agents", json={"name": name})
    _print(agent, as_json, f"{agent['id']}  {agent['name']}")


@agent_app.command("list")
def agent_list(as_json: bool = JsonOption) -> None:
    with errors_to_exit(as_json):
        data = _call("GET", "/admin/v1/agents")
    _print(data, as_json, *(f"{a['id']}  {a['name']}" for a in data["agents"]))


@agent_app.command("issue-key")
def agent_issue_key(
    agent_id: str,
    wallet: list[str] = typer.Option(..., "--wallet", help="A wallet id the key may use (repeatable)."),
    expires_at: datetime = typer.Option(None, help="ISO-8601 moment with a time zone; default: no expiry."),
    as_json: bool = JsonOption,
) -> None:
    """Issue an API key for an agent; it is printed once and stored only as a digest."""
    body: dict[str, Any] = {"wallet_ids": wallet}
    if expires_at is not None:
        body["expires_at"] = expires_at.isoformat()
    with errors_to_exit(as_json):
        issued = _call("POST", f"/admin/v1/agents/{agent_id}/keys", json=body)

    def human() -> None:
        typer.echo(f"key {issued['key']['id']} for {agent_id}, wallets {', '.join(issued['key']['wallet_ids'])}")
        typer.echo("API key (shown once; only its digest is stored):", err=True)
        typer.echo(f"  {issued['api_key']}")

    emit(issued, as_json, human)


@agent_app.command("keys")
def agent_keys(agent_id: str, as_json: bool = JsonOption) -> None:
    """List an agent's keys (ids, scope, expiry; never the secret)."""
    with errors_to_exit(as_json):
        data = _call("GET", f"/admin/v1/agents/{agent_id}/keys")
    lines = (f"{k['id']}  wallets={','.join(k['wallet_ids'])}  revoked={k['revoked_at'] or '-'}" for k in data["keys"])
    _print(data, as_json, *lines)


@agent_app.command("revoke-key")
def agent_revoke_key(agent_id: str, key_id: str, as_json: bool = JsonOption) -> None:
    """Revoke a key; it stops working at once."""
    with errors_to_exit(as_json):
        _call("DELETE", f"/admin/v1/agents/{agent_id}/keys/{key_id}")
    _print({"revoked": key_id}, as_json, f"revoked {key_id}")


def policy_set(wallet_id: str, file: Path, as_json: bool = JsonOption) -> None:
    """Set a new version of a wallet's policy from a YAML or JSON file."""
    document = _document(file)
    with errors_to_exit(as_json):
        version = _call("PUT", f"/admin/v1/wallets/{wallet_id}/policy", json={"document": document})
    _print(version, as_json, f"{wallet_id}: policy version {version['version']}")


def policy_show(wallet_id: str, as_json: bool = JsonOption) -> None:
    """Show the policy in force for a wallet."""
    with errors_to_exit(as_json):
        version = _call("GET", f"/admin/v1/wallets/{wallet_id}/policy")
    emit(version, as_json, lambda: typer.echo(json.dumps(version, indent=2)))


def policy_history(wallet_id: str, as_json: bool = JsonOption) -> None:
    """List every version of a wallet's policy."""
    with errors_to_exit(as_json):
        data = _call("GET", f"/admin/v1/wallets/{wallet_id}/policy/versions")
    _print(data, as_json, *(f"v{v['version']}  {v['created_at']}  by {v['created_by']}" for v in data["versions"]))


def policy_diff(wallet_id: str, old: int, new: int, as_json: bool = JsonOption) -> None:
    """Show what changed between two versions of a wallet's policy."""
    with errors_to_exit(as_json):
        data = _call("GET", f"/admin/v1/wallets/{wallet_id}/policy/diff", params={"from": old, "to": new})
    emit(data, as_json, lambda: typer.echo(data["diff"] or "(no difference)"))


@grant_app.command("set")
def grant_set(agent_id: str, wallet_id: str, file: Path, as_json: bool = JsonOption) -> None:
    """Give an agent a grant on a wallet from a YAML or JSON file."""
    document = _document(file)
    with errors_to_exit(as_json):
        grant = _call("PUT", f"/admin/v1/agents/{agent_id}/grants/{wallet_id}", json={"document": document})
    _print(grant, as_json, f"grant v{grant['version']} for {agent_id} on {wallet_id}")


@approvals_app.command("list")
def approvals_list(as_json: bool = JsonOption) -> None:
    """Payments waiting for approval."""
    with errors_to_exit(as_json):
        data = _call("GET", "/admin/v1/approvals")

    def human() -> None:
        if not data["pending"]:
            typer.echo("nothing waits for approval")
        for p in data["pending"]:
            why = "; ".join(r["message"] for r in p.get("reasons", []))
            typer.echo(
                f"{p['payment_id']}  wallet {p['wallet_id']}  agent {p['agent_id']}  expires {p['expires_at']}  {why}"
            )

    emit(data, as_json, human)


def _vote(choice: str, payment_id: str, comment: str | None, as_json: bool) -> None:
    with errors_to_exit(as_json):
        path = f"/admin/v1/approvals/{payment_id}/{choice}"
        result = _call("POST", path, credential_required=True, json={"comment": comment})
    _print(result, as_json, f"{payment_id}: {result['status']}")


@approvals_app.command("approve")
def approvals_approve(
    payment_id: str,
    comment: str = typer.Option(None, help="Why (kept with the vote)."),
    as_json: bool = JsonOption,
) -> None:
    """Approve (as the operator whose token is in CUSTODY_ADMIN_TOKEN); the last approval signs."""
    _vote("approve", payment_id, comment, as_json)


@approvals_app.command("reject")
def approvals_reject(
    payment_id: str,
    comment: str = typer.Option(None, help="Why (kept with the vote)."),
    as_json: bool = JsonOption,
) -> None:
    """Reject (as the operator whose token is in CUSTODY_ADMIN_TOKEN); the payment is never signed."""
    _vote("reject", payment_id, comment, as_json)


def _scope(wallet: str | None, agent: str | None, everything: bool) -> tuple[str, str | None]:
    chosen = [name for name, on in (("wallet", wallet), ("agent", agent), ("all", everything)) if on]
    if len(chosen) != 1:
        raise typer.BadParameter("give exactly one of --wallet ID, --agent ID or --all")
    return chosen[0], wallet or agent


def freeze(
    wallet: str = typer.Option(None, "--wallet", help="Freeze one wallet."),
    agent: str = typer.Option(None, "--agent", help="Freeze one agent."),
    everything: bool = typer.Option(False, "--all", help="Freeze everything."),
    reason: str = typer.Option(None, help="Why (kept with the freeze)."),
    as_json: bool = JsonOption,
) -> None:
    """Kill switch: stop new payments and pending approvals at once."""
    scope, target = _scope(wallet, agent, everything)
    with errors_to_exit(as_json):
        _call("POST", "/admin/v1/freezes", json={"scope": scope, "target": target, "reason": reason})
    _print({"frozen": scope, "target": target}, as_json, f"frozen: {scope} {target or ''}".rstrip())


def unfreeze(
    wallet: str = typer.Option(None, "--wallet"),
    agent: str = typer.Option(None, "--agent"),
    everything: bool = typer.Option(False, "--all"),
    as_json: bool = JsonOption,
) -> None:
    """Lift a freeze."""
    scope, target = _scope(wallet, agent, everything)
    with errors_to_exit(as_json):
        _call("DELETE", f"/admin/v1/freezes/{scope}", params={"target": target} if target else None)
    _print({"unfrozen": scope, "target": target}, as_json, f"unfrozen: {scope} {target or ''}".rstrip())


def freezes(as_json: bool = JsonOption) -> None:
    """List the freezes in force."""
    with errors_to_exit(as_json):
        data = _call("GET", "/admin/v1/freezes")
    lines = (f"{f['scope']} {f['target'] or ''} since {f['frozen_at']} by {f['frozen_by']}" for f in data["freezes"])
    _print(data, as_json, *lines)


def register_admin_commands(app: typer.Typer, policy_app: typer.Typer) -> None:
    app.add_typer(agent_app, name="agent")
    app.add_typer(grant_app, name="grant")
    app.add_typer(approvals_app, name="approvals")
    app.add_typer(webhook_app, name="webhook")
    app.add_typer(operator_app, name="operator")
    app.command()(freeze)
    app.command()(unfreeze)
    app.command()(freezes)
    policy_app.command("set")(policy_set)
    policy_app.command("show")(policy_show)
    policy_app.command("history")(policy_history)
    policy_app.command("diff")(policy_diff)


webhook_app = typer.Typer(help="Operator webhooks for payment events.", no_args_is_help=True)


@webhook_app.command("add")
def webhook_add(
    url: str,
    event: list[str] = typer.Option(None, "--event", help="Only this event (repeatable); default: all."),
    as_json: bool = JsonOption,
) -> None:
    """Register an endpoint; its HMAC signing key is printed once."""
    with errors_to_exit(as_json):
        created = _call("POST", "/admin/v1/webhooks", json={"url": url, "events": event or []})

    def human() -> None:
        typer.echo(f"{created['webhook']['id']}  {url}")
        typer.echo("signing key (shown once; verify the Custody-Signature header with it):", err=True)
        typer.echo(f"  {created['signing_key']}")

    emit(created, as_json, human)


@webhook_app.command("list")
def webhook_list(as_json: bool = JsonOption) -> None:
    with errors_to_exit(as_json):
        data = _call("GET", "/admin/v1/webhooks")
    _print(
        data, as_json, *(f"{h['id']}  {h['url']}  {','.join(h['events']) or 'all events'}" for h in data["webhooks"])
    )


@webhook_app.command("remove")
def webhook_remove(webhook_id: str, as_json: bool = JsonOption) -> None:
    with errors_to_exit(as_json):
        _call("DELETE", f"/admin/v1/webhooks/{webhook_id}")
    _print({"removed": webhook_id}, as_json, f"removed {webhook_id}")


@webhook_app.command("deliveries")
def webhook_deliveries(
    status: str = typer.Option(None, help="pending, delivered, failed or cancelled."), as_json: bool = JsonOption
) -> None:
    """Delivery attempts and their state."""
    with errors_to_exit(as_json):
        data = _call("GET", "/admin/v1/webhooks/deliveries", params={"status": status} if status else None)
    lines = (f"{d['id']}  {d['event']}  {d['status']}  attempts={d['attempts']}" for d in data["deliveries"])
    _print(data, as_json, *lines)


operator_app = typer.Typer(help="Operator credentials (admin, approver, viewer).", no_args_is_help=True)


@operator_app.command("create")
def operator_create(
    name: str,
    role: str = typer.Option(..., help="admin, approver or viewer."),
    as_json: bool = JsonOption,
) -> None:
    """Issue an operator credential; the token is printed once."""
    with errors_to_exit(as_json):
        created = _call("POST", "/admin/v1/operators", json={"name": name, "role": role})

    def human() -> None:
        typer.echo(f"{created['operator']['id']}  {name}  ({role})")
        typer.echo("operator token (shown once; only its digest is stored):", err=True)
        typer.echo(f"  {created['token']}")

    emit(created, as_json, human)


@operator_app.command("list")
def operator_list(as_json: bool = JsonOption) -> None:
    with errors_to_exit(as_json):
        data = _call("GET", "/admin/v1/operators")
    lines = (f"{o['id']}  {o['name']}  {o['role']}  revoked={o['revoked_at'] or '-'}" for o in data["operators"])
    _print(data, as_json, *lines)


@operator_app.command("revoke")
def operator_revoke(operator_id: str, as_json: bool = JsonOption) -> None:
    """Revoke an operator's credential at once."""
    with errors_to_exit(as_json):
        _call("DELETE", f"/admin/v1/operators/{operator_id}")
    _print({"revoked": operator_id}, as_json, f"revoked {operator_id}")
