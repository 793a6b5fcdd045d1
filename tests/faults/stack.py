"""A whole district on loopback for fault tests: broker, mail sink, services, auditor.

``Stack`` starts the project's own Mosquitto configuration on a free port, a
``MailSink`` that files each mail as a ``.eml``, and ``maskmesh inference`` /
``maskmesh notifier`` / ``maskmesh capture`` as child processes with YAML configs written
the way ``maskmesh up`` writes them (one broker user each, the password in a file).
``Auditor`` records everything the district publishes, with a persistent session so that
it misses nothing across a broker restart; ``FacePublisher`` sends faces as camera
``cam1`` through the capture node's own on-disk spool, so a broker outage costs no face.
"""

from __future__ import annotations

import email
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from maskmesh import topics
from maskmesh.brokerconf import capture_user
from maskmesh.bus import Bus
from maskmesh.messages import (
    Box,
    DeadLetter,
    FaceCrop,
    MessageError,
    ServiceStatus,
    Verdict,
    Violation,
    decode,
    encode,
    new_face_id,
)
from maskmesh.settings import REPO_ROOT, ServiceSettings
from services.capture.spool import Spool, SpoolLimits, SpoolSender
from services.inference.settings import DEFAULT_MODEL
from tests.conftest import Broker, free_port, make_broker

MODEL = DEFAULT_MODEL
CAMERA = "cam1"
_ALERT_ID_RE = re.compile(r"Alert id:\s+([0-9a-f]{32})")


