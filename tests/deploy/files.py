"""Reading docker/Dockerfile, docker/compose.yaml and .dockerignore the way Docker reads them.

Only what the deployment tests need: the Dockerfile's stages and instructions (with line
continuations), compose's variable interpolation (``${VAR}``, ``${VAR:-default}``,
``${VAR:?message}``, ``$$``), and each custody service's command, user, environment, volumes
and secrets.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERIGNORE = REPO / ".dockerignore"

_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is not set: compose refuses the file."""


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's interpolation rules, enough for this project's file."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        value = variables.get(name)
        operator, argument = match.group(2), match.group(3)
        if operator in (":?", "?"):
            if value is None or (operator == ":?" and value == ""):
                raise MissingVariable(f"{name}: {argument}")
            return value
        if operator in (":-", "-"):
            if value is None or (operator == ":-" and value == ""):
                return argument
            return value
        return value or ""

    return _VARIABLE.sub(replace, text)


def interpolate_tree(node: Any, variables: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [interpolate_tree(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, variables) for key, value in node.items()}
    return node


def load_compose(variables: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file as YAML (anchors and merge keys resolved), interpolated if variables are given."""
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data if variables is None else dict(interpolate_tree(data, variables))


# Dockerfile -------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def dockerfile_instructions(text: str | None = None) -> list[Instruction]:
    text = DOCKERFILE.read_text() if text is None else text
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    if current.strip():
        logical.append(current)
    instructions = []
    for line in logical:
        keyword, _, arguments = line.strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_stages(text: str | None = None) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the stages, with ``${ARG}`` in FROM resolved."""
    arguments: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in dockerfile_instructions(text):
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            base = interpolate(words[0], arguments)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            if instruction.keyword == "ARG":
                key, _, default = instruction.arguments.partition("=")
                arguments[key] = default
        else:
            stages[-1].instructions.append(instruction)
    return arguments, stages


def exec_form(arguments: str) -> list[str]:
    """An instruction's JSON (exec) form; shell form is refused so signals reach the process."""
    value = json.loads(arguments)
    assert isinstance(value, list), arguments
    assert all(isinstance(v, str) for v in value), arguments
    return value


def env_pairs(arguments: str) -> dict[str, str]:
    pairs = {}
    for word in shlex.split(arguments):
        key, sep, value = word.partition("=")
        assert sep, f"ENV in the old `ENV key value` form: {arguments}"
        pairs[key] = value
    return pairs


def image_environment(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in stage.all("ENV"):
        env.update(env_pairs(arguments))
    return env


@dataclass(frozen=True)
class ImageDir:
    path: str
    uid: int
    gid: int
    mode: int


def image_dirs(stage: Stage) -> dict[str, ImageDir]:
    """Directories the image creates with ``install -d -o UID -g GID -m MODE PATH``."""
    found = {}
    for arguments in stage.all("RUN"):
        for match in re.finditer(r"install -d -o (\d+) -g (\d+) -m ([0-7]{3,4}) (/\S+)", arguments):
            uid, gid, mode, path = match.groups()
            found[path] = ImageDir(path, int(uid), int(gid), int(mode, 8))
    return found


@dataclass(frozen=True)
class Healthcheck:
    argv: list[str]
    options: dict[str, str]


def image_healthcheck(stage: Stage) -> Healthcheck:
    arguments = stage.last("HEALTHCHECK")
    assert arguments is not None, "the runtime image has no HEALTHCHECK"
    head, _, command = arguments.partition("CMD ")
    options = dict(option.removeprefix("--").split("=", 1) for option in head.split())
    return Healthcheck(exec_form(command), options)


def runtime_stage() -> Stage:
    return dockerfile_stages()[1][-1]


# Compose services ---------------------------------------------------------------------


def custody_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run this project's image (the others are PostgreSQL and Redis)."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def service_argv(service: dict[str, Any], stage: Stage) -> list[str]:
    """What the container runs: the service's entrypoint/command, else the image's."""
    entrypoint = service.get("entrypoint") or exec_form(stage.last("ENTRYPOINT") or "[]")
    command = service.get("command") or exec_form(stage.last("CMD") or "[]")
    assert isinstance(entrypoint, list), "use the exec (list) form"
    assert isinstance(command, list), "use the exec (list) form"
    return [*entrypoint, *command]


def service_healthcheck(service: dict[str, Any], stage: Stage) -> list[str] | None:
    """The health check command a container of this service runs, or None when it is off."""
    healthcheck = service.get("healthcheck")
    if healthcheck is None:
        return image_healthcheck(stage).argv
    if healthcheck.get("disable"):
        return None
    test = healthcheck["test"]
    assert isinstance(test, list), "use the exec form: [CMD, ...]"
    assert test[0] == "CMD", "use the exec form: [CMD, ...]"
    return list(test[1:])


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


def service_volumes(service: dict[str, Any]) -> list[Mount]:
    mounts = []
    for spec in service.get("volumes", []):
        assert isinstance(spec, str), "use the short volume syntax: NAME:PATH[:ro]"
        source, target, *options = spec.split(":")
        mounts.append(Mount(source, target, "ro" in options))
    return mounts


def service_secrets(service: dict[str, Any]) -> dict[str, str]:
    """Secret name -> path in the container (compose mounts them under /run/secrets)."""
    secrets = {}
    for item in service.get("secrets", []):
        if isinstance(item, str):
            secrets[item] = f"/run/secrets/{item}"
        else:
            secrets[item["source"]] = item.get("target") or f"/run/secrets/{item['source']}"
    return secrets


def service_user(service: dict[str, Any]) -> tuple[int, int]:
    uid, _, gid = str(service["user"]).partition(":")
    return int(uid), int(gid)
