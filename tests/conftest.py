"""Shared fixtures: a real Mosquitto broker with the project's config, shared data paths."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import services  # noqa: F401  (ONNX Runtime telemetry off before any test loads it)
from maskmesh.brokerconf import BrokerFiles, BrokerPlan, render
from maskmesh.settings import REPO_ROOT, BrokerSettings

SHARED = Path(os.environ.get("MASKMESH_SHARED", REPO_ROOT.parent / "shared"))
CAMERAS = ("cam1", "cam2", "cam3")
DISTRICT = "testdistrict"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


@dataclass
class Broker:
    """A mosquitto process started from the project's generated configuration."""

    plan: BrokerPlan
    files: BrokerFiles
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / "mosquitto.log"

    @property
    def port(self) -> int:
        return self.plan.port

    @property
    def district(self) -> str:
        return self.plan.district

    def settings(self, user: str) -> BrokerSettings:
        """Broker settings to connect as one of the generated users."""
        return BrokerSettings(
            host="127.0.0.1",
            port=self.port,
            username=user,
            password=self.files.passwords[user],
            reconnect_min_delay_s=0.2,
            reconnect_max_delay_s=2.0,
        )

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["mosquitto", "-c", str(self.files.conf)], stdout=log, stderr=log
            )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


def make_broker(workdir: Path, cameras: tuple[str, ...] = CAMERAS) -> Broker:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    workdir.mkdir(parents=True, exist_ok=True)
    plan = BrokerPlan(
        district=DISTRICT,
        cameras=cameras,
        port=free_port(),
        data_dir=workdir,
        log_file=None,
        auditor=True,
        run_as=getpass.getuser(),
    )
    return Broker(plan, render(plan, workdir), workdir)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A running broker for one test; stopped afterwards."""
    instance = make_broker(tmp_path / "broker")
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def shared() -> Path:
    """The ../shared data folder, or a skip that says it is missing."""
    if not (SHARED / "datasets").is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set MASKMESH_SHARED)")
    return SHARED
