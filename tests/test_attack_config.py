"""Broken configuration files stop every service with a message and exit 2, no traceback.

Each service is run as ``python -m maskmesh.cli SERVICE --config FILE``. The broker
port in every file is one nobody listens on, so a service that wrongly starts never
reaches any real broker; the time-out ends it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from maskmesh.settings import ServiceSettings, SettingsError, load_settings
from tests.conftest import free_port

SERVICES = ("capture", "inference", "notifier")


def _run(service: str, config: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maskmesh.cli", service, "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )


def _assert_refused(result: subprocess.CompletedProcess[str], *names: str, case: str = "") -> None:
    """Exit 2, no traceback, and every one of ``names`` in the message."""
    tail = (case, result.stderr[-2000:])
    assert result.returncode == 2, tail
    assert "Traceback" not in result.stderr, tail
    for name in names:
        assert name in result.stderr, (case, name, result.stderr)


def _broken_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    port = free_port()
    files = {
        "syntax": (b"district: demo\nbroker: {port: %d\n" % port, "config"),
        "list": (b"- district\n- demo\n", "mapping"),
        "not utf-8": (b"\xff\xfe district: demo\n", "UTF-8"),
        "scalar": (b"just words\n", "mapping"),
    }
    out = {}
    for name, (text, says) in files.items():
        path = tmp_path / f"{name.replace(' ', '-')}.yaml"
        path.write_bytes(text)
        out[name] = (path, says)
    return out


@pytest.mark.parametrize("service", SERVICES)
def test_a_malformed_yaml_file_exits_2_with_a_message(service: str, tmp_path: Path) -> None:
    for name, (path, says) in _broken_files(tmp_path).items():
        _assert_refused(_run(service, path, tmp_path), str(path), says, case=name)


def test_load_settings_names_the_file_of_a_malformed_yaml(tmp_path: Path) -> None:
    for path, says in _broken_files(tmp_path).values():
        with pytest.raises(SettingsError, match=says):
            load_settings(ServiceSettings, path)


@pytest.mark.parametrize("service", SERVICES)
def test_an_unreadable_password_file_exits_2_naming_the_field(
    service: str, tmp_path: Path
) -> None:
    user = {"capture": "capture-cam1"}.get(service, service)
    config = tmp_path / "missing-password.yaml"
    config.write_text(
        "district: demo\n"
        f"broker: {{port: {free_port()}, username: {user}, "
        f"password_file: {tmp_path / 'nowhere' / 'pw'}}}\n",
        encoding="utf-8",
    )
    _assert_refused(_run(service, config, tmp_path), "broker.password_file")


@pytest.mark.parametrize("service", SERVICES)
def test_a_metrics_port_in_use_exits_2_naming_the_field(service: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = tmp_path / "metrics.yaml"
        config.write_text(
            f"district: demo\nmetrics_port: {taken.getsockname()[1]}\n"
            f"broker: {{port: {free_port()}}}\n",
            encoding="utf-8",
        )
        result = _run(service, config, tmp_path)
    _assert_refused(result, "metrics_port")
