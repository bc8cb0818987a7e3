"""``custody audit``: verify the hash chain, export the log as JSON lines (local mode)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO

import typer

from custody.audit.log import AuditLog, AuditTampered, VerifyResult
from custody.cli.operator import require_local, run_local
from custody.cli.output import JsonOption, emit, errors_to_exit
from custody.errors import InvalidRequest
from custody.services.context import Context
from custody.settings import Settings

audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)


def _settings() -> Settings:
    try:
        return Settings()
    except ValueError as exc:
        typer.echo(f"error [invalid_configuration]: {exc}", err=True)
        raise typer.Exit(2) from None


def _parse_anchor(anchor: str) -> tuple[int, str]:
    seq, _, digest = anchor.partition(":")
    try:
        number = int(seq)
    except ValueError:
        number = 0
    digest = digest.lower()
    if number < 1 or len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise InvalidRequest("--expect takes SEQ:HASH, as printed by an earlier `custody audit verify`")
    return number, digest


@audit_app.command("verify")
def verify(
    expect: str = typer.Option(
        None, "--expect", metavar="SEQ:HASH", help="An earlier head, kept outside this database, that must still hold."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Check every record and the chain head; exit 1 naming the first bad record."""
    settings = _settings()
    with errors_to_exit(as_json):
        require_local(settings, "verifying the audit log")
        anchor = _parse_anchor(expect) if expect else None

        async def _verify(ctx: Context) -> VerifyResult:
            log = AuditLog(ctx.engine)
            if anchor is None:
                return await log.verify()
            return await log.verify(expect_seq=anchor[0], expect_hash=anchor[1])

        result = run_local(settings, _verify)
        if not result.ok:
            raise AuditTampered(
                f"first bad record {result.first_bad_seq}: {result.problem}",
                first_bad_seq=result.first_bad_seq,
                problem=result.problem,
                verified=result.count,
                head_seq=result.head_seq,
                head_hash=result.head_hash,
            )
    emit(
        result.model_dump(),
        as_json,
        lambda: typer.echo(
            f"audit log intact: {result.count} records; head {result.head_seq}:{result.head_hash}\n"
            "keep the head outside this host to detect a rewritten chain (`--expect SEQ:HASH`)"
        ),
    )


@audit_app.command("export")
def export(
    output: Path = typer.Option(None, "--output", "-o", help="Write to this file (owner-only) instead of stdout."),
    after_seq: int = typer.Option(0, "--after-seq", min=0, help="Only records after this sequence number."),
    as_json: bool = JsonOption,
) -> None:
    """Write the log as JSON lines, one record per line, oldest first."""
    settings = _settings()
    with errors_to_exit(as_json):
        require_local(settings, "exporting the audit log")

        def _export(out: IO[str]) -> int:
            return run_local(settings, lambda ctx: AuditLog(ctx.engine).export(out, after_seq=after_seq))

        if output is None:
            count = _export(sys.stdout)
        else:
            try:
                fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            except OSError as exc:
                raise InvalidRequest(f"cannot write {output}: {exc.strerror}") from None
            with open(fd, "w", encoding="utf-8") as out:
                count = _export(out)
    summary = {"exported": count, "after_seq": after_seq, "output": str(output) if output else None}
    if output is None:
        # The records own stdout; the summary goes to stderr.
        typer.echo(f"exported {count} records", err=True)
        return
    emit(summary, as_json, lambda: typer.echo(f"exported {count} records to {output}"))
