"""The ``custody`` command."""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import signal
import subprocess  # nosec B404 # only to start this package's own signer process
import sys
import time
from pathlib import Path

import typer

from custody.cli.admin import register_admin_commands
from custody.cli.audit import audit_app
from custody.cli.demo import register_demo_command
from custody.cli.mcp import register_mcp_command
from custody.cli.operator import admin_request, require_local, run_local
from custody.cli.output import JsonOption, Progress, banner, emit, errors_to_exit
from custody.cli.policy import policy_app
from custody.errors import ConfigurationError, InvalidRequest, SignerUnavailable
from custody.runtime import die_with_parent, freeze_startup_objects, restore_recursion_limit
from custody.schemas import WalletOut
from custody.services import operators as operator_service
from custody.services import wallets as wallet_service
from custody.services.context import Context
from custody.settings import Role, Settings, ensure_private_dir

app = typer.Typer(
    help="Agent Custody: wallet keys in an isolated signer, payments within policy.", no_args_is_help=True
)
wallet_app = typer.Typer(help="Create, import and list wallets.", no_args_is_help=True)
keys_app = typer.Typer(help="Key-encryption key operations.", no_args_is_help=True)
signer_app = typer.Typer(help="The signer process (holds the keys).", invoke_without_command=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(wallet_app, name="wallet")
app.add_typer(keys_app, name="keys")
app.add_typer(signer_app, name="signer")
app.add_typer(db_app, name="db")
app.add_typer(policy_app, name="policy")
register_admin_commands(app, policy_app)
app.add_typer(audit_app, name="audit")
register_mcp_command(app)
register_demo_command(app)


def _settings() -> Settings:
    try:
        return Settings()
    except ValueError as exc:
        typer.echo(f"error [invalid_configuration]: {exc}", err=True)
        raise typer.Exit(2) from None


def _guard(settings: Settings, role: Role) -> None:
    """Refuse production mode with insecure settings; shout in development mode."""
    try:
        settings.require_safe(role)
    except ConfigurationError as exc:
        for problem in exc.extra.get("problems", []):
            typer.echo(f"error [insecure_configuration]: {problem}", err=True)
        raise typer.Exit(2) from None
    if not settings.is_production:
        banner(
            [
                "DEVELOPMENT MODE - not for real funds.",
                f"Data and the key-encryption key file live in {settings.data_dir}.",
                "Set CUSTODY_MODE=production with a KEK source for real use.",
            ]
        )


def _configure_logging(settings: Settings) -> logging.Handler:
    """Log to stderr as JSON lines (production default) or text, with secrets masked either way."""
    from custody.observability.logging import configure_logging

    return configure_logging(settings.effective_log_format, settings.log_level)


async def _bootstrap(settings: Settings) -> str | None:
    ctx = await Context.open(settings)
    try:
        return await operator_service.ensure_first_admin(ctx)
    finally:
        await ctx.close()


def _print_admin_token(token: str) -> None:
    typer.echo("First admin credential (shown once; only its hash is stored):", err=True)
    # Shown once on purpose, to the operator who ran the command; never logged.
    # nosemgrep: no-secret-in-logs-or-errors
    typer.echo(f"  CUSTODY_ADMIN_TOKEN={token}", err=True)


@app.command()
def init(as_json: bool = JsonOption) -> None:
    """Create the data directory, the key-encryption key and the first admin credential."""
    settings = _settings()
    if settings.uses_sqlite:
        ensure_private_dir(settings.data_dir)
    if settings.effective_kek_source == "file":
        from custody.keys.kek import FileKekSource

        FileKekSource(settings.kek_directory, create=True).ensure()
    with errors_to_exit(as_json):
        token = asyncio.run(_bootstrap(settings))
    data = {"data_dir": str(settings.data_dir), "admin_token": token, "initialized": token is not None}
    if token is None:
        emit(data, as_json, lambda: typer.echo(f"Already initialized: {settings.data_dir}"))
        return

    def human() -> None:
        typer.echo(f"Initialized {settings.data_dir}")
        _print_admin_token(token)

    emit(data, as_json, human)


@app.command()
def serve(
    host: str = typer.Option(None, help="Address to listen on (default CUSTODY_HOST or 127.0.0.1)."),
    port: int = typer.Option(None, help="Port to listen on (default CUSTODY_PORT or 8700)."),
    signer: bool = typer.Option(True, help="Start the signer as a child process (the embedded default)."),
) -> None:
    """Run the API (and, by default, the signer as a separate process)."""
    import uvicorn

    from custody.api.app import create_app

    settings = _settings()
    settings = settings.model_copy(update={"host": host or settings.host, "port": port or settings.port})
    _guard(settings, "both" if signer else "api")
    _configure_logging(settings)
    with errors_to_exit():
        token = asyncio.run(_bootstrap(settings))
    if token:
        _print_admin_token(token)
    child = _start_signer(settings) if signer else None
    # uvicorn shuts down on SIGTERM, then raises the signal again for the previous handler: make
    # that handler an exception, so the signer below is stopped and waited for, not orphaned.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run(
            create_app(settings, started=freeze_startup_objects),
            host=settings.host,
            port=settings.port,
            access_log=False,  # custody.access logs requests instead (CUSTODY_ACCESS_LOG)
            log_config=None,  # uvicorn's own lines go through the same formatter
            log_level=settings.log_level.lower(),
        )
    finally:
        if child is not None:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _start_signer(settings: Settings) -> subprocess.Popen[bytes]:
    child = subprocess.Popen(  # nosec B603 # a fixed argument list (this interpreter, this package), no shell
        [sys.executable, "-m", "custody", "signer", "run"], preexec_fn=die_with_parent
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if child.poll() is not None:
            typer.echo(f"error [signer_unavailable]: the signer exited with code {child.returncode}", err=True)
            raise typer.Exit(1)
        try:
            status = run_signer_status(settings)
        except SignerUnavailable:
            time.sleep(0.1)
            continue
        if status.get("pid") != child.pid:
            child.terminate()
            typer.echo(
                f"error [signer_unavailable]: another signer already listens on {settings.socket_path}; "
                "stop it or use `custody serve --no-signer`",
                err=True,
            )
            raise typer.Exit(1)
        if status.get("sealed"):
            typer.echo(f"warning: the signer is SEALED: {status.get('reason')}", err=True)
        return child
    child.kill()
    typer.echo("error [signer_unavailable]: the signer did not start within 20 s", err=True)
    raise typer.Exit(1)


def run_signer_status(settings: Settings) -> dict[str, object]:
    from custody.signer.client import SignerClient

    async def _status() -> dict[str, object]:
        client = SignerClient(settings.socket_path, timeout=settings.signer_timeout_seconds)
        try:
            return await client.status()
        finally:
            await client.close()

    return asyncio.run(_status())


@signer_app.callback()
def signer_main(ctx: typer.Context) -> None:
    """Run the signer (the default), or query and unseal it."""
    if ctx.invoked_subcommand is None:
        signer_run()


@signer_app.command("run")
def signer_run() -> None:
    """Run the signer in the foreground on CUSTODY_SIGNER_SOCKET."""
    from custody.signer.server import serve as serve_signer

    settings = _settings()
    _guard(settings, "signer")
    _configure_logging(settings)
    try:
        asyncio.run(serve_signer(settings, ready=lambda _core: freeze_startup_objects()))
    except RuntimeError as exc:
        typer.echo(f"error [signer_unavailable]: {exc}", err=True)
        raise typer.Exit(1) from None


@signer_app.command("status")
def signer_status(as_json: bool = JsonOption) -> None:
    """Is the signer reachable, and is it sealed?"""
    settings = _settings()
    with errors_to_exit(as_json):
        status = run_signer_status(settings)
    emit(
        status,
        as_json,
        lambda: typer.echo(
            f"signer: {'SEALED (' + str(status.get('reason')) + ')' if status.get('sealed') else 'unsealed'}; "
            f"KEK source {status.get('kek_source')}, version {status.get('kek_version')}"
        ),
    )


@signer_app.command("unseal")
def signer_unseal(
    passphrase_file: Path = typer.Option(None, help="Read the passphrase from this file instead of a prompt."),
    as_json: bool = JsonOption,
) -> None:
    """Unseal a signer: with a passphrase (passphrase source) or by re-reading its KEK source."""
    from custody.signer.client import SignerClient

    settings = _settings()
    passphrase: str | None = None
    if settings.effective_kek_source == "passphrase":
        if passphrase_file is not None:
            passphrase = passphrase_file.read_text().rstrip("\n")
        elif sys.stdin.isatty():
            passphrase = getpass.getpass("KEK passphrase: ")
        else:
            passphrase = sys.stdin.readline().rstrip("\n")

    async def _unseal() -> dict[str, object]:
        client = SignerClient(settings.socket_path, timeout=max(settings.signer_timeout_seconds, 30.0))
        try:
            return await client.unseal(passphrase)
        finally:
            await client.close()

    with errors_to_exit(as_json):
        status = asyncio.run(_unseal())
    emit(status, as_json, lambda: typer.echo("signer: " + ("SEALED" if status.get("sealed") else "unsealed")))


def _print_wallet(wallet: WalletOut) -> None:
    typer.echo(f"{wallet.address}  {wallet.name}  ({wallet.id})")


@wallet_app.command("create")
def wallet_create(
    name: str = typer.Argument(..., help="A unique name for the wallet."), as_json: bool = JsonOption
) -> None:
    """Create a wallet; its key is generated inside the signer."""
    settings = _settings()
    with errors_to_exit(as_json):
        wallet = WalletOut.model_validate(admin_request(settings, "POST", "/admin/v1/wallets", json={"name": name}))
    emit(wallet.model_dump(), as_json, lambda: _print_wallet(wallet))


@wallet_app.command("import")
def wallet_import(
    name: str = typer.Argument(..., help="A unique name for the wallet."),
    key_file: Path = typer.Option(None, "--key-file", help="File holding the hex private key; stdin if omitted."),
    as_json: bool = JsonOption,
) -> None:
    """Import an existing private key from a file or stdin (never from an argument)."""
    settings = _settings()
    with errors_to_exit(as_json):
        require_local(settings, "importing a key")
        if key_file is not None:
            try:
                raw = key_file.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidRequest(
                    f"cannot read the key file {key_file}: {getattr(exc, 'strerror', None) or 'not text'}"
                ) from None
        elif sys.stdin.isatty():
            raw = getpass.getpass("private key (hex): ")
        else:
            raw = sys.stdin.read()
        private_key = _parse_private_key(raw)
        del raw
        wallet = WalletOut.of(run_local(settings, lambda ctx: wallet_service.import_wallet(ctx, name, private_key)))
    emit(wallet.model_dump(), as_json, lambda: _print_wallet(wallet))


def _parse_private_key(raw: str) -> bytes:
    text = raw.strip()
    text = text[2:] if text.lower().startswith("0x") else text
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise InvalidRequest("the key must be 32 bytes of hex (64 hex digits, optional 0x)") from None
    if len(key) != 32:
        raise InvalidRequest("the key must be 32 bytes of hex (64 hex digits, optional 0x)")
    return key


@wallet_app.command("list")
def wallet_list(as_json: bool = JsonOption) -> None:
    """List wallets with their addresses."""
    settings = _settings()
    with errors_to_exit(as_json):
        data = admin_request(settings, "GET", "/admin/v1/wallets")
        wallets = [WalletOut.model_validate(item) for item in data["wallets"]]

    def human() -> None:
        if not wallets:
            typer.echo("no wallets yet: `custody wallet create NAME`")
        for wallet in wallets:
            _print_wallet(wallet)

    emit({"wallets": [w.model_dump() for w in wallets]}, as_json, human)


@wallet_app.command("show")
def wallet_show(wallet_id: str, as_json: bool = JsonOption) -> None:
    """Show one wallet."""
    settings = _settings()
    with errors_to_exit(as_json):
        wallet = WalletOut.model_validate(admin_request(settings, "GET", f"/admin/v1/wallets/{wallet_id}"))
    emit(wallet.model_dump(), as_json, lambda: typer.echo(json.dumps(wallet.model_dump(), indent=2)))


@keys_app.command("rotate-kek")
def rotate_kek(
    as_json: bool = JsonOption,
    progress: bool = typer.Option(
        None, "--progress/--no-progress", help="Progress on stderr (default: on a terminal)."
    ),
) -> None:
    """Make a new KEK version current and rewrap every data key (private keys untouched)."""
    settings = _settings()
    show = (sys.stderr.isatty() if progress is None else progress) and not as_json
    with errors_to_exit(as_json):
        require_local(settings, "rotating the key-encryption key")
        result = run_local(settings, lambda ctx: wallet_service.rotate_kek(ctx, Progress("rewrapping data keys", show)))
    data = {
        "previous_kek_version": result.previous_version,
        "kek_version": result.kek_version,
        "rewrapped": result.rewrapped,
        "skipped": result.skipped,
    }
    emit(
        data,
        as_json,
        lambda: typer.echo(
            f"KEK version {result.previous_version} -> {result.kek_version}: {result.rewrapped} data keys rewrapped"
            + (f", {result.skipped} changed concurrently (run again)" if result.skipped else "")
        ),
    )


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply database migrations."""
    settings = _settings()

    async def _noop(_: Context) -> None:
        return None

    run_local(settings, _noop)
    typer.echo("database is up to date")


def main() -> None:
    restore_recursion_limit()
    app()
