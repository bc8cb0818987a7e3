"""Reading policy, grant, intent and spend documents from disk (YAML or JSON).

The engine (``policies``) does no I/O; this module is where files are read. Duplicate keys are
an error in both formats (in a policy, a silently overridden key is a silently changed limit).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from custody.chain.decode import DecodeError, decode_message, decode_transaction, decode_typed_data
from policies import Grant, Intent, Policy, PolicyValidationError, SpendRecord, load_grant, load_policy


class PolicyFileError(Exception):
    """A file could not be read or is invalid; ``errors`` lists (field path, what is wrong)."""

    code = "invalid_policy"

    def __init__(self, path: Path, errors: list[tuple[str, str]], code: str = "invalid_policy") -> None:
        self.path = path
        self.errors = errors
        self.code = code
        super().__init__(format_errors(path, errors))


def format_errors(path: Path, errors: list[tuple[str, str]]) -> str:
    """One line per problem: ``file: field.path: what is wrong``."""
    return "\n".join(f"{path}: {field}: {message}" for field, message in errors)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses duplicate keys."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def read_document(path: Path) -> Any:
    """The parsed content of a ``.json``, ``.yaml`` or ``.yml`` file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PolicyFileError(path, [("(file)", error.strerror or str(error))], "unreadable_file") from None
    except UnicodeDecodeError:
        raise PolicyFileError(path, [("(file)", "not UTF-8 text")], "unreadable_file") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text, object_pairs_hook=_no_duplicates)
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  # nosec B506 # a SafeLoader subclass
    except (ValueError, yaml.YAMLError) as error:
        raise PolicyFileError(path, [("(syntax)", str(error))], "malformed_document") from None


def _mapping(path: Path) -> Mapping[str, Any]:
    data = read_document(path)
    if not isinstance(data, Mapping):
        raise PolicyFileError(path, [("(document)", "must be an object (a mapping of fields)")])
    return data


def load_policy_file(path: Path) -> Policy:
    """Read and validate a policy document."""
    try:
        return load_policy(_mapping(path))
    except PolicyValidationError as error:
        raise PolicyFileError(path, error.errors) from None


def load_grant_file(path: Path, policy: Policy | None = None) -> Grant:
    """Read and validate a grant (checking the names it uses exist in ``policy``, if given)."""
    try:
        return load_grant(_mapping(path), policy)
    except PolicyValidationError as error:
        raise PolicyFileError(path, error.errors) from None


def _validation_errors(error: ValidationError) -> list[tuple[str, str]]:
    return [
        (".".join(str(part) for part in entry["loc"]) or "(document)", entry["msg"].removeprefix("Value error, "))
        for entry in error.errors(include_url=False)
    ]


def load_intent_file(path: Path) -> Intent:
    """Read an intent. Either an intent (with ``kind``) or a request to decode: ``chain_id``,
    ``wallet_id``, optional ``agent_id``/``purpose``/``origin``, and one of ``transaction``,
    ``typed_data`` or ``message``."""
    data = _mapping(path)
    try:
        if "kind" in data:
            return Intent.model_validate(dict(data))
        context = {
            "chain_id": data["chain_id"],
            "wallet_id": data["wallet_id"],
            "agent_id": data.get("agent_id"),
            "purpose": data.get("purpose"),
            "origin": data.get("origin"),
        }
        if "transaction" in data:
            return decode_transaction(data["transaction"], **context)
        if "typed_data" in data:
            return decode_typed_data(data["typed_data"], **context)
        if "message" in data:
            return decode_message(data["message"], **context)
    except ValidationError as error:
        raise PolicyFileError(path, _validation_errors(error), "invalid_intent") from None
    except KeyError as error:
        raise PolicyFileError(path, [(str(error.args[0]), "is required")], "invalid_intent") from None
    except DecodeError as error:
        raise PolicyFileError(path, [("(request)", error.message)], error.code) from None
    raise PolicyFileError(
        path, [("(document)", "give an intent (kind …) or one of transaction, typed_data, message")], "invalid_intent"
    )


_RECORDS = TypeAdapter(list[SpendRecord])


def load_spend_file(path: Path) -> list[SpendRecord]:
    """Read past payments: a list of spend records (``at``, ``debits``, ``payee``, ``agent_id``)."""
    data = read_document(path)
    try:
        return _RECORDS.validate_python(data)
    except ValidationError as error:
        raise PolicyFileError(path, _validation_errors(error), "invalid_spend") from None
