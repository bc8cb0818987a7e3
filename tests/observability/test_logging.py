"""JSON log lines, request ids through the real app, and the redaction guard (proved with canaries)."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from custody.cli import _configure_logging
from custody.observability.logging import (
    REDACTED,
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    accepted_request_id,
)
from custody.settings import Settings
from tests.conftest import SignerThread
from tests.observability.conftest import running

# Canaries: shaped like the real thing, found nowhere else.
API_KEY_SECRET = "Zq9CanaryAgentSecretXw3vT7LmN0pQrS5uV8yB1dE"  # 43 characters, like token_urlsafe(32)
API_KEY = f"cak.key_0123456789abcdef.{API_KEY_SECRET}"
OPERATOR_TOKEN = "cop.op_0123456789abcdef.Kc7CanaryOperatorSecret_-Wm2nP4qR6sT8uV0xYz"
BEARER_VALUE = "Bearer opaque-canary-token-77f1"
HEX_KEY = "c0ffee00" * 8
KEK_BASE64 = "wK9canaryKEKbase64Value0123456789ABCDEFghij="


def _record(msg: str, *args: object, exc: bool = False, **extra: Any) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"could not use {API_KEY}")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("custody.test", logging.WARNING, __file__, 1, msg, args or None, exc_info)
    record.__dict__.update(extra)
    return record


def _json(record: logging.LogRecord, formatter: logging.Formatter | None = None) -> dict[str, Any]:
    line = (formatter or JsonFormatter()).format(record)
    assert "\n" not in line
    return dict(json.loads(line))


def test_json_formatter_writes_one_object_per_line_with_the_standard_fields() -> None:
    entry = _json(_record("two\nlines for %s", "wal_1", status=200, path="/v1/wallets"))
    assert entry["message"] == "two\nlines for wal_1"
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "custody.test"
    assert entry["ts"].endswith("Z")
    assert entry["request_id"] is None
    assert entry["status"] == 200
    assert entry["path"] == "/v1/wallets"


def test_an_api_key_or_operator_token_in_a_message_is_masked_but_its_id_is_kept() -> None:
    text = json.dumps(_json(_record("agent used %s, operator %s", API_KEY, OPERATOR_TOKEN)))
    assert API_KEY_SECRET not in text
    assert OPERATOR_TOKEN.rsplit(".", 1)[1] not in text
    assert f"cak.key_0123456789abcdef.{REDACTED}" in text
    assert f"cop.op_0123456789abcdef.{REDACTED}" in text


def test_an_authorization_header_value_is_masked_wherever_it_appears() -> None:
    headers = {"Authorization": BEARER_VALUE, "accept": "application/json"}
    entry = _json(_record("request headers: %s", headers), JsonFormatter(fields={"headers"}))
    assert "opaque-canary-token-77f1" not in entry["message"]
    assert entry["message"] == "request headers: {'Authorization': '[REDACTED]', 'accept': 'application/json'}"
    assert _json(_record("retry with -H 'Authorization: %s'", BEARER_VALUE))["message"] == (
        "retry with -H 'Authorization: [REDACTED]'"
    )
    assert _json(_record("the client sent %s", BEARER_VALUE))["message"] == "the client sent Bearer [REDACTED]"
    with_field = _json(_record("call", headers=headers), JsonFormatter(fields={"headers"}))
    assert with_field["headers"] == {"Authorization": REDACTED, "accept": "application/json"}


@pytest.mark.parametrize("form", [HEX_KEY, "0x" + HEX_KEY, HEX_KEY.upper()])
def test_a_32_byte_hex_key_is_masked_in_any_case_with_or_without_0x(form: str) -> None:
    entry = _json(_record("loaded key %s from disk", form, exc=True))
    text = json.dumps(entry)
    assert HEX_KEY not in text.lower()
    assert entry["message"] == f"loaded key {REDACTED} from disk"


def test_an_extra_named_private_key_is_dropped_and_masked_even_when_allowed() -> None:
    record = _record("imported", private_key=HEX_KEY, wallet_id="wal_1", unknown_field="x")
    default = _json(record)
    assert "private_key" not in default
    assert "unknown_field" not in default
    assert default["wallet_id"] == "wal_1"
    allowed = _json(record, JsonFormatter(fields={"private_key", "kek_secret", "wallet_id"}))
    assert allowed["private_key"] == REDACTED
    nested = _json(
        _record("config", settings={"kek_secret": KEK_BASE64, "seed_phrase": "canary words", "port": 8700}),
        JsonFormatter(fields={"settings"}),
    )
    assert nested["settings"] == {"kek_secret": REDACTED, "seed_phrase": REDACTED, "port": 8700}


def test_secrets_in_exception_text_and_key_value_pairs_are_masked() -> None:
    entry = _json(_record("failed with password=hunter2-canary and kek %s", KEK_BASE64, exc=True))
    text = json.dumps(entry)
    for canary in (API_KEY_SECRET, "hunter2-canary", KEK_BASE64.rstrip("=")):
        assert canary not in text
    assert entry["exc_type"] == "ValueError"
    assert "Traceback" in entry["exception"]


def test_the_text_format_masks_the_same_values() -> None:
    formatter = TextFormatter()
    line = formatter.format(_record("key %s token %s auth %s", HEX_KEY, API_KEY, BEARER_VALUE, exc=True))
    for canary in (HEX_KEY, API_KEY_SECRET, "opaque-canary-token-77f1"):
        assert canary not in line
    assert "[-]" in line  # no request id outside a request


def test_a_broken_log_call_does_not_print_its_arguments() -> None:
    entry = _json(_record("%s and %s", API_KEY))  # one argument for two placeholders
    assert API_KEY_SECRET not in json.dumps(entry)
    assert "unformattable" in entry["message"]


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("req-0123_abc", True),
        ("7d0f5c1e-9a43-4f1b-8a4e-0c2b9e6d1f00", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("cak.key_1.secret", False),
        ("has space", False),
        ("line\nbreak", False),
        ("", False),
    ],
)
def test_only_short_safe_request_ids_are_accepted(value: str, accepted: bool) -> None:
    assert (accepted_request_id(value) == value) is accepted


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logger")
def test_production_logging_writes_json_lines_and_development_writes_text(
    capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    _configure_logging(Settings(mode="production", data_dir=tmp_path))
    logging.getLogger("custody.api").info("started with %s", API_KEY)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    entry = json.loads(line)
    assert entry["logger"] == "custody.api"
    assert entry["level"] == "INFO"
    assert API_KEY_SECRET not in line

    _configure_logging(Settings(data_dir=tmp_path))  # development: text, replacing the JSON handler
    logging.getLogger("custody.api").warning("plain")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("WARNING custody.api [-] plain")

    _configure_logging(Settings(data_dir=tmp_path, log_format="json", log_level="warning"))
    logging.getLogger("custody.api").info("hidden")
    logging.getLogger("custody.api").warning("shown")
    assert [json.loads(x)["message"] for x in capsys.readouterr().err.strip().splitlines()] == ["shown"]


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    """JSON lines of the ``custody`` loggers, as production would write them."""
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("custody")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield sink
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("backend", ["sqlite"])  # the database plays no part
async def test_a_request_id_round_trips_and_is_on_the_log_line_of_that_request(
    settings: Settings, signer: SignerThread, access_lines: io.StringIO
) -> None:
    async with running(settings, access_log=True) as (client, _, token):
        given = await client.get("/healthz", headers={"X-Request-Id": "trace-4711"})
        unsafe = await client.get(
            "/admin/v1/wallets", headers={"X-Request-Id": "cak.x.y", "Authorization": f"Bearer {token}"}
        )
        missing = await client.get("/v1/payments/pay_nothing")
    assert given.headers["X-Request-Id"] == "trace-4711"
    assert unsafe.headers["X-Request-Id"] != "cak.x.y"
    assert accepted_request_id(unsafe.headers["X-Request-Id"]) is not None
    assert missing.headers["X-Request-Id"] not in (given.headers["X-Request-Id"], unsafe.headers["X-Request-Id"])
    assert missing.status_code == 401

    entries = [json.loads(line) for line in access_lines.getvalue().splitlines()]
    by_id = {e["request_id"]: e for e in entries if e["logger"] == "custody.access"}
    assert by_id["trace-4711"]["route"] == "/healthz"
    assert by_id["trace-4711"]["status"] == 200
    assert by_id[unsafe.headers["X-Request-Id"]]["path"] == "/admin/v1/wallets"
    assert by_id[missing.headers["X-Request-Id"]]["route"] == "/v1/payments/{payment_id}"
    assert token.rsplit(".", 1)[1] not in access_lines.getvalue()
