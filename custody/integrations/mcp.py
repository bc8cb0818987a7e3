"""An MCP server with the agent tools (needs the ``mcp`` extra): ``custody mcp``.

    CUSTODY_URL=http://127.0.0.1:8700 CUSTODY_API_KEY=cak.… custody mcp --rpc 8453=https://…

The server talks MCP over stdio and exposes ``wallets``, ``limits``, ``pay``,
``payment_status`` and ``sign_x402_payment`` (see :mod:`custody.integrations.tools`),
acting with one agent's API key. Nothing it offers approves a payment: a payment that
needs a human's approval is returned as pending, and operators decide it through the admin
API or the CLI. The server never asks the MCP client to confirm anything (elicitation),
because that client is the agent's own.

Configuration (arguments win over the environment):

- ``CUSTODY_URL`` (default ``http://127.0.0.1:8700``) or ``--url``: the custody service.
- ``CUSTODY_API_KEY``, or ``CUSTODY_API_KEY_FILE`` (a file holding it): the agent's key.
  Never an argument (arguments are visible to other users of the machine).
- ``--rpc CHAIN_ID=URL`` (repeatable) or ``CUSTODY_RPC_URLS="8453=https://…,84532=https://…"``:
  the JSON-RPC node of each chain ``pay`` may use.
- ``--wallet`` or ``CUSTODY_WALLET``: the default wallet (id, name or address).
- ``--x402-asset NETWORK=TOKEN`` (repeatable): a token the x402 client may pay in besides the
  USDC deployments it knows (for example ``eip155:84532=0x…``).

Over stdio, standard output carries only the protocol; logs go to standard error and never
contain the API key or the RPC URLs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

from custody.client import CustodyClient
from custody.integrations.tools import CustodyToolError, CustodyTools

if TYPE_CHECKING:
    from x402 import SpendControlAsset

__all__ = ["McpConfig", "build_server", "config_from", "main", "run"]

DEFAULT_URL = "http://127.0.0.1:8700"
INSTRUCTIONS = (
    "Tools to pay from wallets held by a custody service, within limits a human set. Call `wallets` first, "
    "`limits` to see what remains of each budget, then `pay` or `sign_x402_payment`. Amounts are integers in "
    "base units. A denial says which rule refused and what remains: change the payment rather than retrying it. "
    "A payment that needs a human's approval stays pending until an operator decides; check `payment_status`."
)
_ANNOTATIONS = {
    "wallets": ToolAnnotations(title="Wallets", read_only_hint=True, open_world_hint=False),
    "limits": ToolAnnotations(title="Spending limits", read_only_hint=True, open_world_hint=False),
    "pay": ToolAnnotations(title="Pay", read_only_hint=False, destructive_hint=True, idempotent_hint=False),
    "payment_status": ToolAnnotations(title="Payment status", read_only_hint=False, idempotent_hint=True),
    "sign_x402_payment": ToolAnnotations(
        title="Sign an x402 payment", read_only_hint=False, destructive_hint=True, idempotent_hint=False
    ),
}


def _tool_error(error: CustodyToolError) -> Exception:
    return ToolError(error.message)


def build_server(tools: CustodyTools, *, name: str = "agent-custody") -> MCPServer:
    """An MCP server exposing the toolkit's tools (no resources, no prompts, no elicitation)."""
    server: MCPServer = MCPServer(name, instructions=INSTRUCTIONS, log_level="WARNING")
    for spec in tools.specs():
        server.add_tool(
            spec.adapt(_tool_error),
            name=spec.name,
            description=spec.description,
            annotations=_ANNOTATIONS.get(spec.name),
            structured_output=True,
        )
    return server


@dataclass
class McpConfig:
    """What ``custody mcp`` needs: the service, the agent's key, the chains' nodes."""

    url: str
    api_key: str = field(repr=False)
    rpc_urls: dict[int, str] = field(default_factory=dict, repr=False)
    default_wallet: str | None = None
    x402_assets: list[SpendControlAsset] = field(default_factory=list)


