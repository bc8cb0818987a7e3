"""Configuration, read from ``CUSTODY_*`` environment variables.

Settings are built explicitly (``Settings()``) and passed down; nothing reads the
environment at import time. Development mode works with no configuration at all
and says so loudly; production mode refuses insecure defaults (see
:meth:`Settings.production_problems`).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from custody.errors import ConfigurationError

DEFAULT_PORT = 8700
Role = Literal["api", "signer", "both"]
# Secrets that documentation and examples use; production refuses them.
KNOWN_DEFAULT_SECRETS = frozenset({"", "changeme", "change-me", "secret", "password", "development"})
_ALL_ZERO_KEY = base64.b64encode(bytes(32)).decode()


def default_data_dir() -> Path:
    return Path.home() / ".agent-custody"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CUSTODY_", extra="ignore")

    mode: Literal["development", "production"] = "development"
    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = None
    allow_sqlite: bool = False
    # Longest wait for the database (connect, pool, each statement): past it, a request gets a 503.
    database_timeout_seconds: float = 10.0
    redis_url: str | None = None
    # Key prefix in Redis, so several deployments (or tests) can share one server.
    redis_prefix: str = "custody:"

    # Requests per minute one agent may send (sign requests and status polls); 0 turns it off.
    # Shared between API replicas through Redis; per process without it (or while Redis is down).
    agent_rate_limit_per_minute: int = 600
    # A reservation still unsigned after this was left by a crash of an earlier version (this one
    # commits a reservation with its signature): the recovery sweep releases it.
    reservation_lease_seconds: float = 60.0
    # How often each API process chains the audit records that payments queued (reads chain first anyway).
    audit_seal_interval_seconds: float = Field(default=0.5, gt=0, le=60)
    # Crash points for recovery tests (custody/failpoints.py); refused in production.
    failpoints: str | None = None

    # The signer and its socket.
    signer_socket: Path | None = None
    signer_socket_mode: int = 0o600
    # "UID" or "UID:GID": give the socket to the API's user when the two run as different users.
    signer_socket_owner: str | None = None
    signer_timeout_seconds: float = 5.0

    # Where the key-encryption key comes from. Development defaults to "file".
    kek_source: Literal["file", "secret", "passphrase"] | None = None
    kek_dir: Path | None = None
    kek_secret: SecretStr | None = None
    kek_secret_file: Path | None = None
    kek_passphrase: SecretStr | None = None
    kek_passphrase_file: Path | None = None
    kek_scrypt_n: int = 2**15

    # Webhook deliveries: how often the dispatcher looks for due ones, and the first retry delay.
    webhook_interval_seconds: float = 1.0
    webhook_backoff_seconds: float = 2.0

    # The HTTP API.
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT

    # Logs and metrics (docs/observability.md). The log format defaults to json in production.
    log_format: Literal["json", "text"] | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    access_log: bool = False
    # /metrics needs an operator token unless this is set (then bind the API to an internal network).
    metrics_public: bool = False

    # The CLI against a remote service.
    url: str | None = None
    admin_token: SecretStr | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("signer_socket_mode", mode="before")
    @classmethod
    def _octal(cls, value: object) -> object:
        if isinstance(value, str):
            return int(value, 8)
        return value

    # Derived locations -------------------------------------------------------------
    @property
    def is_production(self) -> bool:
        return self.mode == "production"

    @property
    def effective_log_format(self) -> Literal["json", "text"]:
        return self.log_format or ("json" if self.is_production else "text")

    @property
    def socket_path(self) -> Path:
        return self.signer_socket or self.data_dir / "signer.sock"

    @property
    def kek_directory(self) -> Path:
        return self.kek_dir or self.data_dir / "kek"

    @property
    def effective_kek_source(self) -> str | None:
        if self.kek_source is None and not self.is_production:
            return "file"
        return self.kek_source

    @property
    def sqlalchemy_url(self) -> str:
        """The async SQLAlchemy URL: SQLite in the data directory unless configured."""
        url = self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'custody.db'}"
        if url.startswith("postgres://"):
            url = "postgresql://" + url.removeprefix("postgres://")
        if url.startswith("postgresql://"):
            url = "postgresql+asyncpg://" + url.removeprefix("postgresql://")
        elif url.startswith("sqlite:///"):
            url = "sqlite+aiosqlite:///" + url.removeprefix("sqlite:///")
        return url

    @property
    def uses_sqlite(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")

    # Production guard rails -------------------------------------------------------
    def production_problems(self, role: Role = "both") -> list[str]:
        """Every reason production mode refuses this configuration, each naming its setting.

        ``role`` is the process being started: the API never reads the KEK settings (it must
        run without them), the signer never needs the database.
        """
        if not self.is_production:
            return []
        problems: list[str] = []
        if role in ("signer", "both"):
            problems.extend(self._signer_problems())
        if role in ("api", "both"):
            problems.extend(p for p in self._api_problems() if p not in problems)
        return problems

    def _signer_problems(self) -> list[str]:
        problems: list[str] = []
        if self.failpoints:
            problems.append("CUSTODY_FAILPOINTS is set: crash points are for tests, never for production")
        if self.kek_source is None:
            problems.append("CUSTODY_KEK_SOURCE is not set: choose file, secret or passphrase")
        if self.kek_source == "secret":
            problems.extend(_secret_problems(self))
        if self.kek_source == "passphrase":
            problems.extend(_passphrase_problems(self))
        if self.signer_socket_mode & 0o007:
            problems.append(
                f"CUSTODY_SIGNER_SOCKET_MODE={oct(self.signer_socket_mode)} lets any user open "
                "the signer socket: use 0600 (or 0660 with a dedicated group)"
            )
        return problems

    def _api_problems(self) -> list[str]:
        problems: list[str] = []
        if self.reservation_lease_seconds <= self.signer_timeout_seconds + 2 * self.database_timeout_seconds:
            problems.append(
                "CUSTODY_RESERVATION_LEASE_SECONDS must exceed CUSTODY_SIGNER_TIMEOUT_SECONDS plus twice "
                "CUSTODY_DATABASE_TIMEOUT_SECONDS, or a live request could be taken for a crashed one"
            )
        if self.failpoints:
            problems.append("CUSTODY_FAILPOINTS is set: crash points are for tests, never for production")
        if self.uses_sqlite and not self.allow_sqlite:
            problems.append(
                "CUSTODY_DATABASE_URL points to SQLite: set a PostgreSQL URL, "
                "or CUSTODY_ALLOW_SQLITE=true to accept a single-node deployment"
            )
        if self.admin_token is not None and self.admin_token.get_secret_value().strip().lower() in (
            KNOWN_DEFAULT_SECRETS
        ):
            problems.append("CUSTODY_ADMIN_TOKEN is a default value")
        problems.extend(_url_password_problems("CUSTODY_DATABASE_URL", self.database_url))
        problems.extend(_url_password_problems("CUSTODY_REDIS_URL", self.redis_url))
        return problems

    def require_safe(self, role: Role = "both") -> None:
        problems = self.production_problems(role)
        if problems:
            raise ConfigurationError("production mode refuses to start: " + "; ".join(problems), problems=problems)


class _Unreadable(Exception):
    """A secret file that is set but cannot be read; the message names the setting, never the value."""


def _read_secret(value: SecretStr | None, path: Path | None, setting: str) -> tuple[str | None, str]:
    """The secret's text and the setting it came from. The file wins, as in the KEK sources."""
    if path is not None:
        try:
            return path.read_text(), f"{setting}_FILE"
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not text"
            raise _Unreadable(f"{setting}_FILE={path} cannot be read ({reason})") from None
    if value is not None:
        return value.get_secret_value(), setting
    return None, setting


