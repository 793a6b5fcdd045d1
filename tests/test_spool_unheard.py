"""Faces the broker had nobody to give to stay in the capture spool until a worker is back.

Mosquitto 2.0 keeps the plain subscriptions of persistent sessions over a restart, but
not shared ones: until the inference workers reconnect, the broker acknowledges a face
with "no matching subscribers" (MQTT 5 PUBACK reason 0x10) and drops it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from maskmesh import topics
from maskmesh.bus import Bus
from maskmesh.settings import ServiceSettings
from services.capture.spool import Spool, SpoolLimits, SpoolSender
from tests.conftest import Broker


def _wait(check: Callable[[], object], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def _bus(broker: Broker, user: str, instance: str, service: str) -> Bus:
    settings = ServiceSettings(district=broker.district, instance=instance,
                               broker=broker.settings(user))
    return Bus(settings, service, persistent=service == "inference")


def test_a_face_nobody_is_subscribed_to_waits_in_the_spool_for_a_worker(
        broker: Broker, tmp_path: Path) -> None:
    capture = _bus(broker, "capture-cam1", "cam1", "capture")
    assert capture.start(wait_s=5)
    spool = Spool(tmp_path / "cam1.sqlite3", SpoolLimits(), capture.counters)
    sender = SpoolSender(capture, spool)
    sender.start()
    worker = _bus(broker, "inference", "w1", "inference")
    try:
        payload = json.dumps({"face": 1}).encode()
        assert sender.submit("a" * 32, topics.faces(broker.district, "cam1"), payload)

        # Nobody reads faces yet: the broker says so, and the face is kept and retried.
        assert _wait(lambda: capture.counters.get("faces_unheard") >= 2, 10)
        assert len(spool) == 1 and capture.counters.get("faces") == 0

        got: list[bytes] = []

        def take(msg: mqtt.MQTTMessage) -> None:
            got.append(bytes(msg.payload))

        worker.subscribe(topics.shared_faces(broker.district), take)
        assert worker.start(wait_s=5)
        assert _wait(lambda: got, 10)
        assert sender.drain(5)
        time.sleep(1.5)   # one more retry period: nothing is sent twice
        assert got == [payload]
        assert capture.counters.get("faces") == 1 and len(spool) == 0
    finally:
        sender.stop()
        worker.stop()
        capture.stop()
        spool.close()