class ConfigError(ValueError):
    """A configuration mistake, said in one line (never with a secret in it)."""


def _rpc_pairs(items: Sequence[str], source: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for number, item in enumerate(items, 1):
        chain, sep, url = item.strip().partition("=")
        if not sep or not chain.strip().isdigit() or not url.strip().startswith(("http://", "https://")):
            # The entry itself is not repeated: an RPC URL often embeds a provider's key.
            raise ConfigError(f"{source}: entry {number} is not CHAIN_ID=http(s)://URL")
        out[int(chain.strip())] = url.strip()
    return out


def _x402_assets(items: Sequence[str]) -> list[SpendControlAsset]:
    assets: list[SpendControlAsset] = []
    for item in items:
        network, sep, asset = item.strip().partition("=")
        if not sep or not network.startswith("eip155:") or not asset.startswith("0x") or len(asset) != 42:
            raise ConfigError(f"--x402-asset: expected eip155:CHAIN_ID=0xTOKEN, got {item[:80]!r}")
        assets.append({"network": network, "asset": asset})
    return assets


def config_from(
    env: Mapping[str, str],
    *,
    url: str | None = None,
    rpc: Sequence[str] = (),
    wallet: str | None = None,
    x402_assets: Sequence[str] = (),
) -> McpConfig:
    """The configuration from arguments and the environment; :class:`ConfigError` says what is wrong."""
    api_key = env.get("CUSTODY_API_KEY", "").strip()
    key_file = env.get("CUSTODY_API_KEY_FILE", "").strip()
    if not api_key and key_file:
        try:
            api_key = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read CUSTODY_API_KEY_FILE: {exc.strerror or 'unreadable'}") from None
    if not api_key:
        raise ConfigError("set CUSTODY_API_KEY (or CUSTODY_API_KEY_FILE) to the agent's API key")
    rpc_urls = _rpc_pairs([p for p in env.get("CUSTODY_RPC_URLS", "").split(",") if p.strip()], "CUSTODY_RPC_URLS")
    rpc_urls.update(_rpc_pairs(rpc, "--rpc"))
    return McpConfig(
        url=(url or env.get("CUSTODY_URL") or DEFAULT_URL).rstrip("/"),
        api_key=api_key,
        rpc_urls=rpc_urls,
        default_wallet=wallet or env.get("CUSTODY_WALLET") or None,
        x402_assets=_x402_assets(x402_assets),
    )


def run(config: McpConfig) -> None:
    """Serve MCP over stdio until the client closes the connection."""
    # httpx logs every request at INFO; on stdio servers logs go to stderr, but keep them quiet.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with CustodyClient(config.url, config.api_key) as client:
        controls: Any = {"allowed_assets": config.x402_assets} if config.x402_assets else None
        tools = CustodyTools(
            client, rpc_urls=config.rpc_urls, default_wallet=config.default_wallet, x402_spend_controls=controls
        )
        build_server(tools).run("stdio")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m custody.integrations.mcp``: the same as ``custody mcp``."""
    parser = argparse.ArgumentParser(prog="custody mcp", description="Serve the agent tools over MCP (stdio).")
    parser.add_argument("--url", help=f"the custody service (default CUSTODY_URL or {DEFAULT_URL})")
    parser.add_argument("--rpc", action="append", default=[], metavar="CHAIN_ID=URL", help="a chain's JSON-RPC node")
    parser.add_argument("--wallet", help="the default wallet: id, name or address")
    parser.add_argument("--x402-asset", action="append", default=[], metavar="NETWORK=TOKEN")
    args = parser.parse_args(argv)
    try:
        config = config_from(os.environ, url=args.url, rpc=args.rpc, wallet=args.wallet, x402_assets=args.x402_asset)
    except ConfigError as exc:
        print(f"error [invalid_configuration]: {exc}", file=sys.stderr)
        return 2
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
