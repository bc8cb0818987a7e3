"""Process-wide safety settings applied at start-up by the API, the signer and the CLI."""

from __future__ import annotations

import sys

SAFE_RECURSION_LIMIT = 1000


def restore_recursion_limit() -> None:
    """Undo py_ecc's import-time ``sys.setrecursionlimit(100000)``.

    py_ecc comes with eth-account. With its limit, a deeply nested JSON document overflows
    the C stack while parsing and kills the process; with the default limit the parser
    raises ``RecursionError``, which becomes a clear 400 or a protocol error.
    """
    import eth_account  # noqa: F401  (imports py_ecc, whose side effect is undone below)

    sys.setrecursionlimit(SAFE_RECURSION_LIMIT)
