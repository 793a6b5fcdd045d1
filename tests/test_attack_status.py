"""``maskmesh status`` with odd arguments or settings: a message and status 2.

Every case is refused before any connection; the broker port named is one nobody
listens on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port


def _status(tmp_path: Path, *argv: str, broker: str = "") -> subprocess.CompletedProcess[str]:
    config = tmp_path / "status.yaml"
    config.write_text(
        f"district: demo\nbroker: {{port: {free_port()}{broker}}}\n", encoding="utf-8"
    )
    return subprocess.run(
        [sys.executable, "-m", "maskmesh.cli", "status", "--config", str(config), *argv],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )


@pytest.mark.parametrize(
    "argv", [("--wait-s", "-1"), ("--wait-s", "nan"), ("--watch", "0"), ("--watch", "-5"),
             ("--watch", "inf")]
)
def test_bad_times_are_refused_by_name(argv: tuple[str, str], tmp_path: Path) -> None:
    result = _status(tmp_path, *argv)
    assert result.returncode == 2, result.stderr
    assert argv[0] in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_an_unreadable_password_file_is_a_settings_error(tmp_path: Path) -> None:
    result = _status(
        tmp_path, broker=f", username: operator, password_file: {tmp_path / 'none'}"
    )
    assert result.returncode == 2, result.stderr
    assert "broker.password_file" in result.stderr and "Traceback" not in result.stderr
