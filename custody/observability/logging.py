"""Structured logs: one JSON object per line, request ids, and a redaction guard.

The guard is the last line of defence, not the first: code should never log a secret.
It drops every extra field that is not on a short list, masks any field whose name
looks secret, and masks values that look like our credentials (``cak.<id>.<secret>``,
``cop.<id>.<secret>``, ``whsec_…``), bearer tokens, 32-byte keys in hex or base64, and
``password=…``-style pairs, in the message, the fields and exception text alike.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REDACTED = "[REDACTED]"
REQUEST_ID_HEADER = "X-Request-Id"
LogFormat = Literal["json", "text"]

# Extra fields a log call may attach (``extra={...}``); anything else is dropped.
DEFAULT_FIELDS = frozenset(
    {
        "method",
        "path",
        "route",
        "status",
        "duration_ms",
        "error",
        "code",
        "outcome",
        "reasons",
        "payment_id",
        "wallet_id",
        "agent_id",
        "operator_id",
    }
)

_request_id: ContextVar[str | None] = ContextVar("custody_request_id", default=None)
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # no dots: a credential (cak.…/cop.…) cannot pass

_SENSITIVE_NAME = re.compile(
    r"key|secret|token|passw|passphrase|mnemonic|seed|authorization|credential|cookie|kek|private", re.IGNORECASE
)
_BEARER = re.compile(r"\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_CREDENTIAL = re.compile(r"\b(cak|cop)\.([A-Za-z0-9_-]+)(?:\.([A-Za-z0-9_-]*))?")
_WEBHOOK_SECRET = re.compile(r"\bwhsec_[A-Za-z0-9_-]+")
_PAIR = re.compile(
    r"(?i)(authorization|api[_-]?key|private[_-]?key|secret|password|passwd|passphrase|token|mnemonic|seed)"
    r"([\"']?\s*[:=]\s*[\"']?)((?:bearer\s+|basic\s+)?[^\s\"',;}\]]+)"
)
_HEX_KEY = re.compile(r"(?<![0-9a-fA-F])(?:0x)?[0-9a-fA-F]{64}(?![0-9a-fA-F])")
_BASE64_KEY = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{43}=?(?![A-Za-z0-9+/_=-])")

# Attributes every LogRecord has; the rest came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


# Request ids ------------------------------------------------------------------------------


def current_request_id() -> str | None:
    """The id of the HTTP request being handled in this context, if any."""
    return _request_id.get()


def accepted_request_id(value: str | None) -> str | None:
    """An incoming ``X-Request-Id`` if it is a short safe token (letters, digits, ``_``, ``-``)."""
    return value if value is not None and _SAFE_ID.fullmatch(value) else None


def new_request_id() -> str:
    return uuid.uuid4().hex


def route_template(scope: Scope) -> str:
    """The matched route's template (``/v1/payments/{payment_id}``), or ``unmatched``."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestIdMiddleware:
    """ASGI middleware: give each request an id, echo it, and put it on every log record.

    An incoming ``X-Request-Id`` is kept if it is a safe token of at most 64 characters;
    otherwise a new one is made. Responses carry it back. With ``access_log`` every request
    is logged (``custody.access``, INFO); without it only 5xx answers and errors that escape
    the application are.
    """

    def __init__(self, app: ASGIApp, *, access_log: bool = False) -> None:
        self.app = app
        self.access_log = access_log
        self.log = logging.getLogger("custody.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"")
        request_id = accepted_request_id(incoming.decode("latin-1")) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        token = _request_id.set(request_id)
        started = time.perf_counter()
        status: int | None = None

        async def with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, with_id)
        except Exception as exc:
            self._log(logging.ERROR, scope, status, started, error=type(exc).__name__)
            raise
        else:
            if status is not None and (status >= 500 or self.access_log):
                self._log(logging.WARNING if status >= 500 else logging.INFO, scope, status, started)
        finally:
            _request_id.reset(token)

    def _log(self, level: int, scope: Scope, status: int | None, started: float, error: str | None = None) -> None:
        if not self.log.isEnabledFor(level):
            return
        method, path = str(scope.get("method", "")), str(scope.get("path", ""))
        fields: dict[str, Any] = {
            "method": method,
            "path": path,
            "route": route_template(scope),
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if error is not None:
            fields["error"] = error
            self.log.log(level, "%s %s failed: %s", method, path, error, extra=fields)
        else:
            self.log.log(level, "%s %s %s", method, path, status, extra=fields)


# Redaction --------------------------------------------------------------------------------


def sensitive_name(name: str) -> bool:
    """Does a field name look like it holds a secret (key, token, password, seed…)?"""
    return _SENSITIVE_NAME.search(name) is not None


def _credential(match: re.Match[str]) -> str:
    prefix, first, secret = match.group(1), match.group(2), match.group(3)
    return f"{prefix}.{first}.{REDACTED}" if secret is not None else f"{prefix}.{REDACTED}"


def _base64_key(match: re.Match[str]) -> str:
    text = match.group(0)
    mixed_case = any(c.isupper() for c in text) and any(c.islower() for c in text)
    return REDACTED if mixed_case else text


def redact_text(text: str) -> str:
    """Mask what looks like a credential or key material in free text."""
    text = _PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _CREDENTIAL.sub(_credential, text)
    text = _WEBHOOK_SECRET.sub("whsec_" + REDACTED, text)
    text = _HEX_KEY.sub(REDACTED, text)
    return _BASE64_KEY.sub(_base64_key, text)


def redact_value(value: Any, depth: int = 0) -> Any:
    """A JSON-ready copy of ``value`` with sensitive names and secret-looking strings masked."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if depth >= 4:
        return "[…]"
    if isinstance(value, Mapping):
        return {str(k): REDACTED if sensitive_name(str(k)) else redact_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return REDACTED  # raw bytes in a log line are too likely to be key material
    return redact_text(str(value))


# Formatters -------------------------------------------------------------------------------


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:
        # Never let the logging module print the raw arguments of a broken call.
        return f"{record.msg} (unformattable arguments)"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, allowed extra fields."""

    def __init__(self, fields: Iterable[str] = DEFAULT_FIELDS) -> None:
        super().__init__()
        self.fields = frozenset(fields)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact_text(_message(record)),
            "request_id": getattr(record, "request_id", None) or current_request_id(),
        }
        for name, value in record.__dict__.items():
            if name in _STANDARD or name in entry or name not in self.fields:
                continue
            entry[name] = REDACTED if sensitive_name(name) else redact_value(value)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            entry["exception"] = redact_text(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = redact_text(self.formatStack(record.stack_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines (development), with the request id and the same masking."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id() or "-"
        try:
            text = super().format(record)
        except Exception:
            text = f"{record.levelname} {record.name} {record.msg} (unformattable arguments)"
        return redact_text(text)


class RequestIdFilter(logging.Filter):
    """Stamp the current request id on records as they are emitted."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True


class _CustodyHandler(logging.StreamHandler[IO[str]]):
    """The handler :func:`configure_logging` installs (so a second call replaces it)."""


def configure_logging(
    log_format: LogFormat, level: str | int = "INFO", stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) as JSON lines or text, with redaction."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _CustodyHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _CustodyHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root.addHandler(handler)
    root.setLevel(level)
    return handler
