"""A district on loopback for the benchmarks: broker, services as processes, a monitor.

Each service runs as its own ``maskmesh ...`` process with its own broker user, as
``maskmesh up`` runs them, so that its memory and CPU time can be read from /proc.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml

from maskmesh import topics
from maskmesh.brokerconf import BrokerFiles, BrokerPlan, capture_user, render
from maskmesh.bus import Bus
from maskmesh.messages import MessageError, ServiceStatus, decode
from maskmesh.settings import BrokerSettings, ServiceSettings

logger = logging.getLogger(__name__)

DISTRICT = "bench"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class StackError(RuntimeError):
    """The benchmark district could not be started."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cameras(count: int) -> tuple[str, ...]:
    return tuple(f"cam{i}" for i in range(1, count + 1))


def proc_status_kb(pid: int, key: str) -> int | None:
    """A ``VmHWM``/``VmRSS`` line of /proc/<pid>/status in kB, None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Process:
    """A child process with its peak RSS (VmHWM) kept from the last look."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    peak_kb: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def sample(self) -> int:
        # Limitation: read when asked (after each phase, before stopping); VmHWM itself is
        # the kernel's exact high-water mark, but one reached while stopping is missed.
        value = proc_status_kb(self.pid, "VmHWM")
        if value is not None:
            self.peak_kb = max(self.peak_kb, value)
        return self.peak_kb

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid) or 0.0

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """Sample the peak RSS, then SIGTERM, wait, and SIGKILL if need be."""
        if self.popen.poll() is not None:
            return self.popen.returncode
        self.sample()
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %g s; killing it", self.name, timeout_s)
            self.popen.kill()
            return self.popen.wait()

    def wait(self, timeout_s: float) -> int | None:
        """Wait for a process that ends by itself, sampling its peak RSS meanwhile.

        VmHWM is read every 0.1 s while it runs; the kernel's own maximum at exit
        (``ru_maxrss``) is no use here, because Linux carries the forking parent's
        high-water mark across ``exec``.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sample()
            if self.popen.poll() is not None:
                return self.popen.returncode
            time.sleep(0.1)
        return None

    def memory(self) -> dict[str, Any]:
        self.sample()
        return {"peak_rss_mb": round(self.peak_kb / 1024, 1)}


@dataclass
class StatusBoard:
    """The latest retained status of every service instance."""

    statuses: dict[tuple[str, str], ServiceStatus] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_status(self, msg: mqtt.MQTTMessage) -> None:
        try:
            status = decode(ServiceStatus, bytes(msg.payload))
        except MessageError:
            return
        with self.lock:
            self.statuses[(status.service, status.instance)] = status

    def total(self, service: str, counter: str) -> int:
        with self.lock:
            return sum(s.counters.get(counter, 0) for (name, _), s in self.statuses.items()
                       if name == service)


class Stack:
    """Broker, optional mail sink and notifier, inference workers; all on loopback.

    run_dir: configs, logs, spools and the broker's data.
    camera_count: cameras the broker's ACL knows (cam1..camN).
    """

    def __init__(self, run_dir: Path, camera_count: int = 16) -> None:
        self.run_dir = run_dir
        self.cameras = cameras(camera_count)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.files: BrokerFiles | None = None
        self.port = 0
        self.broker: Process | None = None
        self.processes: dict[str, Process] = {}
        self.board = StatusBoard()
        self.monitor: Bus | None = None

    # -- broker -----------------------------------------------------------------------

    def start_broker(self) -> None:
        mosquitto = shutil.which("mosquitto")
        if mosquitto is None:
            raise StackError("mosquitto is not installed (apt-get install mosquitto)")
        self.port = free_port()
        plan = BrokerPlan(district=DISTRICT, cameras=self.cameras, port=self.port,
                          data_dir=self.run_dir / "broker", log_file=None, auditor=True,
                          run_as=getpass.getuser())
        self.files = render(plan, self.run_dir / "broker")
        log = self.run_dir / "logs" / "mosquitto.log"
        with log.open("wb") as out:
            popen = subprocess.Popen([mosquitto, "-c", str(self.files.conf)],
                                     stdout=out, stderr=subprocess.STDOUT)
        self.broker = Process("broker", popen, log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                raise StackError(f"mosquitto exited with {popen.returncode}; see {log}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            time.sleep(0.05)
        else:
            raise StackError(f"mosquitto did not listen on 127.0.0.1:{self.port}")
        self._start_monitor()

    def password(self, user: str) -> str:
        assert self.files is not None
        return self.files.passwords[user]

    def broker_settings(self, user: str) -> dict[str, Any]:
        secret = self.run_dir / "secrets" / user
        secret.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self.password(user) + "\n")
        return {"host": "127.0.0.1", "port": self.port, "username": user,
                "password_file": str(secret), "reconnect_min_delay_s": 0.2,
                "reconnect_max_delay_s": 2.0}

    def _start_monitor(self) -> None:
        settings = ServiceSettings(district=DISTRICT, instance="bench",
                                   broker=BrokerSettings(**self.broker_settings("operator")))
        self.monitor = Bus(settings, "bench", announce=False)
        self.monitor.subscribe(topics.all_status(DISTRICT), self.board.on_status)
        if not self.monitor.start(wait_s=10):
            raise StackError("the benchmark monitor could not connect to its broker")

    # -- services ---------------------------------------------------------------------

    def write_config(self, name: str, user: str, section: dict[str, Any]) -> Path:
        config = {"district": DISTRICT, "broker": self.broker_settings(user),
                  "status_interval_s": 1.0, "log_level": "WARNING", **section}
        path = self.run_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        log = self.run_dir / "logs" / f"{name}.log"
        command = [sys.executable, "-m", "maskmesh.cli", *argv]
        base = {k: v for k, v in os.environ.items() if not k.startswith("MASKMESH_")}
        with log.open("wb") as out:
            popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                     env={**base, **(env or {})}, cwd=self.run_dir)
        process = Process(name, popen, log)
        self.processes[name] = process
        return process

    def start_workers(self, count: int, model: Path, threads: int | None = None,
                      max_wait_ms: float | None = None,
                      env: dict[str, str] | None = None) -> list[Process]:
        workers = []
        for n in range(1, count + 1):
            section: dict[str, Any] = {"model_path": str(model.resolve()), "worker_id": f"w{n}"}
            if threads is not None:
                section["intra_op_threads"] = threads
            if max_wait_ms is not None:
                section["max_wait_ms"] = max_wait_ms
            config = self.write_config(f"inference-{n}", "inference",
                                       {"instance": f"w{n}", "inference": section})
            workers.append(self.spawn(f"inference-{n}", ["inference", "--config", str(config)],
                                      env=env))
        self.wait_online("inference", count)
        return workers

    def start_notifier(self) -> Process:
        mail_dir = self.run_dir / "mail"
        smtp_port = free_port()
        self.spawn("mailsink", ["mailsink", "--dir", str(mail_dir), "--port", str(smtp_port),
                                "--log-level", "WARNING"])
        notifier = {"smtp": {"host": "127.0.0.1", "port": smtp_port},
                    "outbox_path": str(self.run_dir / "outbox.sqlite3"),
                    "digest_interval_s": 5.0}
        config = self.write_config("notifier", "notifier",
                                   {"instance": "n1", "notifier": notifier})
        process = self.spawn("notifier", ["notifier", "--config", str(config)])
        self.wait_online("notifier", 1)
        return process

    def capture_config(self, camera: str, section: dict[str, Any]) -> Path:
        section = {"camera": camera, "spool_dir": str(self.run_dir / "spool"), **section}
        return self.write_config(f"capture-{camera}", capture_user(camera),
                                 {"instance": camera, "capture": section})

    def wait_online(self, service: str, count: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.board.lock:
                online = [s for (name, _), s in self.board.statuses.items()
                          if name == service and s.state == "online"]
            if len(online) >= count:
                return
            for process in self.processes.values():
                if not process.alive():
                    raise StackError(f"{process.name} exited with {process.popen.returncode}; "
                                     f"see {process.log}")
            time.sleep(0.1)
        raise StackError(f"{count} {service} instance(s) not online within {timeout_s} s")

    def sample(self) -> None:
        for process in self.all_processes():
            process.sample()

    def all_processes(self) -> list[Process]:
        return ([self.broker] if self.broker else []) + list(self.processes.values())

    def cpu_s(self) -> dict[str, float]:
        return {p.name: p.cpu_s() for p in self.all_processes()}

    def memory(self) -> dict[str, Any]:
        return {p.name: p.memory() for p in self.all_processes()}

    def stop_process(self, name: str) -> None:
        process = self.processes.get(name)
        if process is not None:
            process.stop()

    def close(self) -> dict[str, Any]:
        """Stop services (capture, inference, notifier), then the broker; peak RSS of each."""
        order = sorted(self.processes.values(),
                       key=lambda p: (not p.name.startswith("capture"),
                                      not p.name.startswith("inference"),
                                      p.name == "mailsink"))
        for process in order:
            process.stop()
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self.broker is not None:
            self.broker.stop()
        return self.memory()
