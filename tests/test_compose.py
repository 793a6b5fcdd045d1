"""docker-compose.yml and broker/: valid, consistent with the code, and not stale.

Without a Docker engine (the usual case here) the file is checked statically: against
the Compose Specification schema, every command against ``maskmesh.cli.COMMANDS`` and
its argparse, every environment variable against the service's settings class. Where an
engine answers, the stack itself is brought up.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from maskmesh import brokerconf, cli
from maskmesh.settings import REPO_ROOT, ServiceSettings, load_settings

COMPOSE = REPO_ROOT / "docker-compose.yml"
BROKER_DIR = REPO_ROOT / "broker"
SETTINGS_CLASSES = {
    "capture": "services.capture.settings:CaptureSettings",
    "inference": "services.inference.settings:InferenceSettings",
    "notifier": "services.notifier.settings:NotifierSettings",
}
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _maskmesh_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
    }


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set: the default, as `docker compose` does."""
    return _VARIABLE.sub(lambda m: m.group(2) or "", value)


def _import(target: str) -> Any:
    module_name, _, name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            pytest.skip(f"{module_name} does not exist yet")
        raise
    return getattr(module, name)


class _Parsed(Exception):
    def __init__(self, extras: list[str]) -> None:
        super().__init__(extras)
        self.extras = extras


