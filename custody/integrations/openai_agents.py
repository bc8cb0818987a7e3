"""OpenAI Agents SDK function tools for the agent toolkit (needs the ``openai-agents`` extra).

    from agents import Agent
    from custody.client import CustodyClient
    from custody.integrations.openai_agents import custody_function_tools
    from custody.integrations.tools import CustodyTools

    tools = custody_function_tools(CustodyTools(CustodyClient(url, api_key), rpc_urls={8453: rpc_url}))
    agent = Agent(name="buyer", instructions="…", tools=tools)

Each tool returns its result as JSON text. A failure the model can act on (a policy denial with
its reasons and remaining budget, a frozen wallet, a rate limit, a bad argument) is returned to
the model as that message; any other failure as a short generic text (no traceback, no secret).
The SDK exports traces to OpenAI by default: call ``agents.set_tracing_disabled(True)`` (or set
``OPENAI_AGENTS_DISABLE_TRACING=1``) unless you want that.
"""

from __future__ import annotations

import json
from typing import Any

from agents import FunctionTool, RunContextWrapper, function_tool

from custody.integrations.tools import CustodyToolError, CustodyTools

__all__ = ["custody_function_tools"]


class _ToolFailure(Exception):
    """Carries the model-facing message out of the tool to :func:`_failure_message`."""


def _failure(error: CustodyToolError) -> Exception:
    return _ToolFailure(error.message)


def _failure_message(ctx: RunContextWrapper[Any], error: Exception) -> str:
    if isinstance(error, _ToolFailure):
        return str(error)
    cause = error.__cause__ or error.__context__
    if isinstance(cause, _ToolFailure):
        return str(cause)
    return f"The tool failed ({type(error).__name__}); nothing more is known. Do not assume the payment happened."


def _json(result: dict[str, Any]) -> str:
    return json.dumps(result, separators=(",", ":"))


def custody_function_tools(tools: CustodyTools) -> list[FunctionTool]:
    """The five tools (``wallets``, ``limits``, ``pay``, ``payment_status``, ``sign_x402_payment``)."""
    return [
        function_tool(
            spec.adapt(_failure, _json, returns=str),
            name_override=spec.name,
            description_override=spec.description,
            use_docstring_info=False,
            failure_error_function=_failure_message,
        )
        for spec in tools.specs()
    ]
