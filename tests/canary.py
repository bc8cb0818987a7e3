"""Find a private key in any encoding: hex (any case, with or without 0x), base64, raw bytes."""

from __future__ import annotations

import base64


def find(key: bytes, haystack: bytes | str) -> list[str]:
    """The names of the encodings of ``key`` that occur in ``haystack``."""
    data = haystack.encode(errors="surrogateescape") if isinstance(haystack, str) else haystack
    exact = {
        "raw": key,
        "base64": base64.b64encode(key).rstrip(b"="),
        "base64url": base64.urlsafe_b64encode(key).rstrip(b"="),
    }
    found = [name for name, form in exact.items() if form in data]
    if key.hex().encode() in data.lower():  # any case; with or without 0x contains the bare form
        found.append("hex")
    return found
