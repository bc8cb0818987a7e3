"""``custody mcp``: the agent tools over MCP (stdio). The ``mcp`` package is imported only when it runs."""

from __future__ import annotations

import importlib
import os

import typer


def register_mcp_command(app: typer.Typer) -> None:
    app.command("mcp")(mcp_command)


def mcp_command(
    url: str = typer.Option(None, "--url", help="The custody service (default CUSTODY_URL or http://127.0.0.1:8700)."),
    rpc: list[str] = typer.Option(
        [], "--rpc", metavar="CHAIN_ID=URL", help="A chain's JSON-RPC node (repeatable; or CUSTODY_RPC_URLS)."
    ),
    wallet: str = typer.Option(None, "--wallet", help="The default wallet: id, name or address (or CUSTODY_WALLET)."),
    x402_asset: list[str] = typer.Option(
        [], "--x402-asset", metavar="NETWORK=TOKEN", help="A token x402 may pay in besides known USDC (repeatable)."
    ),
) -> None:
    """Serve the agent tools over MCP on stdio, with the agent key in CUSTODY_API_KEY (or CUSTODY_API_KEY_FILE)."""
    try:
        mcp_server = importlib.import_module("custody.integrations.mcp")
    except ImportError as exc:
        missing = exc.name or "a dependency"
        typer.echo(
            f"error [missing_dependency]: `custody mcp` needs the mcp extra ({missing} is not installed): "
            'pip install "agent-custody[mcp]"',
            err=True,
        )
        raise typer.Exit(2) from None
    try:
        config = mcp_server.config_from(os.environ, url=url, rpc=rpc, wallet=wallet, x402_assets=x402_asset)
    except mcp_server.ConfigError as exc:
        typer.echo(f"error [invalid_configuration]: {exc}", err=True)
        raise typer.Exit(2) from None
    mcp_server.run(config)
