"""Agent Custody: keys in an isolated signer, payments signed only within policy.

The server lives in the submodules (installed with the ``server`` extra); the agent
SDK in :mod:`custody.client` needs only httpx and pydantic.
"""

__version__ = "0.1.0"
