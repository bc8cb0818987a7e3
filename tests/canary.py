"""Find secret material in any encoding, and collect what Redis holds or carries.

:func:`find` looks for a secret as raw bytes, as Python's ``repr`` of the bytes, as hex (any case,
with or without ``0x``), as its decimal integer, and as standard or URL-safe base64 with or without
padding, whether the base64 encodes the secret alone or starts it at any byte offset inside a longer
blob (the three alignments). Line breaks (wrapped base64 or hex) and JSON's escaped ``\\/`` are ignored.

:func:`scan_redis` reads every key under a prefix (or the whole database) with its value, whatever
its type; :class:`RedisTap` records every message published on the prefix's channels meanwhile.
"""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import redis

_GLOB_SPECIAL = re.compile(rb"([*?\[\]\\])")


def _aligned(encode: Callable[[bytes], bytes], secret: bytes, offset: int) -> bytes:
    """The base64 characters that depend on ``secret`` alone when it starts ``offset`` bytes into a 3-byte group."""
    encoded = encode(bytes(offset) + secret)
    first = -(-offset * 8 // 6)  # the characters that also carry bits of the preceding bytes
    last = (offset + len(secret)) * 8 // 6  # ... and of the following ones
    return encoded[first:last]


def forms(secret: bytes) -> dict[str, list[bytes]]:
    """Every encoding :func:`find` searches for (hex is matched case-insensitively)."""
    out = {
        "raw": [secret],
        "bytes repr": [repr(secret)[2:-1].encode()],  # what %r or {!r} of the bytes prints
        "hex": [secret.hex().encode()],
        "base64": [_aligned(base64.b64encode, secret, offset) for offset in range(3)],
        "base64url": [_aligned(base64.urlsafe_b64encode, secret, offset) for offset in range(3)],
    }
    if len(secret) >= 16:  # shorter numbers would match by chance
        out["decimal"] = [str(int.from_bytes(secret, "big")).encode()]
    return out


def _normalized(data: bytes) -> bytes:
    return data.replace(b"\r", b"").replace(b"\n", b"").replace(b"\\/", b"/")


def find(key: bytes, haystack: bytes | str) -> list[str]:
    """The names of the encodings of ``key`` that occur in ``haystack``."""
    if isinstance(haystack, str):
        # Text made from bytes either way: UTF-8 (with surrogate escapes) or one character per byte.
        data = haystack.encode(errors="surrogateescape") + b"\n" + haystack.encode("latin-1", errors="ignore")
    else:
        data = haystack
    texts = (data, _normalized(data))
    lowered = tuple(text.lower() for text in texts)
    found = []
    for name, encodings in forms(key).items():
        where = lowered if name == "hex" else texts
        if any(encoding in text for encoding in encodings for text in where):
            found.append(name)
    return found


def _glob(prefix: str) -> bytes:
    return _GLOB_SPECIAL.sub(rb"\\\1", prefix.encode()) + b"*"


def _value(client: redis.Redis, key: bytes) -> bytes | None:
    kind = client.type(key)
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind == "none":
        return None  # expired while we looked
    if kind == "string":
        return client.get(key) or b""
    if kind == "hash":
        return b"\n".join(field + b"=" + value for field, value in client.hgetall(key).items())
    if kind == "list":
        return b"\n".join(client.lrange(key, 0, -1))
    if kind == "set":
        return b"\n".join(sorted(client.smembers(key)))
    if kind == "zset":
        return b"\n".join(m + b" " + repr(s).encode() for m, s in client.zrange(key, 0, -1, withscores=True))
    if kind == "stream":
        entries = client.xrange(key)
        return b"\n".join(i + b" " + b" ".join(f + b"=" + v for f, v in fields.items()) for i, fields in entries)
    # Any other type (a module's): its serialized form. Large strings in it may be compressed,
    # which is why the plain types above are read as values.
    return client.dump(key) or b""


def scan_redis(url: str, prefix: str | None = None) -> dict[str, bytes]:
    """Every key of the Redis database at ``url`` (only those starting with ``prefix``), as name + value bytes."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        out: dict[str, bytes] = {}
        for key in client.scan_iter(match=_glob(prefix) if prefix else None, count=1000):
            value = _value(client, key)
            if value is not None:
                out[key.decode(errors="backslashreplace")] = key + b"\n" + value
        return out
    finally:
        client.close()


class RedisTap:
    """Records every message published on channels that start with ``prefix`` while it is open."""

    def __init__(self, url: str, prefix: str) -> None:
        self.messages: list[bytes] = []
        self._client = redis.Redis.from_url(url, socket_timeout=5)
        self._pubsub = self._client.pubsub()
        self._pattern = _glob(prefix)
        self._thread: Any = None
        self._lock = threading.Lock()

    def _record(self, message: dict[str, Any]) -> None:
        with self._lock:
            self.messages.append(bytes(message["channel"]) + b" " + bytes(message["data"]))

    def __enter__(self) -> RedisTap:
        self._pubsub.psubscribe(**{self._pattern.decode(): self._record})
        confirmed = self._pubsub.get_message(timeout=5)  # the subscription is active from here on
        assert confirmed is not None
        assert confirmed["type"] == "psubscribe"
        self._thread = self._pubsub.run_in_thread(sleep_time=0.01, daemon=True)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._thread.stop()
        self._thread.join(5)
        self._pubsub.close()
        self._client.close()

    def seen(self) -> bytes:
        with self._lock:
            return b"\n".join(self.messages)