def _versioned_values(raw: str) -> list[str]:
    """The values of ``v<N>:value`` lines (a bare line is one value); blank lines are ignored."""
    return [re.sub(r"^v\d+:", "", line.strip()) for line in raw.splitlines() if line.strip()]


def _secret_problems(settings: Settings) -> list[str]:
    try:
        raw, name = _read_secret(settings.kek_secret, settings.kek_secret_file, "CUSTODY_KEK_SECRET")
    except _Unreadable as exc:
        return [str(exc)]
    if raw is None:
        return ["CUSTODY_KEK_SECRET (or CUSTODY_KEK_SECRET_FILE) is not set"]
    values = _versioned_values(raw)
    if not values:
        return [f"{name} is empty"]
    problems: list[str] = []
    for material in values:
        if material.lower() in KNOWN_DEFAULT_SECRETS or material == _ALL_ZERO_KEY:
            problems.append(f"{name} holds a default or all-zero key")
            continue
        try:
            decoded = base64.b64decode(material, validate=True)
        except binascii.Error:
            problems.append(f"{name} is not valid base64")
            continue
        if len(decoded) != 32:
            problems.append(f"{name} must decode to 32 bytes")
    return problems


def _passphrase_problems(settings: Settings) -> list[str]:
    """No passphrase at all is allowed (the signer starts sealed); a weak or unreadable one is not."""
    try:
        raw, name = _read_secret(settings.kek_passphrase, settings.kek_passphrase_file, "CUSTODY_KEK_PASSPHRASE")
    except _Unreadable as exc:
        return [str(exc)]
    if raw is None:
        return []
    values = _versioned_values(raw)
    if not values:
        return [f"{name} is empty"]
    if any(value.lower() in KNOWN_DEFAULT_SECRETS or len(value) < 12 for value in values):
        return [f"{name} is a default or shorter than 12 characters"]
    return []


def _url_password_problems(setting: str, url: str | None) -> list[str]:
    """A password in a connection URL must not be empty, a known default, or the user name."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return []
    if password is None:
        return []
    value = password.strip().lower()
    if value in KNOWN_DEFAULT_SECRETS or value in {"postgres", "redis"} or value == (parts.username or "").lower():
        return [f"{setting} has an empty or default password"]
    return []


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with owner-only permissions."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