def wait_until(check: Callable[[], bool], timeout_s: float, step_s: float = 0.1) -> bool:
    """Poll ``check`` (sleeping between tries) until it holds or the time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step_s)
    return check()


# -- faces ----------------------------------------------------------------------------


def dataset_crops(shared: Path, count: int, max_side: int = 160) -> list[tuple[str, bytes]]:
    """``count`` real face crops as (class folder, JPEG), alternating with/without mask.

    Picked evenly through each sorted folder so that a run is repeatable; scaled down so
    that a payload stays a few kilobytes.
    """
    root = shared / "datasets" / "chandrikadeb7"
    classes = ("with_mask", "without_mask")
    files = {name: sorted((root / name).glob("*.jpg")) for name in classes}
    crops: list[tuple[str, bytes]] = []
    per_class = (count + 1) // 2
    picked: dict[str, list[Path]] = {}
    for name in classes:
        step = max(1, len(files[name]) // max(1, per_class * 2))
        picked[name] = files[name][::step]
    index = {name: 0 for name in classes}
    while len(crops) < count:
        name = classes[len(crops) % 2]
        candidates = picked[name]
        while index[name] < len(candidates):
            path = candidates[index[name]]
            index[name] += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None or min(image.shape[:2]) < 16:
                continue
            scale = max_side / max(image.shape[:2])
            if scale < 1.0:
                image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
            if ok:
                crops.append((name, data.tobytes()))
                break
        else:
            raise RuntimeError(f"not enough readable images in {root / name}")
    return crops


def face_message(district: str, jpeg: bytes, frame: int, track: int) -> FaceCrop:
    """A FaceCrop whose frame is the crop itself (the box covers all of it)."""
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    height, width = image.shape[:2]
    return FaceCrop(
        face_id=new_face_id(),
        district=district,
        camera=CAMERA,
        place="Fault test gate",
        frame=frame,
        track=track,
        captured_at=datetime.now(UTC),
        frame_width=width,
        frame_height=height,
        box=Box(x1=0, y1=0, x2=width, y2=height),
        detector_score=0.9,
        crop_jpeg=jpeg,
    )


# -- observers ------------------------------------------------------------------------


class Auditor:
    """Records every message of the district as user ``auditor``.

    A stable client id with a persistent session: messages published while the broker
    was restarting, or while this client was reconnecting, still reach it.
    """

    def __init__(self, broker: Broker, client_id: str = "fault-auditor") -> None:
        self.root = topics.district_root(broker.district)
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.username_pw_set("auditor", broker.files.passwords["auditor"])
        self.client.reconnect_delay_set(0.2, 1.0)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the auditor did not subscribe")

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(f"{self.root}/#", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def on(self, suffix: str) -> list[bytes]:
        with self._lock:
            return [payload for topic, payload in self.messages if topic.endswith(suffix)]

    def verdicts(self) -> list[Verdict]:
        return [decode(Verdict, p) for p in self.on("/verdicts")]

    def violations(self) -> list[Violation]:
        return [decode(Violation, p) for p in self.on("/violations")]

    def dead_letters(self) -> list[DeadLetter]:
        return [decode(DeadLetter, p) for p in self.on("/deadletter")]

    def statuses(self) -> dict[tuple[str, str], ServiceStatus]:
        """The latest status of every (service, instance)."""
        latest: dict[tuple[str, str], ServiceStatus] = {}
        with self._lock:
            payloads = [p for t, p in self.messages if "/status/" in t]
        for payload in payloads:
            try:
                status = decode(ServiceStatus, payload)
            except MessageError:
                continue
            latest[(status.service, status.instance)] = status
        return latest

    def status_count(self, service: str, instance: str, state: str = "online") -> int:
        """How many status messages of one instance in one state arrived so far."""
        count = 0
        with self._lock:
            payloads = [p for t, p in self.messages if t.endswith(f"/status/{service}/{instance}")]
        for payload in payloads:
            try:
                if decode(ServiceStatus, payload).state == state:
                    count += 1
            except MessageError:
                continue
        return count

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class FacePublisher:
    """Sends faces as camera ``cam1`` through the capture spool (kept until PUBACK)."""

    def __init__(self, broker: Broker, spool_path: Path) -> None:
        user = capture_user(CAMERA)
        settings = ServiceSettings(
            district=broker.district, instance=CAMERA, broker=broker.settings(user),
            status_interval_s=1.0,
        )
        self.bus = Bus(settings, "capture", client_id=f"capture-{broker.district}-{CAMERA}")
        self.spool = Spool(spool_path, SpoolLimits(), self.bus.counters)
        self.sender = SpoolSender(self.bus, self.spool, window=10, ack_timeout_s=10.0)
        self.topic = topics.faces(broker.district, CAMERA)
        if not self.bus.start(wait_s=10):
            raise RuntimeError("the face publisher did not connect")
        self.sender.start()

    def submit(self, face: FaceCrop) -> None:
        self.sender.submit(face.face_id, self.topic, encode(face))

    @property
    def acknowledged(self) -> int:
        return self.bus.counters.get("faces")

    def close(self) -> None:
        self.sender.stop()
        self.bus.stop()
        self.spool.close()


# -- mail -----------------------------------------------------------------------------


@dataclass
class Mailbox:
    """What the mail sink holds: alert ids per single mail, and digests."""

    singles: list[str] = field(default_factory=list)
    digests: list[list[str]] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    single_message_ids: list[str] = field(default_factory=list)
    headers: list[EmailMessage] = field(default_factory=list)


def read_mailbox(directory: Path) -> Mailbox:
    box = Mailbox()
    for path in sorted(directory.glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=default_policy)
        assert isinstance(message, EmailMessage)
        box.headers.append(message)
        box.message_ids.append(str(message.get("Message-ID", "")))
        body = message.get_body(preferencelist=("plain",))
        text = str(body.get_content()) if body is not None else ""
        # Counted from the body an operator reads; the header must agree with it.
        found = _ALERT_ID_RE.findall(text)
        if found:
            if str(message.get("X-Maskmesh-Alert-Id", "")) != found[0]:
                raise AssertionError(f"{path.name}: alert id header and body disagree")
            box.singles.append(found[0])
            box.single_message_ids.append(str(message.get("Message-ID", "")))
        else:
            box.digests.append(re.findall(r"alert ([0-9a-f]{32})", text))
    return box


# -- the stack ------------------------------------------------------------------------


class Service:
    """One ``python -m maskmesh.cli ...`` child process, restartable with the same argv."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "maskmesh.cli", *self.argv],
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a power cut or an OOM kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def terminate(self, timeout_s: float = 20.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""


class Stack:
    """Broker, mail sink and service processes of one district under ``workdir``."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        (workdir / "secrets").mkdir(mode=0o700, exist_ok=True)
        self.broker = make_broker(workdir / "broker")
        self.mail_dir = workdir / "mail"
        self.smtp_port = free_port()
        self.sink: Any = None
        self.services: dict[str, Service] = {}
        base = {k: v for k, v in os.environ.items() if not k.startswith("MASKMESH_")}
        self.env = {**base, "PYTHONUNBUFFERED": "1", **(env or {})}

    # broker and mail

    def start_broker(self) -> None:
        self.broker.start()

    def start_sink(self) -> None:
        from services.notifier.mailsink import MailSink

        self.sink = MailSink(self.mail_dir, host="127.0.0.1", port=self.smtp_port)
        self.sink.start()

    def stop_sink(self) -> None:
        if self.sink is not None:
            self.sink.stop()

    # configs

    def broker_section(self, user: str, **extra: Any) -> dict[str, Any]:
        secret = self.workdir / "secrets" / user
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self.broker.files.passwords[user] + "\n")
        return {
            "host": "127.0.0.1",
            "port": self.broker.port,
            "username": user,
            "password_file": str(secret),
            "reconnect_min_delay_s": 0.2,
            "reconnect_max_delay_s": 1.0,
            **extra,
        }

    def write_config(self, name: str, user: str, section: dict[str, Any]) -> Path:
        config = {
            "district": self.broker.district,
            "broker": self.broker_section(user),
            "status_interval_s": 1.0,
            **section,
        }
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    def inference_config(self, worker_id: str, model: Path = MODEL, **section: Any) -> Path:
        return self.write_config(
            f"inference-{worker_id}",
            "inference",
            {
                "instance": worker_id,
                "inference": {
                    "model_path": str(model),
                    "worker_id": worker_id,
                    "intra_op_threads": 1,
                    "max_wait_ms": 20,
                    "stop_timeout_s": 5,
                    **section,
                },
            },
        )

    def notifier_config(self, **section: Any) -> Path:
        notifier = {
            "smtp": {"host": "127.0.0.1", "port": self.smtp_port, "timeout_s": 3.0},
            "recipients": ["operator@district.test"],
            "mail_from": "maskmesh@district.test",
            "outbox_path": str(self.workdir / "outbox.sqlite3"),
            # Each violation should become exactly one single mail: nothing held back.
            "track_cooldown_s": 0.0,
            "camera_cooldown_s": 0.0,
            "max_mails_per_hour": 100000,
            "digest_interval_s": 2.0,
            "retry_base_s": 0.3,
            "retry_max_s": 2.0,
            "retry_jitter": 0.0,
            **section,
        }
        return self.write_config("notifier", "notifier", {"instance": "n1", "notifier": notifier})

    # services

    def add(self, name: str, argv: list[str]) -> Service:
        service = Service(name, argv, self.workdir / "logs" / f"{name}.log", self.env)
        self.services[name] = service
        return service

    def spawn(self, name: str, argv: list[str]) -> Service:
        service = self.add(name, argv)
        service.start()
        return service

    def close(self) -> None:
        order = [n for n in self.services if n.startswith("capture")]
        order += [n for n in self.services if n.startswith("inference")]
        order += [n for n in self.services if not n.startswith(("capture", "inference"))]
        for name in order:
            self.services[name].terminate()
        self.broker.stop()
        self.stop_sink()

    def logs(self, names: Iterable[str] | None = None) -> dict[str, str]:
        chosen = self.services if names is None else {n: self.services[n] for n in names}
        return {name: service.output() for name, service in chosen.items()}
