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
from pathlib import Path
from typing import Literal

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
    redis_url: str | None = None

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

    # The CLI against a remote service.
    url: str | None = None
    admin_token: SecretStr | None = None

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
            problems.extend(self._api_problems())
        return problems

    def _signer_problems(self) -> list[str]:
        problems: list[str] = []
        if self.kek_source is None:
            problems.append("CUSTODY_KEK_SOURCE is not set: choose file, secret or passphrase")
        if self.kek_source == "secret":
            problems.extend(_secret_problems(self))
        if self.kek_source == "passphrase":
            value = _read_secret(self.kek_passphrase, self.kek_passphrase_file)
            if value is not None and (value.strip().lower() in KNOWN_DEFAULT_SECRETS or len(value) < 12):
                problems.append("CUSTODY_KEK_PASSPHRASE is a default or shorter than 12 characters")
        if self.signer_socket_mode & 0o007:
            problems.append(
                f"CUSTODY_SIGNER_SOCKET_MODE={oct(self.signer_socket_mode)} lets any user open "
                "the signer socket: use 0600 (or 0660 with a dedicated group)"
            )
        return problems

    def _api_problems(self) -> list[str]:
        problems: list[str] = []
        if self.uses_sqlite and not self.allow_sqlite:
            problems.append(
                "CUSTODY_DATABASE_URL points to SQLite: set a PostgreSQL URL, "
                "or CUSTODY_ALLOW_SQLITE=true to accept a single-node deployment"
            )
        if self.admin_token is not None and self.admin_token.get_secret_value().strip().lower() in (
            KNOWN_DEFAULT_SECRETS
        ):
            problems.append("CUSTODY_ADMIN_TOKEN is a default value")
        return problems

    def require_safe(self, role: Role = "both") -> None:
        problems = self.production_problems(role)
        if problems:
            raise ConfigurationError("production mode refuses to start: " + "; ".join(problems), problems=problems)


def _read_secret(value: SecretStr | None, path: Path | None) -> str | None:
    if value is not None:
        return value.get_secret_value()
    if path is not None and path.exists():
        return path.read_text().strip()
    return None


def _secret_problems(settings: Settings) -> list[str]:
    raw = _read_secret(settings.kek_secret, settings.kek_secret_file)
    if raw is None:
        return ["CUSTODY_KEK_SECRET (or CUSTODY_KEK_SECRET_FILE) is not set"]
    problems: list[str] = []
    for line in raw.splitlines():
        _, _, material = line.strip().rpartition(":")
        if material.lower() in KNOWN_DEFAULT_SECRETS or material == _ALL_ZERO_KEY:
            problems.append("CUSTODY_KEK_SECRET holds a default or all-zero key")
            continue
        try:
            decoded = base64.b64decode(material, validate=True)
        except binascii.Error:
            problems.append("CUSTODY_KEK_SECRET is not valid base64")
            continue
        if len(decoded) != 32:
            problems.append("CUSTODY_KEK_SECRET must decode to 32 bytes")
    return problems


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with owner-only permissions."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
