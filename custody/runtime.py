"""Process-wide safety settings applied at start-up by the API, the signer and the CLI."""

from __future__ import annotations

import ctypes
import signal
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


def die_with_parent() -> None:  # pragma: no cover - runs in a child between fork and exec
    """Ask Linux to SIGTERM this child process when its parent dies, however the parent dies.

    Used as ``preexec_fn`` for the processes we start (the signer under `custody serve`,
    `custody serve` under the demo). Elsewhere it does nothing: the parent stops them itself.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
