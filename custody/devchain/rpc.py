"""An HTTP JSON-RPC endpoint on 127.0.0.1 that forwards to an in-process eth-tester chain.

Only the standard library: a threading HTTP server in a daemon thread. Requests go through the
same formatting layer web3.py's ``EthereumTesterProvider`` uses in process (hex quantities in,
camelCase results out), then every integer result is written as a hex quantity, as a node would.
A revert answers ``{"code": 3, "message": "execution reverted: …", "data": "0x…"}`` like geth,
so web3.py clients raise ``ContractLogicError`` with the contract's reason.
"""

from __future__ import annotations

import ast
import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from eth_abi.abi import encode as abi_encode

__all__ = ["RpcServer"]

logger = logging.getLogger(__name__)

MAX_BODY = 5 * 1024 * 1024
_ERROR_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
_REVERTED = "execution reverted"

RequestFn = Callable[[str, Any], Mapping[str, Any]]


def to_wire(value: Any) -> Any:
    """A result as JSON-RPC writes it: integers as hex quantities, bytes as hex data."""
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "0x" + bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(key): to_wire(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_wire(item) for item in value]
    return str(value)


def _revert_data(exc: BaseException) -> bytes | None:
    """The raw revert bytes when the chain gave them (eth-tester writes undecodable ones as a bytes literal)."""
    for candidate in (exc, exc.__context__):
        if candidate is None or not candidate.args:
            continue
        raw = candidate.args[0]
        if isinstance(raw, BaseException) and raw.args:
            raw = raw.args[0]
        if isinstance(raw, str) and raw.startswith(("b'", 'b"')) and len(raw) <= MAX_BODY:
            try:
                raw = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                continue
        if isinstance(raw, bytes) and raw:
            return raw
    return None


def error_for(exc: BaseException) -> dict[str, Any]:
    """A JSON-RPC error object for an exception raised by the chain (a revert is code 3, as geth answers)."""
    message = str(exc) or type(exc).__name__
    if type(exc).__name__ != "TransactionFailed" and not message.startswith(_REVERTED):
        return {"code": -32000, "message": message}
    raw = _revert_data(exc)
    if raw is not None:  # a custom error or a panic: the bytes are the contract's answer
        return {"code": 3, "message": _REVERTED, "data": "0x" + raw.hex()}
    reason = message.removeprefix(_REVERTED).removeprefix(":").strip()
    if not reason:
        return {"code": 3, "message": _REVERTED, "data": "0x"}
    data = _ERROR_SELECTOR + abi_encode(["string"], [reason])
    return {"code": 3, "message": f"{_REVERTED}: {reason}", "data": "0x" + data.hex()}


class RpcServer:
    """Serves ``request_fn(method, params) -> {"result": …} | {"error": …}`` over HTTP until closed."""

    def __init__(self, request_fn: RequestFn) -> None:
        self._request_fn = request_fn
        handler = _handler_class(self._answer)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="devchain-rpc", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def _answer(self, call: Any) -> dict[str, Any]:
        request_id = call.get("id") if isinstance(call, dict) else None
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id}
        if not isinstance(call, dict) or not isinstance(call.get("method"), str):
            reply["error"] = {"code": -32600, "message": "invalid request"}
            return reply
        params = call.get("params", [])
        try:
            response = self._request_fn(call["method"], params if params is not None else [])
        except Exception as exc:  # the chain raises many types; each becomes a JSON-RPC error
            reply["error"] = error_for(exc)
            return reply
        if "error" in response and response["error"] is not None:
            error = response["error"]
            reply["error"] = dict(error) if isinstance(error, Mapping) else {"code": -32000, "message": str(error)}
        else:
            reply["result"] = to_wire(response.get("result"))
        return reply


def _handler_class(answer: Callable[[Any], dict[str, Any]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10  # an idle keep-alive connection is closed after this many seconds

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 < length <= MAX_BODY:
                self._send(400, {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "bad length"}})
                return
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError:
                self._send(400, {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}})
                return
            if isinstance(body, list):
                self._send(200, [answer(call) for call in body])
            else:
                self._send(200, answer(body))

        def _send(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("devchain rpc: " + format, *args)

    return Handler
