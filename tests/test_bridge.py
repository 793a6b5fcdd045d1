"""A district bridged to a city broker, on two real Mosquitto processes over TLS.

Violations and status cross to the city; faces and verdicts never do, and a district's
bridge user cannot write another district's topics on the city broker.
"""

from __future__ import annotations

import getpass
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from maskmesh import topics
from maskmesh.brokerconf import (
    Bridge,
    BrokerFiles,
    BrokerPlan,
    CityPlan,
    TLSListener,
    bridge_text,
    bridge_user,
    capture_user,
    city_acl_text,
    render,
    render_city,
)
from maskmesh.messages import Box, ServiceStatus, Violation, encode, new_face_id

from .conftest import free_port
from .test_tls import Client, Mosquitto, Pki, make_pki

DISTRICT = "north"
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64


@dataclass
class Mesh:
    pki: Pki
    district: BrokerFiles
    district_port: int
    city: BrokerFiles
    city_port: int


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    """A TLS-only city broker and a district broker whose bridge points at it."""
    pki = make_pki(tmp_path / "pki")
    city_port, district_port = free_port(), free_port()
    city_plan = CityPlan(
        districts=(DISTRICT, "south"),
        tls=TLSListener(city_port, pki.ca, pki.cert, pki.key, bind="127.0.0.1"),
        data_dir=tmp_path / "city",
        run_as=getpass.getuser(),
    )
    city = render_city(city_plan, tmp_path / "city")
    district_plan = BrokerPlan(
        district=DISTRICT,
        cameras=("cam1",),
        port=district_port,
        data_dir=tmp_path / "district",
        run_as=getpass.getuser(),
        bridge=Bridge(
            host="127.0.0.1",
            port=city_port,
            ca_file=pki.ca,
            password=city.passwords[bridge_user(DISTRICT)],
        ),
    )
    district = render(district_plan, tmp_path / "district")
    brokers = [
        Mosquitto(city.conf, city_port, tmp_path / "city"),
        Mosquitto(district.conf, district_port, tmp_path / "district"),
    ]
    try:
        for broker in brokers:  # city first, so the bridge connects at its first try
            broker.start()
        yield Mesh(pki, district, district_port, city, city_port)
    finally:
        for broker in reversed(brokers):
            broker.stop()


def _violation(camera: str) -> bytes:
    now = datetime.now(UTC)
    message = Violation(
        face_id=new_face_id(),
        district=DISTRICT,
        camera=camera,
        frame=1,
        track=1,
        captured_at=now,
        decided_at=now,
        label="no_mask",
        p_mask=0.1,
        probs={"mask": 0.1, "no_mask": 0.85, "incorrect": 0.05},
        threshold=0.8,
        violation=True,
        model_id="test-model",
        worker="w0",
        latency_ms=5.0,
        inference_ms=2.0,
        box=Box(x1=0, y1=0, x2=10, y2=10),
        frame_width=64,
        frame_height=48,
        detector_score=0.9,
        crop_jpeg=JPEG,
    )
    return encode(message)


def _status() -> bytes:
    now = datetime.now(UTC)
    message = ServiceStatus(
        district=DISTRICT,
        service="inference",
        instance="w0",
        state="online",
        started_at=now,
        updated_at=now,
        version="test",
    )
    return encode(message)


