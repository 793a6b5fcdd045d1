"""The district broker's TLS listener, on a real Mosquitto with certificates made here.

Also the home of the helpers the bridge tests share: a throw-away PKI made with the
``openssl`` command, and a Mosquitto process started from any generated config.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from maskmesh.brokerconf import BrokerFiles, BrokerPlan, TLSListener, conf_text, render
from maskmesh.bus import Bus
from maskmesh.settings import BrokerSettings, ServiceSettings, TLSSettings

from .conftest import free_port, wait_for_port

DISTRICT = "tlsdistrict"


@dataclass(frozen=True)
class Pki:
    """A CA with one server certificate for 127.0.0.1/localhost, and an unrelated CA."""

    ca: Path
    cert: Path
    key: Path
    rogue_ca: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=30
    )


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    return cert, key


def make_pki(folder: Path) -> Pki:
    """Certificates in ``folder``: CA, server cert/key signed by it, and a rogue CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _make_ca(folder, "maskmesh-test-ca")
    rogue_ca, _ = _make_ca(folder, "rogue-ca")
    key, csr, cert = folder / "server.key", folder / "server.csr", folder / "server.crt"
    ext = folder / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectKeyIdentifier=hash\n",
        encoding="utf-8",
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", "/CN=localhost",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext,
        cwd=folder,
    )  # fmt: skip
    return Pki(ca=ca, cert=cert, key=key, rogue_ca=rogue_ca)


class Mosquitto:
    """A mosquitto process for one generated config; ``stop`` always ends it."""

    def __init__(self, conf: Path, port: int, workdir: Path) -> None:
        self.conf = conf
        self.port = port
        self.log = workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if shutil.which("mosquitto") is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["mosquitto", "-c", str(self.conf)], stdout=log, stderr=log
            )
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise AssertionError(self.log.read_text(errors="replace")) from None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


class Client:
    """A bare paho MQTT 5 client that records what it receives."""

    def __init__(
        self,
        port: int,
        user: str,
        password: str,
        ca: Path | None = None,
        connect: bool = True,
    ) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.username_pw_set(user, password)
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
        self.port = port
        self.received: list[tuple[str, bytes, bool]] = []
        self.connack: list[mqtt.ReasonCode] = []
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.got = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        if connect:
            self.connect()

    def connect(self) -> None:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack.append(reason_code)
        self.connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        self.received.append((msg.topic, msg.payload, bool(msg.retain)))
        self.got.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.subscribed.set()

    def subscribe(self, topic_filter: str) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic_filter, qos=1)
        assert self.subscribed.wait(5)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)

    def topics(self) -> list[str]:
        return [topic for topic, _, _ in self.received]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class TlsDistrict:
    pki: Pki
    files: BrokerFiles
    plain_port: int
    tls_port: int


@pytest.fixture
def tls_district(tmp_path: Path) -> Iterator[TlsDistrict]:
    """A district broker with its loopback plain listener and a TLS listener."""
    pki = make_pki(tmp_path / "pki")
    plain_port, tls_port = free_port(), free_port()
    plan = BrokerPlan(
        district=DISTRICT,
        cameras=("cam1",),
        port=plain_port,
        data_dir=tmp_path,
        tls=TLSListener(tls_port, pki.ca, pki.cert, pki.key, bind="127.0.0.1"),
        run_as=getpass.getuser(),
    )
    files = render(plan, tmp_path / "broker")
    broker = Mosquitto(files.conf, plain_port, tmp_path)
    broker.start()
    wait_for_port(tls_port)
    yield TlsDistrict(pki, files, plain_port, tls_port)
    broker.stop()


def _connect_packet(user: str, password: str) -> bytes:
    """A minimal MQTT 3.1.1 CONNECT packet, to speak plain TCP without a client library."""

    def field(data: bytes) -> bytes:
        return len(data).to_bytes(2, "big") + data

    body = field(b"MQTT") + bytes([4, 0xC2]) + (30).to_bytes(2, "big")
    body += field(b"plain-probe") + field(user.encode()) + field(password.encode())
    return bytes([0x10, len(body)]) + body


def _plain_answer(port: int, packet: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(packet)
        try:
            return sock.recv(4)
        except (ConnectionResetError, TimeoutError):
            return b""


def test_tls_listener_is_generated_with_verification() -> None:
    tls = TLSListener(8883, Path("/ca.crt"), Path("/s.crt"), Path("/s.key"))
    plan = BrokerPlan(district="demo", cameras=("cam1",), tls=tls)
    text = conf_text(plan, Path("/passwd"), Path("/acl"))
    assert "listener 8883 0.0.0.0" in text
    assert "listener 1883 127.0.0.1" in text
    assert "tls_version tlsv1.2" in text


def test_service_connects_over_tls(tls_district: TlsDistrict) -> None:
    settings = ServiceSettings(
        district=DISTRICT,
        instance="tls-probe",
        broker=BrokerSettings(
            port=tls_district.tls_port,
            username="operator",
            password=tls_district.files.passwords["operator"],
            tls=TLSSettings(ca_file=tls_district.pki.ca),
        ),
    )
    bus = Bus(settings, "operator", announce=False)
    try:
        assert bus.start(wait_s=10), "the Bus did not connect over TLS"
    finally:
        bus.stop()


def test_plain_tcp_to_the_tls_listener_is_refused(tls_district: TlsDistrict) -> None:
    packet = _connect_packet("operator", tls_district.files.passwords["operator"])
    # The same bytes get a CONNACK (0x20) on the plain port, so the packet is sound.
    assert _plain_answer(tls_district.plain_port, packet)[:1] == b"\x20"
    assert _plain_answer(tls_district.tls_port, packet)[:1] != b"\x20"


def test_client_with_a_wrong_ca_fails(tls_district: TlsDistrict) -> None:
    password = tls_district.files.passwords["operator"]
    rogue = Client(
        tls_district.tls_port, "operator", password, ca=tls_district.pki.rogue_ca, connect=False
    )
    with pytest.raises(ssl.SSLError):
        rogue.client.connect("127.0.0.1", tls_district.tls_port)
    good = Client(tls_district.tls_port, "operator", password, ca=tls_district.pki.ca)
    try:
        assert good.connected.wait(5)
        assert not good.connack[0].is_failure
    finally:
        good.close()
