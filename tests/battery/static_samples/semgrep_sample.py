# ruff: noqa
"""What the local semgrep rules (.semgrep/) must flag, and what they must let pass.

A line ending in ``# flags: RULE`` must be reported by that rule; every other line must not be
reported at all. tests/battery/test_static_rules.py checks both. This file is never imported.
"""

import hashlib
import hmac
import logging
import random  # flags: no-random-module
import secrets
import sys
from random import randbytes  # flags: no-random-module

import typer

log = logging.getLogger(__name__)


class KeyDecryptionError(Exception):
    pass


def leaks(private_key, api_token, settings, mnemonic, seed_phrase, kek, passphrase, password, client_secret):
    log.info("imported %s", private_key.hex())  # flags: no-secret-in-logs-or-errors
    log.debug(f"calling with {api_token}")  # flags: no-secret-in-logs-or-errors
    logging.warning("kek=%r", kek)  # flags: no-secret-in-logs-or-errors
    print(mnemonic)  # flags: no-secret-in-logs-or-errors
    typer.echo(f"seed: {seed_phrase}")  # flags: no-secret-in-logs-or-errors
    sys.stderr.write(passphrase)  # flags: no-secret-in-logs-or-errors
    log.error("login %s", settings.admin_token.get_secret_value())  # flags: no-secret-in-logs-or-errors
    log.exception("failed for %s", client_secret)  # flags: no-secret-in-logs-or-errors
    raise ValueError(f"wrong password {password}")  # flags: no-secret-in-logs-or-errors


def rethrows(data_key):
    raise RuntimeError("cannot unwrap " + data_key.hex()) from None  # flags: no-secret-in-logs-or-errors


def references_pass(key_id, api_key_id, idempotency_key, kek_version, token_address, public_key, key, wallet_id):
    log.info("key %s of %s", api_key_id, wallet_id)
    log.info("key %s", key_id)
    log.info("replayed %s", idempotency_key)
    log.info("rotated to KEK version %s", kek_version)
    log.info("unknown token contract %s", token_address)
    log.info("public key %s", public_key)
    log.info("token refused: the words in a message are not variables")
    if key_id is None:
        raise KeyDecryptionError()
    raise KeyError(f"no field {key!r} in the document")  # a bare `key` is a mapping key


def nonces():
    return secrets.token_bytes(32), random.randrange(10), randbytes(4)  # flags: no-random-module


def compares(token, expected_token, signature_hmac, computed_digest, secret, request, body, mac, token_type):
    a = token == expected_token  # flags: compare-secrets-in-constant-time
    b = signature_hmac != computed_digest  # flags: compare-secrets-in-constant-time
    c = request.headers["x-secret"] == secret  # flags: compare-secrets-in-constant-time
    d = hashlib.sha256(body).hexdigest() == mac  # flags: compare-secrets-in-constant-time
    e = hmac.compare_digest(token, expected_token)
    f = token_type == "bearer"
    g = token is None or len(token) == 64
    return a, b, c, d, e, f, g
