"""LangChain tools for the agent toolkit (needs the ``langchain`` extra: langchain-core 1.x).

    from custody.client import CustodyClient
    from custody.integrations.langchain import custody_tools
    from custody.integrations.tools import CustodyTools

    tools = custody_tools(CustodyTools(CustodyClient(url, api_key), rpc_urls={8453: rpc_url}))
    model_with_tools = chat_model.bind_tools(tools)

Each tool returns its result as JSON text. A failure the model can act on (a policy denial
with its reasons and remaining budget, a frozen wallet, a rate limit, a bad argument) comes
back as the tool message's text, with the tool message's status set to ``error``.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import ValidationError

from custody.integrations.tools import CustodyToolError, CustodyTools

__all__ = ["custody_tools"]


def _tool_exception(error: CustodyToolError) -> Exception:
    return ToolException(error.message)


def _invalid_arguments(error: ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or 'arguments'}: {item['msg']}" for item in error.errors()
    )
    return f"Invalid arguments: {problems}"


def _json(result: dict[str, Any]) -> str:
    return json.dumps(result, separators=(",", ":"))


def custody_tools(tools: CustodyTools) -> list[BaseTool]:
    """The five tools (``wallets``, ``limits``, ``pay``, ``payment_status``, ``sign_x402_payment``)."""
    return [
        StructuredTool.from_function(
            spec.adapt(_tool_exception, _json, returns=str),
            name=spec.name,
            description=spec.description,
            handle_tool_error=True,
            handle_validation_error=_invalid_arguments,
        )
        for spec in tools.specs()
    ]
