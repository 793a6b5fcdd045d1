"""The generated Mosquitto config refuses what each role must not do, on a real broker."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from maskmesh import topics
from maskmesh.brokerconf import capture_user, hash_password

from .conftest import Broker


class Probe:
    """A bare paho client that records what it receives and how connecting went."""

    def __init__(self, broker: Broker, user: str | None, password: str | None = None) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        if user is not None:
            secret = password if password is not None else broker.files.passwords[user]
            self.client.username_pw_set(user, secret)
        self.connack: list[mqtt.ReasonCode] = []
        self.received: list[tuple[str, bytes]] = []
        self.subacks: list[list[mqtt.ReasonCode]] = []
        self.connected = threading.Event()
        self.got = threading.Event()
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack.append(reason_code)
        self.connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        self.received.append((msg.topic, msg.payload))
        self.got.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.subacks.append(reason_codes)
        self.subscribed.set()

    def subscribe(self, topic_filter: str) -> list[mqtt.ReasonCode]:
        self.subscribed.clear()
        self.client.subscribe(topic_filter, qos=1)
        assert self.subscribed.wait(5)
        return self.subacks[-1]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_password_hash_format_matches_mosquitto() -> None:
    value = hash_password("secret", salt=b"0123456789ab")
    assert value.startswith("$7$101$")
    assert len(value.split("$")) == 5


def test_wrong_password_and_anonymous_are_refused(broker: Broker) -> None:
    wrong = Probe(broker, "inference", password="not-the-password")
    anonymous = Probe(broker, None)
    try:
        assert wrong.connected.wait(5) and anonymous.connected.wait(5)
        assert wrong.connack[0].is_failure
        assert anonymous.connack[0].is_failure
    finally:
        wrong.close()
        anonymous.close()


def test_capture_node_cannot_publish_as_another_camera(broker: Broker) -> None:
    auditor = Probe(broker, "auditor")
    cam1 = Probe(broker, capture_user("cam1"))
    try:
        assert auditor.connected.wait(5) and cam1.connected.wait(5)
        auditor.subscribe(f"{topics.district_root(broker.district)}/#")
        cam1.client.publish(topics.faces(broker.district, "cam2"), b"forged", qos=1)
        cam1.client.publish(topics.faces(broker.district, "cam1"), b"own", qos=1)
        assert auditor.got.wait(5)
        auditor.got.clear()
        auditor.got.wait(1.0)
        assert [t for t, _ in auditor.received] == [topics.faces(broker.district, "cam1")]
    finally:
        auditor.close()
        cam1.close()


def test_integrator_sees_verdicts_but_never_faces(broker: Broker) -> None:
    integrator = Probe(broker, "integrator")
    cam1 = Probe(broker, capture_user("cam1"))
    inference = Probe(broker, "inference")
    try:
        assert integrator.connected.wait(5) and cam1.connected.wait(5)
        assert inference.connected.wait(5)
        faces_codes = integrator.subscribe(topics.all_faces(broker.district))
        integrator.subscribe(topics.all_verdicts(broker.district))
        cam1.client.publish(topics.faces(broker.district, "cam1"), b"face", qos=1)
        inference.client.publish(topics.verdicts(broker.district, "cam1"), b"verdict", qos=1)
        assert integrator.got.wait(5)
        integrator.got.clear()
        integrator.got.wait(1.0)
        assert [t for t, _ in integrator.received] == [topics.verdicts(broker.district, "cam1")]
        # Mosquitto 2.0 grants the SUBSCRIBE and then withholds each message the ACL
        # does not allow; the received list above is the real proof.
        assert len(faces_codes) == 1
    finally:
        integrator.close()
        cam1.close()
        inference.close()


def test_inference_workers_share_faces(broker: Broker) -> None:
    workers = [Probe(broker, "inference") for _ in range(2)]
    cam1 = Probe(broker, capture_user("cam1"))
    try:
        for worker in workers:
            assert worker.connected.wait(5)
            codes = worker.subscribe(topics.shared_faces(broker.district))
            assert not codes[0].is_failure
        for i in range(10):
            cam1.client.publish(topics.faces(broker.district, "cam1"), str(i).encode(), qos=1)
        deadline = time.monotonic() + 5
        while sum(len(w.received) for w in workers) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        counts = [len(w.received) for w in workers]
        assert sum(counts) == 10
        assert all(count > 0 for count in counts)
    finally:
        for worker in workers:
            worker.close()
        cam1.close()
