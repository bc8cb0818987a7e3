"""The signer: the only process that holds the KEK and decrypted private keys.

It listens on a Unix domain socket with owner-only permissions and answers a narrow
set of requests (see :mod:`custody.signer.protocol`). The API process talks to it
through :class:`custody.signer.client.SignerClient` and never sees key material.
"""
