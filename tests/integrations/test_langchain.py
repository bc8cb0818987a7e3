"""LangChain tools against the real service and chain: called directly, and by a scripted chat model (no network)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool

from custody.integrations.langchain import custody_tools
from tests.integrations.service_fixtures import ETH, USDC, Custody, running_custody


@pytest.fixture(scope="module")
def custody() -> Iterator[Custody]:
    with running_custody() as service:
        yield service


@pytest.fixture(autouse=True)
def _no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGSMITH_API_KEY", "LANGCHAIN_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def _payee() -> str:
    return str(Account.create().address)


def _by_name(tools: list[BaseTool]) -> dict[str, BaseTool]:
    return {tool.name: tool for tool in tools}


async def test_tools_called_directly_pay_on_chain_and_return_a_denial_as_an_error_tool_message(
    custody: Custody,
) -> None:
    bob = _payee()
    agent = custody.new_agent(custody.policy([bob], usdc_cap=3 * USDC))
    tools = _by_name(custody_tools(agent.tools))
    assert set(tools) == {"wallets", "limits", "pay", "payment_status", "sign_x402_payment"}
    assert json.loads(tools["wallets"].invoke({}))["wallets"][0]["address"] == agent.address

    token = custody.usdc.address
    paid = json.loads(
        await tools["pay"].ainvoke({"to": bob, "amount": "2000000", "chain_id": custody.chain.chain_id, "token": token})
    )
    assert paid["status"] == "confirmed"
    assert custody.usdc.balance_of(bob) == 2 * USDC

    call = {
        "type": "tool_call",
        "id": "call-over-budget",
        "name": "pay",
        "args": {"to": bob, "amount": "2000000", "chain_id": custody.chain.chain_id, "token": token},
    }
    denied = tools["pay"].invoke(call)
    assert isinstance(denied, ToolMessage)
    assert denied.status == "error"
    assert "cap_exceeded (rule daily-usdc)" in str(denied.content)
    assert f"remaining {USDC} base units" in str(denied.content)

    invalid = tools["pay"].invoke({**call, "id": "call-float", "args": {**call["args"], "amount": 1.5}})
    assert "not a float" in str(invalid.content)
    assert custody.usdc.balance_of(bob) == 2 * USDC


def test_a_scripted_chat_model_reads_limits_then_pays_through_the_tools(custody: Custody) -> None:
    bob = _payee()
    agent = custody.new_agent(custody.policy([bob]))
    tools = _by_name(custody_tools(agent.tools))
    pay_args = {"to": bob, "amount": str(ETH // 100), "chain_id": custody.chain.chain_id, "purpose": "invoice 9"}
    model = GenericFakeChatModel(
        messages=iter(
            [
                AIMessage(content="", tool_calls=[{"name": "limits", "args": {}, "id": "call-1"}]),
                AIMessage(content="", tool_calls=[{"name": "pay", "args": pay_args, "id": "call-2"}]),
                AIMessage(content="Paid 0.01 ETH."),
            ]
        )
    )
    messages: list[BaseMessage] = [HumanMessage("Pay bob 0.01 ETH if the budget allows it.")]
    while True:
        reply = model.invoke(messages)
        messages.append(reply)
        if not isinstance(reply, AIMessage) or not reply.tool_calls:
            break
        for tool_call in reply.tool_calls:
            messages.append(tools[tool_call["name"]].invoke(tool_call))
    results: list[Any] = [json.loads(str(m.content)) for m in messages if isinstance(m, ToolMessage)]
    assert [limit["rule_id"] for limit in results[0]["limits"]] == ["daily-eth", "daily-usdc"]
    assert results[1]["status"] == "confirmed"
    assert messages[-1].content == "Paid 0.01 ETH."
    assert custody.chain.w3.eth.get_balance(bob) == ETH // 100
