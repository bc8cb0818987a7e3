"""Printing for the CLI: human text or ``--json``, and errors with their stable code."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer

from custody.errors import CustodyError, DatabaseUnavailable
from custody.storage.db import is_database_outage

JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON.")


def emit(data: Any, as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        human()


@contextmanager
def errors_to_exit(as_json: bool = False) -> Iterator[None]:
    """Turn a CustodyError into a one-line message (or problem JSON) and exit code 1."""
    try:
        try:
            yield
        except Exception as exc:
            if is_database_outage(exc):
                raise DatabaseUnavailable(f"the database is unavailable ({type(exc).__name__})") from None
            raise
    except CustodyError as exc:
        if as_json:
            typer.echo(json.dumps(exc.to_problem(), sort_keys=True), err=True)
        else:
            typer.echo(f"error [{exc.code}]: {exc.detail}", err=True)
        raise typer.Exit(1) from None


def banner(lines: list[str]) -> None:
    width = max(len(line) for line in lines) + 4
    typer.echo("!" * width, err=True)
    for line in lines:
        typer.echo(f"! {line.ljust(width - 4)} !", err=True)
    typer.echo("!" * width, err=True)


class Progress:
    """A one-line progress counter on a terminal; silent otherwise (and with --json)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled

    def __call__(self, done: int, total: int) -> None:
        if self.enabled:
            sys.stderr.write(f"\r{self.label}: {done}/{total}")
            if done >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()
