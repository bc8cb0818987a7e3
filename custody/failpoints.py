"""Crash points for recovery tests: kill this process at a named step of the payment path.

``CUSTODY_FAILPOINTS`` lists ``name=probability`` pairs (``payment.after_sign=0.05``);
when the path reaches a listed step, the process sends itself SIGKILL with that
probability, exactly as a power cut or the kernel's OOM killer would stop it. Unset (the
default) every call is a dictionary lookup that finds nothing. Production mode refuses to
start with failpoints set.

The steps: ``payment.after_sign`` (signature produced, the decision's transaction not yet
committed), ``payment.after_record`` (committed, not yet answered), ``signer.after_sign``
(in the signer, before it replies).
"""

from __future__ import annotations

import os
import secrets
import signal

NAMES = frozenset({"payment.after_sign", "payment.after_record", "signer.after_sign"})


def parse(spec: str | None) -> dict[str, float]:
    """``"a=0.1,b"`` → ``{"a": 0.1, "b": 1.0}``; unknown names are an error, not a silent no-op."""
    points: dict[str, float] = {}
    for item in (spec or "").split(","):
        name, _, probability = item.strip().partition("=")
        if not name:
            continue
        if name not in NAMES:
            raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(sorted(NAMES))}")
        value = float(probability) if probability else 1.0
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"failpoint {name!r}: probability must be within 0..1")
        points[name] = value
    return points


_ACTIVE = parse(os.environ.get("CUSTODY_FAILPOINTS"))


def hit(name: str) -> None:
    """Die here, now, with the configured probability."""
    probability = _ACTIVE.get(name)
    if probability and secrets.randbelow(1_000_000) < probability * 1_000_000:
        os.kill(os.getpid(), signal.SIGKILL)
