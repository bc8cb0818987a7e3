"""The container files say what docs/deploy.md promises: checked by parsing them (always), and by
``docker compose config`` when a Docker client with the compose plugin is installed."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from custody.settings import Settings
from tests.deploy.files import (
    COMPOSE,
    DOCKERIGNORE,
    REPO,
    MissingVariable,
    custody_services,
    dockerfile_stages,
    image_dirs,
    image_environment,
    image_healthcheck,
    interpolate,
    load_compose,
    runtime_stage,
    service_argv,
    service_healthcheck,
    service_secrets,
    service_user,
    service_volumes,
)

OPERATOR_VARIABLES = ("CUSTODY_DB_PASSWORD", "CUSTODY_REDIS_PASSWORD")


def _operator_values() -> dict[str, str]:
    return {name: secrets.token_hex(16) for name in OPERATOR_VARIABLES}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(_operator_values())


# The image ----------------------------------------------------------------------------


def test_the_image_is_built_in_stages_and_runs_on_python_slim_without_build_tools() -> None:
    _, stages = dockerfile_stages()
    assert len(stages) >= 2
    runtime = stages[-1]
    assert runtime.base == "python:3.11-slim"
    copies = runtime.all("COPY")
    assert copies
    assert all(c.startswith("--from=") for c in copies), "the runtime copies only built artefacts"
    runs = " ".join(runtime.all("RUN"))
    for tool in ("apt-get", "apk", "gcc", "build-essential", "pip install"):
        assert tool not in runs
    builder = " ".join(" ".join(stage.all("RUN")) for stage in stages[:-1])
    assert '.[server]"' in builder
    assert re.search(r"pip uninstall --yes pip setuptools", builder), "the venv must not carry an installer"


def test_the_image_runs_as_a_fixed_unprivileged_user() -> None:
    runtime = runtime_stage()
    user = runtime.last("USER")
    assert user is not None
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert gid.isdigit()
    assert min(int(uid), int(gid)) >= 1000
    runs = " ".join(runtime.all("RUN"))
    assert f"--uid {uid} --gid {gid}" in runs, "the user is created with the uid the image runs as"


def test_the_image_runs_custody_and_by_default_only_the_api_in_production_mode() -> None:
    runtime = runtime_stage()
    assert json.loads(runtime.last("ENTRYPOINT") or "null") == ["custody"]
    assert json.loads(runtime.last("CMD") or "null") == ["serve", "--no-signer"]
    env = image_environment(runtime)
    assert env["CUSTODY_MODE"] == "production"
    assert not any(key.startswith("CUSTODY_KEK") for key in env), "the image carries no KEK setting"


def test_the_image_health_check_asks_the_api_for_healthz_on_its_own_port() -> None:
    runtime = runtime_stage()
    check = image_healthcheck(runtime)
    assert check.argv[0] == "python"
    assert "/healthz" in check.argv[-1]
    assert "CUSTODY_PORT" in check.argv[-1]
    assert {"interval", "timeout", "start-period", "retries"} <= set(check.options)
    assert image_environment(runtime)["CUSTODY_PORT"] in (runtime.last("EXPOSE") or "").split()


def test_the_build_context_keeps_out_everything_but_the_package_sources() -> None:
    rules = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "exclude everything, then re-include what the build needs"
    included = {rule[1:] for rule in rules if rule.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "custody", "policies"}
    for cache in ("**/__pycache__", "**/.pytest_cache", "**/.mypy_cache"):
        assert cache in rules
    copied = " ".join(stage_copy for stage in dockerfile_stages()[1] for stage_copy in stage.all("COPY"))
    for path in included:
        assert path in copied, f"{path} is in the context but not used"


# The compose file ---------------------------------------------------------------------


def _mounts(service: dict[str, Any], volume: str) -> bool:
    return volume in {m.source for m in service_volumes(service)}


def test_compose_has_the_database_redis_migrations_signer_and_api(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "redis", "migrate", "signer", "api"}
    assert set(custody_services(compose)) == {"migrate", "signer", "api"}
    stage = runtime_stage()
    argv = {name: service_argv(svc, stage) for name, svc in custody_services(compose).items()}
    assert argv == {
        "migrate": ["custody", "db", "upgrade"],
        "signer": ["custody", "signer", "run"],
        "api": ["custody", "serve", "--no-signer"],
    }


def test_every_custody_service_runs_in_production_mode_as_a_non_root_user(compose: dict[str, Any]) -> None:
    for name, service in custody_services(compose).items():
        assert service["environment"]["CUSTODY_MODE"] == "production", name
        uid, gid = service_user(service)
        assert min(uid, gid) >= 1000, name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name


def test_the_signer_has_no_network_and_only_it_sees_the_key_volume_and_the_kek(compose: dict[str, Any]) -> None:
    services = compose["services"]
    signer = services["signer"]
    assert signer["network_mode"] == "none"
    assert not {"networks", "ports", "expose"} & set(signer)
    key_volume = next(m for m in service_volumes(signer) if m.target == signer["environment"]["CUSTODY_DATA_DIR"])
    assert not key_volume.read_only
    for name, service in services.items():
        if name == "signer":
            continue
        assert key_volume.source not in {m.source for m in service_volumes(service)}, name
        assert "secrets" not in service, name
        assert not any(key.startswith("CUSTODY_KEK") for key in service.get("environment", {})), name
    assert service_secrets(signer) == {"custody_kek": signer["environment"]["CUSTODY_KEK_SECRET_FILE"]}
    assert signer["environment"]["CUSTODY_KEK_SOURCE"] == "secret"


def test_the_api_reaches_the_signer_only_through_the_socket_volume_with_a_shared_group(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    signer, api = services["signer"], services["api"]
    socket = Path(signer["environment"]["CUSTODY_SIGNER_SOCKET"])
    assert api["environment"]["CUSTODY_SIGNER_SOCKET"] == str(socket)
    signer_mount = next(m for m in service_volumes(signer) if m.target == str(socket.parent))
    api_mount = next(m for m in service_volumes(api) if m.target == str(socket.parent))
    assert signer_mount.source == api_mount.source
    assert not signer_mount.read_only
    assert api_mount.read_only
    sharing = [name for name, svc in services.items() if _mounts(svc, signer_mount.source)]
    assert sharing == ["signer", "api"]
    assert int(signer["environment"]["CUSTODY_SIGNER_SOCKET_MODE"], 8) == 0o660
    (signer_uid, signer_gid), (api_uid, api_gid) = service_user(signer), service_user(api)
    assert signer_uid != api_uid, "the API cannot act as the signer's user"
    assert signer_gid == api_gid, "the socket's group is the API's group"
    # A new named volume takes the owner and mode of the image directory it is mounted on.
    dirs = image_dirs(runtime_stage())
    socket_dir = dirs[str(socket.parent)]
    assert (socket_dir.uid, socket_dir.gid, socket_dir.mode) == (signer_uid, signer_gid, 0o750)
    data_dir = dirs[signer["environment"]["CUSTODY_DATA_DIR"]]
    assert (data_dir.uid, data_dir.gid, data_dir.mode) == (signer_uid, signer_gid, 0o700)


def test_the_api_scales_without_host_port_conflicts(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert "container_name" not in api, "a fixed container name stops --scale"
    for spec in api["ports"]:
        *host, container = spec.split(":")
        assert container == "8700"
        published = host[-1] if host else ""
        assert published == "" or "-" in published, f"{spec}: a fixed host port allows one replica only"
    for name in ("postgres", "redis", "signer", "migrate"):
        assert "ports" not in compose["services"][name], name


def test_the_api_waits_for_the_migrations_and_a_healthy_signer(compose: dict[str, Any]) -> None:
    services = compose["services"]
    depends = services["api"]["depends_on"]
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert depends["signer"]["condition"] == "service_healthy"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert service_healthcheck(services["migrate"], runtime_stage()) is None, "a one-shot has no health"
    assert service_healthcheck(services["signer"], runtime_stage()) == ["custody", "signer", "status", "--json"]
    assert service_healthcheck(services["api"], runtime_stage()) == image_healthcheck(runtime_stage()).argv
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"], name


def test_the_database_and_redis_are_on_an_internal_network_only(compose: dict[str, Any]) -> None:
    assert compose["networks"]["backend"]["internal"] is True
    for name in ("postgres", "redis", "migrate"):
        assert compose["services"][name]["networks"] == ["backend"], name
    assert set(compose["services"]["api"]["networks"]) == {"backend", "frontend"}


def test_compose_holds_no_secret_and_refuses_to_start_without_the_operators_secrets() -> None:
    text = COMPOSE.read_text()
    raw = load_compose()
    for variable in OPERATOR_VARIABLES:
        uses = re.findall(r"\$\{" + variable + r"([^}]*)\}", text)
        assert uses
        assert all(use.startswith(":?") for use in uses), f"{variable} must be required (${{VAR:?…}})"
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|AUTH", key) and not key.endswith("_FILE"):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}.{key} holds a literal secret"
            for password in re.findall(r"://[^:/@]*:([^@]+)@", str(value)):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", password), f"{name}.{key} holds a literal password"
    assert all("file" in spec and "${" not in spec["file"] for spec in raw["secrets"].values())
    with pytest.raises(MissingVariable, match="CUSTODY_DB_PASSWORD"):
        interpolate(json.dumps(raw), {"CUSTODY_REDIS_PASSWORD": "x" * 32})
    with pytest.raises(MissingVariable, match="CUSTODY_REDIS_PASSWORD"):
        interpolate(json.dumps(raw), {"CUSTODY_DB_PASSWORD": "x" * 32})


def test_every_declared_volume_and_secret_is_used(compose: dict[str, Any]) -> None:
    used_volumes = {m.source for svc in compose["services"].values() for m in service_volumes(svc)}
    assert used_volumes == set(compose["volumes"])
    used_secrets = {name for svc in compose["services"].values() for name in service_secrets(svc)}
    assert used_secrets == set(compose["secrets"])


def test_the_compose_settings_pass_the_production_checks(compose: dict[str, Any], tmp_path: Path) -> None:
    """Production mode accepts what compose gives each process (the KEK file stands in for the secret)."""
    services = compose["services"]
    base = image_environment(runtime_stage())
    kek = tmp_path / "kek"
    kek.write_text("v1:" + base64.b64encode(os.urandom(32)).decode() + "\n")

    def settings(service: str) -> Settings:
        env = base | services[service]["environment"]
        values = {k.removeprefix("CUSTODY_").lower(): v for k, v in env.items() if k.startswith("CUSTODY_")}
        if "kek_secret_file" in values:
            values["kek_secret_file"] = str(kek)
        return Settings(**values)

    assert settings("signer").production_problems("signer") == []
    assert settings("api").production_problems("api") == []
    assert settings("migrate").production_problems("api") == []


# docker compose config ----------------------------------------------------------------


def _compose_client() -> str | None:
    """Why the compose client cannot run here, or None when it can."""
    if shutil.which("docker") is None:
        return "the docker client is not installed"
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False, timeout=60)
    if probe.returncode != 0:
        output = (probe.stderr.strip() or probe.stdout.strip()).splitlines()
        return "the docker client has no compose plugin" + (f" ({output[0]})" if output else "")
    return None


def _compose_config(env_file: Path, variables: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODY_")} | variables
    return subprocess.run(
        ["docker", "compose", "--env-file", str(env_file), "-f", str(COMPOSE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
        cwd=REPO,
    )


@pytest.mark.docker
def test_docker_compose_config_accepts_the_file_and_refuses_it_without_secrets(tmp_path: Path) -> None:
    """Needs `docker compose` (the client only); run with `scripts/check --docker` where it exists."""
    reason = _compose_client()
    assert not reason, f"`docker compose config` cannot run here: {reason}"
    empty = tmp_path / "empty.env"
    empty.write_text("")
    values = _operator_values()
    accepted = _compose_config(empty, values)
    assert accepted.returncode == 0, accepted.stderr
    config = json.loads(accepted.stdout)
    assert config["services"]["signer"]["network_mode"] == "none"
    assert config["networks"]["backend"]["internal"] is True
    [port] = config["services"]["api"]["ports"]
    assert (port["target"], port["host_ip"], port["published"]) == (8700, "127.0.0.1", "8700-8709")
    assert values["CUSTODY_DB_PASSWORD"] in config["services"]["api"]["environment"]["CUSTODY_DATABASE_URL"]
    refused = _compose_config(empty, {})
    assert refused.returncode != 0
    assert "CUSTODY_DB_PASSWORD" in refused.stderr or "CUSTODY_REDIS_PASSWORD" in refused.stderr
    assert "docs/deploy.md" in refused.stderr
