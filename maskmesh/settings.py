"""Settings shared by every service, from environment variables and a YAML file.

Precedence, highest first: values passed in code (command-line flags), environment
variables (``MASKMESH_`` prefix, ``__`` between nested names, e.g.
``MASKMESH_BROKER__PORT=1884``), the YAML file named by ``MASKMESH_CONFIG`` or
``--config``, then defaults. ``load_settings`` validates once at start-up and turns
a validation failure into a ``SettingsError`` that names each bad field.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from maskmesh.ids import Identifier, check_identifier

REPO_ROOT = Path(__file__).resolve().parent.parent


class SettingsError(ValueError):
    """Settings failed validation; the message names every bad field."""


def read_secret(value: SecretStr | None, path: Path | None, what: str) -> str | None:
    """A secret given inline, or the first line of a file (Docker and Kubernetes secrets).

    what: the setting's name, for the error; the secret itself never appears in it.
    """
    if value is not None:
        return value.get_secret_value()
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError, UnicodeDecodeError) as exc:
        raise SettingsError(
            f"{what}: cannot read a secret from {path} ({exc.__class__.__name__})"
        ) from None


class TLSSettings(BaseModel):
    """TLS towards the broker: ca_file verifies it; cert_file/key_file for client auth."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure_skip_hostname_check: bool = False


class BrokerSettings(BaseModel):
    """Where and how a service connects to its district broker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    # A file whose first line is the password (Docker and Kubernetes secrets).
    password_file: Path | None = None
    tls: TLSSettings | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    # Session state the broker keeps for a persistent client while it is away.
    # Limitation: a notifier or inference worker away longer than this loses its session
    # and every violation or face the broker queued for it; raise it where a service may
    # stay down longer (docs/data-retention.md weighs it against keeping personal data).
    session_expiry_s: int = Field(default=3600, ge=0)
    reconnect_min_delay_s: float = Field(default=1.0, gt=0)
    reconnect_max_delay_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _one_password_source(self) -> BrokerSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        return self

    def resolved_password(self) -> str | None:
        """The password, read from password_file when one is given."""
        return read_secret(self.password, self.password_file, "broker.password_file")


def _default_instance() -> str:
    name = socket.gethostname().lower().split(".")[0]
    cleaned = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)[:40]
    try:
        return check_identifier(f"{cleaned or 'host'}-{os.getpid()}")
    except ValueError:
        return f"host-{os.getpid()}"


class ServiceSettings(BaseSettings):
    """Settings every service has; each service subclasses it with its own section."""

    model_config = SettingsConfigDict(
        env_prefix="MASKMESH_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    # Set by load_settings before construction; read by the YAML source.
    _yaml_file: ClassVar[Path | None] = None

    district: Identifier = "demo"
    instance: Identifier = Field(default_factory=_default_instance)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    # Port of the /metrics and /healthz HTTP endpoint; None turns it off.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    status_interval_s: float = Field(default=10.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = cls._yaml_file
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


S = TypeVar("S", bound=ServiceSettings)


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def load_settings(cls: type[S], config: Path | str | None = None, **overrides: Any) -> S:
    """Build and validate ``cls`` from code overrides, environment and a YAML file.

    config: a YAML file; defaults to the MASKMESH_CONFIG environment variable.
    overrides: values that win over everything else; None values are ignored.
    """
    path = config if config is not None else os.environ.get("MASKMESH_CONFIG")
    yaml_file = Path(path) if path else None
    if yaml_file is not None and not yaml_file.is_file():
        raise SettingsError(f"config file {yaml_file} does not exist")
    if yaml_file is not None:
        _check_yaml(yaml_file)
    given = {key: value for key, value in overrides.items() if value is not None}
    previous = cls._yaml_file
    cls._yaml_file = yaml_file
    try:
        settings = cls(**given)
    except ValidationError as exc:
        origin = f" (config {yaml_file})" if yaml_file else ""
        raise SettingsError(f"invalid {cls.__name__} settings{origin}:\n{_describe(exc)}") from None
    finally:
        cls._yaml_file = previous
    return settings


def _check_yaml(path: Path) -> None:
    """Refuse a config file that is not UTF-8 YAML holding a mapping, naming the file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"config file {path} cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise SettingsError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise SettingsError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is not None and not isinstance(data, dict):
        raise SettingsError(
            f"config file {path} must hold a mapping of settings, not a {type(data).__name__}"
        )


def threshold_arg(text: str) -> float:
    """An argparse type for ``--threshold``: a p_mask from 0 to 1, as the service takes it."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a p_mask from 0 to 1")
    return value