def check_entry_point(command: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``command`` is ``maskmesh SUB [FLAGS...]`` with SUB in COMMANDS and FLAGS accepted."""
    assert command[0] == "maskmesh"
    assert command[1] in cli.COMMANDS, f"{command[1]} is not a maskmesh command"
    entry = _import(cli.COMMANDS[command[1]][0])

    def parse_only(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        # Stops the entry point right after its argument parsing; argparse errors
        # (an unknown choice, a missing value) still exit 2 as they would for real.
        _, extras = self.parse_known_args(args, namespace)
        raise _Parsed(extras)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    with pytest.raises(_Parsed) as parsed:
        entry(list(command[2:]))
    assert parsed.value.extras == [], f"{command[:2]}: flags not accepted: {parsed.value.extras}"


def test_compose_file_matches_the_compose_specification(
    shared: Path, compose: dict[str, Any]
) -> None:
    schema = json.loads((shared / "schemas" / "compose-spec.json").read_text(encoding="utf-8"))
    resource = Resource.from_contents(schema, default_specification=DRAFT7)
    registry: Registry[Any] = Registry().with_resource(schema["$id"], resource)
    validator = Draft7Validator({"$ref": schema["$id"]}, registry=registry)
    errors = list(validator.iter_errors(compose))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message[:200]}" for e in errors)

    broken = {"services": {"x": {"image": "y", "restart": ["always"]}}}
    assert list(validator.iter_errors(broken)), "the schema check does not look deep"


def test_stack_has_every_role(compose: dict[str, Any]) -> None:
    names = set(compose["services"])
    assert {"broker", "capture-cam1", "capture-cam2", "inference-1", "inference-2"} <= names
    assert {"notifier", "mailsink"} <= names
    assert compose["services"]["broker"]["image"] == "eclipse-mosquitto:2"
    assert compose["services"]["mailsink"]["profiles"] == ["demo"]
    assert "demo" not in compose["services"]["notifier"].get("profiles", [])


def test_every_service_restarts_and_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service.get("restart") == "unless-stopped", name
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_maskmesh_services_probe_healthz_on_their_metrics_port(compose: dict[str, Any]) -> None:
    for name, service in _maskmesh_services(compose).items():
        if service["command"][1] == "mailsink":
            continue
        port = service["environment"]["MASKMESH_METRICS_PORT"]
        assert f"127.0.0.1:{port}/healthz" in " ".join(service["healthcheck"]["test"]), name
        assert service["environment"]["MASKMESH_METRICS_HOST"] == "0.0.0.0"


@pytest.mark.parametrize(
    "service_name",
    ["capture-cam1", "capture-cam2", "inference-1", "inference-2", "notifier", "mailsink"],
)
def test_command_is_a_real_entry_point_with_real_flags(
    compose: dict[str, Any], service_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_entry_point(compose["services"][service_name]["command"], monkeypatch)


@pytest.mark.parametrize(
    "service_name", ["capture-cam1", "capture-cam2", "inference-1", "inference-2", "notifier"]
)
def test_environment_is_valid_settings(
    compose: dict[str, Any], service_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = compose["services"][service_name]
    settings_cls = _import(SETTINGS_CLASSES[service["command"][1]])
    assert issubclass(settings_cls, ServiceSettings)
    for key in list(os.environ):
        if key.startswith("MASKMESH_"):
            monkeypatch.delenv(key)
    for key, value in service["environment"].items():
        monkeypatch.setenv(key, _interpolate(str(value)))
    settings = load_settings(settings_cls)
    assert settings.district == "demo"
    assert settings.broker.host == "broker"
    assert settings.metrics_port == 9100
    user = service["environment"]["MASKMESH_BROKER__USERNAME"]
    assert settings.broker.password_file == Path(f"/run/secrets/broker-{user}")
    assert f"broker-{user}" in service["secrets"]


def test_inference_workers_have_distinct_stable_ids(compose: dict[str, Any]) -> None:
    workers = [s for n, s in compose["services"].items() if n.startswith("inference-")]
    ids = [s["command"][s["command"].index("--worker-id") + 1] for s in workers]
    instances = [s["environment"]["MASKMESH_INSTANCE"] for s in workers]
    assert len(set(ids)) == len(ids) == 2
    assert ids == instances
    assert all("deploy" not in s for s in workers), "replicas would share one worker id"


def test_secrets_are_defined_and_are_what_maskmesh_broker_writes(compose: dict[str, Any]) -> None:
    defined = compose["secrets"]
    for name, service in compose["services"].items():
        for secret in service.get("secrets", []):
            assert secret in defined, f"{name} uses undefined secret {secret}"
    plan = brokerconf.BrokerPlan(district="demo", cameras=("cam1", "cam2"))
    written = {f"broker-{user}" for user in brokerconf.users(plan)}
    written.add(brokerconf.PASSWD_SECRET)
    for name, secret in defined.items():
        assert secret["file"] == f"./deploy/secrets/{name}"
        assert name in written or name == "smtp-password", name


def test_volumes_persist_broker_spools_and_outbox(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "broker-data:/mosquitto/data" in services["broker"]["volumes"]
    assert "notifier-outbox:/var/lib/maskmesh/outbox" in services["notifier"]["volumes"]
    outbox = services["notifier"]["command"][services["notifier"]["command"].index("--outbox") + 1]
    assert outbox.startswith("/var/lib/maskmesh/outbox/")
    for camera in ("cam1", "cam2"):
        assert (
            f"capture-{camera}-spool:/var/lib/maskmesh/spool"
            in (services[f"capture-{camera}"]["volumes"])
        )
    for volume in compose["volumes"]:
        assert any(
            str(v).startswith(f"{volume}:") for s in services.values() for v in s.get("volumes", [])
        ), f"volume {volume} is not used"


def _documented_broker_command() -> list[str]:
    text = (BROKER_DIR / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- generate -->", 1)[1].split("<!-- /generate -->", 1)[0]
    line = next(line for line in block.splitlines() if line.startswith("maskmesh broker"))
    return shlex.split(line)[2:]


def _redirect(args: list[str], flag: str, value: Path) -> list[str]:
    index = args.index(flag)
    return args[: index + 1] + [str(value)] + args[index + 2 :]


def test_committed_broker_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    args = _documented_broker_command()
    args = _redirect(args, "--out", tmp_path / "broker")
    args = _redirect(args, "--secrets-dir", tmp_path / "secrets")
    assert brokerconf.main(args) == 0
    for name in ("mosquitto.conf", "acl"):
        committed = (BROKER_DIR / name).read_text(encoding="utf-8")
        assert committed == (tmp_path / "broker" / name).read_text(encoding="utf-8"), (
            f"broker/{name} is stale: rerun the command in broker/README.md"
        )
    assert not (BROKER_DIR / "passwd").exists() or _ignored(BROKER_DIR / "passwd")


def _ignored(path: Path) -> bool:
    if shutil.which("git") is None:
        return True
    result = subprocess.run(
        ["git", "check-ignore", "-q", str(path)], cwd=REPO_ROOT, capture_output=True
    )
    return result.returncode == 0


def test_committed_broker_config_points_inside_the_container(compose: dict[str, Any]) -> None:
    conf = (BROKER_DIR / "mosquitto.conf").read_text(encoding="utf-8")
    mounts = {v.split(":")[1] for v in compose["services"]["broker"]["volumes"]}
    assert "password_file /run/secrets/mosquitto-passwd" in conf
    assert "mosquitto-passwd" in compose["services"]["broker"]["secrets"]
    assert "acl_file /mosquitto/config/acl" in conf and "/mosquitto/config/acl" in mounts
    assert "persistence_location /mosquitto/data/" in conf and "/mosquitto/data" in mounts


def test_stack_runs_on_a_docker_engine(tmp_path: Path) -> None:
    """Brings the demo stack up where an engine answers and waits for every health check."""
    docker = pytest.importorskip("docker")
    try:
        docker.from_env().ping()
    except Exception as exc:  # the SDK raises several kinds when no engine answers
        pytest.skip(f"no Docker engine answers ({exc.__class__.__name__})")
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI (with compose) is not installed")
    secrets = REPO_ROOT / "deploy" / "secrets"
    args = _redirect(_documented_broker_command(), "--out", tmp_path / "broker")
    brokerconf.main(_redirect(args, "--secrets-dir", secrets))
    smtp = secrets / "smtp-password"
    if not smtp.exists():
        smtp.write_text("unused\n", encoding="utf-8")
        smtp.chmod(0o644)
    project = ["docker", "compose", "-f", str(COMPOSE), "-p", "maskmesh-test", "--profile", "demo"]
    try:
        subprocess.run([*project, "up", "-d", "--build", "--wait"], check=True, timeout=900)
        client = docker.from_env()
        containers = client.containers.list(
            filters={"label": "com.docker.compose.project=maskmesh-test"}
        )
        states = {c.name: c.attrs["State"].get("Health", {}).get("Status") for c in containers}
        assert states and all(state == "healthy" for state in states.values()), states
    finally:
        subprocess.run([*project, "down", "-v"], check=False, timeout=300)


def test_rerunning_the_generator_keeps_the_passwords(tmp_path: Path) -> None:
    args = _redirect(_documented_broker_command(), "--out", tmp_path / "broker")
    args = _redirect(args, "--secrets-dir", tmp_path / "secrets")
    assert brokerconf.main(args) == 0
    first = brokerconf.read_secrets(tmp_path / "secrets")
    (tmp_path / "secrets" / "broker-inference").unlink()  # rotate this one only
    assert brokerconf.main(args) == 0
    second = brokerconf.read_secrets(tmp_path / "secrets")
    assert second.keys() == first.keys()
    assert second["inference"] != first["inference"]
    assert {k: v for k, v in second.items() if k != "inference"} == {
        k: v for k, v in first.items() if k != "inference"
    }
    assert (tmp_path / "secrets").stat().st_mode & 0o777 == 0o700
    hashes = (tmp_path / "secrets" / brokerconf.PASSWD_SECRET).read_text(encoding="utf-8")
    assert hashes == (tmp_path / "broker" / "passwd").read_text(encoding="utf-8")
