"""OpenAI Agents function tools, driven by a scripted Model through Runner.run (no API key, tracing off)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from agents import Agent, Model, ModelResponse, RunConfig, Runner, Usage, set_tracing_disabled
from eth_account import Account
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText

from custody.integrations.openai_agents import custody_function_tools
from tests.integrations.service_fixtures import ETH, Custody, running_custody


@pytest.fixture(scope="module")
def custody() -> Iterator[Custody]:
    with running_custody() as service:
        yield service


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    set_tracing_disabled(True)


class ScriptedModel(Model):
    """Answers each turn from a script: tool calls first, then a final message. Records what it was given."""

    def __init__(self, turns: list[list[Any]]) -> None:
        self.turns = turns
        self.inputs: list[Any] = []
        self.tool_names: list[str] = []

    async def get_response(self, system_instructions: Any, input: Any, *args: Any, **kwargs: Any) -> ModelResponse:
        tools = args[2] if len(args) > 2 else kwargs.get("tools", [])
        self.tool_names = [tool.name for tool in tools]
        self.inputs.append(input)
        return ModelResponse(output=self.turns.pop(0), usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError("the scripted model does not stream")


def _call(call_id: str, name: str, arguments: dict[str, Any]) -> ResponseFunctionToolCall:
    return ResponseFunctionToolCall(
        id=f"fc_{call_id}", call_id=call_id, name=name, arguments=json.dumps(arguments), type="function_call"
    )


def _say(text: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id="msg_final",
        role="assistant",
        status="completed",
        type="message",
        content=[ResponseOutputText(text=text, type="output_text", annotations=[])],
    )


def _tool_outputs(model: ScriptedModel) -> list[str]:
    items = model.inputs[-1]
    return [
        str(item["output"]) for item in items if isinstance(item, dict) and item.get("type") == "function_call_output"
    ]


async def test_runner_runs_limits_and_pay_against_the_service_then_answers(custody: Custody) -> None:
    bob = _payee()
    agent = custody.new_agent(custody.policy([bob]))
    pay = {
        "to": bob,
        "amount": str(ETH // 20),
        "chain_id": custody.chain.chain_id,
        "token": None,
        "wallet": None,
        "purpose": "invoice 12",
    }
    model = ScriptedModel(
        [
            [_call("call_1", "limits", {"wallet": None})],
            [_call("call_2", "pay", pay)],
            [_say("Paid 0.05 ETH to bob.")],
        ]
    )
    buyer = Agent(name="buyer", instructions="Pay invoices within budget.", tools=custody_function_tools(agent.tools))
    result = await Runner.run(buyer, "Pay bob 0.05 ETH.", run_config=RunConfig(model=model, tracing_disabled=True))
    assert result.final_output == "Paid 0.05 ETH to bob."
    assert set(model.tool_names) == {"wallets", "limits", "pay", "payment_status", "sign_x402_payment"}
    limits, paid = (json.loads(text) for text in _tool_outputs(model))
    assert {limit["rule_id"] for limit in limits["limits"]} == {"daily-eth", "daily-usdc"}
    assert paid["status"] == "confirmed"
    assert custody.chain.w3.eth.get_balance(bob) == ETH // 20


async def test_a_denial_reaches_the_model_as_its_reasons_not_a_generic_error(custody: Custody) -> None:
    bob = _payee()
    agent = custody.new_agent(custody.policy([bob], eth_cap=ETH // 10))
    pay = {
        "to": bob,
        "amount": str(ETH // 5),
        "chain_id": custody.chain.chain_id,
        "token": None,
        "wallet": None,
        "purpose": None,
    }
    model = ScriptedModel([[_call("call_1", "pay", pay)], [_say("The budget does not allow it.")]])
    buyer = Agent(name="buyer", instructions="Pay invoices within budget.", tools=custody_function_tools(agent.tools))
    result = await Runner.run(buyer, "Pay bob 0.2 ETH.", run_config=RunConfig(model=model, tracing_disabled=True))
    assert result.final_output == "The budget does not allow it."
    (output,) = _tool_outputs(model)
    assert "Denied by policy" in output
    assert "cap_exceeded (rule daily-eth)" in output
    assert "remaining" in output
    assert custody.chain.w3.eth.get_balance(bob) == 0


def _payee() -> str:
    return str(Account.create().address)