def _wait_for(client: Client, topic: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while topic not in client.topics():
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{topic} did not reach the city; got {client.topics()}"
        client.got.clear()
        client.got.wait(min(remaining, 0.5))


def test_bridge_section_forwards_only_violations_and_status_out() -> None:
    text = bridge_text("demo", Bridge(host="city.example", ca_file=Path("/ca.crt")))
    topic_lines = [line for line in text.splitlines() if line.startswith("topic ")]
    assert topic_lines == [
        "topic maskmesh/v1/demo/+/violations out 1",
        "topic maskmesh/v1/demo/status/+/+ out 1",
    ]
    assert "bridge_protocol_version mqttv50" in text
    assert "bridge_insecure false" in text
    assert "address city.example:8883" in text


def test_city_acl_confines_each_bridge_to_its_district() -> None:
    tls = TLSListener(8883, Path("/ca"), Path("/c"), Path("/k"))
    text = city_acl_text(CityPlan(districts=("north",), tls=tls))
    assert "user bridge-north\ntopic write maskmesh/v1/north/+/violations\n" in text
    assert "faces" not in text and "verdicts" not in text


def test_violation_and_status_cross_but_faces_never(mesh: Mesh) -> None:
    city_reader = Client(mesh.city_port, "auditor", mesh.city.passwords["auditor"], ca=mesh.pki.ca)
    inference = Client(mesh.district_port, "inference", mesh.district.passwords["inference"])
    camera = Client(
        mesh.district_port, capture_user("cam1"), mesh.district.passwords[capture_user("cam1")]
    )
    try:
        for client in (city_reader, inference, camera):
            assert client.connected.wait(5) and not client.connack[0].is_failure
        city_reader.subscribe(f"{topics.ROOT}/#")

        # Retained status crosses whenever the bridge comes up, so it also tells us the
        # bridge is connected before anything else is published.
        status_topic = topics.status(DISTRICT, "inference", "w0")
        inference.publish(status_topic, _status(), retain=True)
        _wait_for(city_reader, status_topic, timeout_s=15)

        camera.publish(topics.faces(DISTRICT, "cam1"), b'{"face": "photo"}')
        inference.publish(topics.verdicts(DISTRICT, "cam1"), b'{"verdict": 1}')
        violation = _violation("cam1")
        inference.publish(topics.violations(DISTRICT, "cam1"), violation)
        _wait_for(city_reader, topics.violations(DISTRICT, "cam1"))
        # The face went in before the violation on the same broker; give stragglers a
        # moment anyway before declaring that nothing else crossed.
        time.sleep(0.5)

        crossed = dict((topic, payload) for topic, payload, _ in city_reader.received)
        assert crossed[topics.violations(DISTRICT, "cam1")] == violation
        assert set(crossed) == {status_topic, topics.violations(DISTRICT, "cam1")}
    finally:
        for client in (city_reader, inference, camera):
            client.close()


def test_a_bridge_user_cannot_write_another_district(mesh: Mesh) -> None:
    city_reader = Client(mesh.city_port, "auditor", mesh.city.passwords["auditor"], ca=mesh.pki.ca)
    impostor = Client(
        mesh.city_port,
        bridge_user(DISTRICT),
        mesh.city.passwords[bridge_user(DISTRICT)],
        ca=mesh.pki.ca,
    )
    try:
        assert city_reader.connected.wait(5) and impostor.connected.wait(5)
        city_reader.subscribe(f"{topics.ROOT}/#")
        impostor.publish(topics.violations("south", "cam1"), b"forged")
        impostor.publish(topics.faces(DISTRICT, "cam1"), b"forged")
        impostor.publish(topics.violations(DISTRICT, "cam9"), b"own")
        _wait_for(city_reader, topics.violations(DISTRICT, "cam9"))
        time.sleep(0.3)
        assert [t for t in city_reader.topics() if "status" not in t] == [
            topics.violations(DISTRICT, "cam9")
        ]
    finally:
        city_reader.close()
        impostor.close()


def test_cli_writes_the_city_and_a_bridged_district(tmp_path: Path) -> None:
    from maskmesh.brokerconf import main

    pki = tmp_path / "pki"
    tls_args = ["--tls-port", "8883", "--tls-ca", str(pki / "ca.crt")]
    tls_args += ["--tls-cert", str(pki / "s.crt"), "--tls-key", str(pki / "s.key")]
    city_args = ["--city", "--district", "north", "--district", "south"]
    assert main([*city_args, "--out", str(tmp_path / "city"), *tls_args,
                 "--secrets-dir", str(tmp_path / "city-secrets")]) == 0  # fmt: skip
    city_conf = (tmp_path / "city" / "mosquitto.conf").read_text(encoding="utf-8")
    assert "listener 8883 0.0.0.0" in city_conf and "listener 1883" not in city_conf
    secret = tmp_path / "city-secrets" / "broker-bridge-north"
    assert secret.is_file()

    district_args = ["--district", "north", "--camera", "cam1", "--out", str(tmp_path / "d")]
    bridge_args = ["--bridge-host", "mqtt.city.example", "--bridge-ca", str(pki / "ca.crt")]
    assert main([*district_args, *bridge_args, "--bridge-password-file", str(secret)]) == 0
    conf = tmp_path / "d" / "mosquitto.conf"
    text = conf.read_text(encoding="utf-8")
    assert f"remote_password {secret.read_text(encoding='utf-8').strip()}" in text
    assert conf.stat().st_mode & 0o077 == 0, "a conf holding a password must be private"
