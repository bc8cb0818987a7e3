"""Chain-aware decoding: what a signing request would do, as a ``policies.Intent``."""

from custody.chain.decode import DecodeError, decode_message, decode_transaction, decode_typed_data

__all__ = ["DecodeError", "decode_message", "decode_transaction", "decode_typed_data"]
