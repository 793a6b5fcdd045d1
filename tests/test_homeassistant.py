"""Home Assistant MQTT discovery: retained configs on a real broker, naming real topics."""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from jinja2 import Environment
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from maskmesh import topics
from maskmesh.brokerconf import BrokerPlan, acl_text, capture_user, render, users
from maskmesh.messages import LABELS, ServiceStatus, Verdict, encode, new_face_id, utc_now
from maskmesh.settings import REPO_ROOT

from .conftest import DISTRICT, Broker, free_port

PREFIX = "homeassistant"
# <prefix>/<component>/<node_id>/<object_id>/config
CONFIG_TOPIC = re.compile(r"^homeassistant/(sensor|binary_sensor)/[\w-]+/[\w-]+/config$", re.ASCII)
REQUIRED = ("name", "unique_id", "state_topic", "device", "origin")


@pytest.fixture
def ha_broker(tmp_path: Path) -> Iterator[Broker]:
    """The test broker with the optional homeassistant user."""
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    workdir = tmp_path / "broker"
    plan = BrokerPlan(
        district=DISTRICT, cameras=("cam1", "cam2"), port=free_port(), data_dir=workdir,
        auditor=True, homeassistant_prefix=PREFIX, run_as=getpass.getuser(),
    )
    instance = Broker(plan, render(plan, workdir), workdir)
    instance.start()
    yield instance
    instance.stop()


class Client:
    """A paho client as one broker user, recording what arrives (with the retain flag)."""

    def __init__(self, broker: Broker, user: str, *filters: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.username_pw_set(user, broker.files.passwords[user])
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        if filters:
            self.client.subscribe([(f, 1) for f in filters])
            assert subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published()

    def latest(self) -> dict[str, bytes]:
        with self.lock:
            return {topic: payload for topic, payload, _ in self.messages}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(broker: Broker, pattern: str, settle_s: float = 1.0) -> dict[str, bytes]:
    """What the broker holds retained under pattern (empty payloads are no retained msg)."""
    reader = Client(broker, "homeassistant", pattern)
    time.sleep(settle_s)
    reader.close()
    with reader.lock:
        return {t: p for t, p, was_retained in reader.messages if was_retained and p}


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def status(service: str, instance: str, state: str = "online", **counters: int) -> bytes:
    now = utc_now()
    return encode(ServiceStatus(
        district=DISTRICT, service=service, instance=instance,
        state=state,  # type: ignore[arg-type]
        started_at=now, updated_at=now, counters=counters, version="0.1.0",
    ))


def verdict(camera: str, label: str, p_mask: float, face_id: str | None = None) -> Verdict:
    now = utc_now()
    return Verdict(
        face_id=face_id or new_face_id(), district=DISTRICT, camera=camera, frame=3, track=2,
        captured_at=now - timedelta(milliseconds=40), decided_at=now,
        label=label,  # type: ignore[arg-type]
        p_mask=p_mask, probs={"mask": p_mask, "no_mask": 1 - p_mask, "incorrect": 0.0},
        threshold=0.8, violation=p_mask < 0.8, model_id="test-model", worker="w1",
        latency_ms=40.0, inference_ms=3.0,
    )


class Bridge:
    """``maskmesh homeassistant`` as a subprocess."""

    def __init__(self, broker: Broker, tmp_path: Path, *args: str) -> None:
        config = tmp_path / "homeassistant.yaml"
        config.write_text(yaml.safe_dump({
            "district": DISTRICT,
            "instance": "ha1",
            "status_interval_s": 0.5,
            "broker": {"host": "127.0.0.1", "port": broker.port, "username": "homeassistant",
                       "password": broker.files.passwords["homeassistant"],
                       "reconnect_min_delay_s": 0.2, "reconnect_max_delay_s": 1.0},
            "homeassistant": {"cameras": ["cam1"]},
        }), encoding="utf-8")
        self.log = tmp_path / f"homeassistant{len(list(tmp_path.glob('homeassistant*.log')))}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MASKMESH_")}
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "maskmesh.cli", "homeassistant", "--config", str(config),
                 *args],
                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
            )

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout_s: float = 30.0) -> int:
        return self.process.wait(timeout=timeout_s)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)


def render_template(template: str, payload: bytes) -> str:
    """A value_template as Home Assistant renders it: Jinja with value and value_json."""
    text = payload.decode()
    return Environment().from_string(template).render(value=text, value_json=json.loads(text))


def test_the_homeassistant_role_is_off_by_default_and_reads_no_photos() -> None:
    plain = BrokerPlan(district="north", cameras=("gate",))
    assert "homeassistant" not in users(plain) and "homeassistant" not in acl_text(plain)

    plan = BrokerPlan(district="north", cameras=("gate",), homeassistant_prefix="homeassistant")
    assert "homeassistant" in users(plan)
    block = acl_text(plan).split("user homeassistant\n")[1].split("\n\n")[0].splitlines()
    assert "topic read maskmesh/v1/north/+/verdicts" in block
    assert "topic readwrite homeassistant/#" in block
    assert not [rule for rule in block if "faces" in rule or "violations" in rule]


def test_the_homeassistant_user_cannot_see_faces_or_violations(ha_broker: Broker) -> None:
    watcher = Client(ha_broker, "homeassistant", f"{topics.district_root(DISTRICT)}/#")
    camera = Client(ha_broker, capture_user("cam1"))
    inference = Client(ha_broker, "inference")
    try:
        camera.publish(topics.faces(DISTRICT, "cam1"), b"{}")
        inference.publish(topics.violations(DISTRICT, "cam1"), b"{}")
        inference.publish(topics.verdicts(DISTRICT, "cam1"), b"{}")
        wait_for(lambda: topics.verdicts(DISTRICT, "cam1") in watcher.latest(), "the verdict")
        time.sleep(0.3)
        assert set(watcher.latest()) == {topics.verdicts(DISTRICT, "cam1")}
    finally:
        for client in (watcher, camera, inference):
            client.close()


def test_discovery_configs_are_retained_valid_and_name_maskmesh_topics(
    ha_broker: Broker, tmp_path: Path
) -> None:
    camera = Client(ha_broker, capture_user("cam1"))
    notifier = Client(ha_broker, "notifier")
    inference = Client(ha_broker, "inference")
    auditor = Client(ha_broker, "auditor", f"{topics.district_root(DISTRICT)}/#")
    bridge = Bridge(ha_broker, tmp_path)
    try:
        camera.publish(topics.status(DISTRICT, "capture", "cam1"), status("capture", "cam1"),
                       retain=True)
        notifier.publish(topics.status(DISTRICT, "notifier", "n1"),
                         status("notifier", "n1", mails_sent=4, outbox_pending=1), retain=True)
        # cam2 has no status yet: its verdicts alone make it known.
        sent = [verdict("cam1", "mask", 0.97), verdict("cam1", "no_mask", 0.05),
                verdict("cam1", "incorrect", 0.4), verdict("cam2", "no_mask", 0.1)]
        wait_for(lambda: len(retained(ha_broker, f"{PREFIX}/+/+/+/config", 0.3)) >= 6,
                 "the first configs")
        for item in sent:
            inference.publish(topics.verdicts(DISTRICT, item.camera), encode(item))
        # The same verdict again (a redelivery) is not counted twice.
        inference.publish(topics.verdicts(DISTRICT, "cam1"), encode(sent[1]))
        camera2 = Client(ha_broker, capture_user("cam2"))
        camera2.publish(topics.status(DISTRICT, "capture", "cam2"),
                        status("capture", "cam2", "stalled"), retain=True)
        camera2.close()

        counts = f"{PREFIX}/maskmesh/{DISTRICT}/cam1/counts"
        wait_for(lambda: json.loads(retained(ha_broker, counts, 0.3).get(counts, b"{}"))
                 == {"verdicts": 3, "violations": 2}, "cam1's totals")
        configs = {t: json.loads(p) for t, p in retained(ha_broker, f"{PREFIX}/#").items()
                   if t.endswith("/config")}
    finally:
        assert bridge.stop() == 0, bridge.output()
        for client in (camera, notifier, inference):
            client.close()

    # Every camera a device with the promised entities, plus the district device.
    by_id = {c["unique_id"]: c for c in configs.values()}
    assert len(by_id) == len(configs), "unique_ids must be unique"
    for cam in ("cam1", "cam2"):
        for key in ("last_verdict", "p_mask", "violation", "violations", "verdicts", "online"):
            assert f"maskmesh_{DISTRICT}_{cam}_{key}" in by_id
    assert f"maskmesh_{DISTRICT}_notifier_n1_online" in by_id
    assert f"maskmesh_{DISTRICT}_notifier_n1_mails_sent" in by_id
    assert f"maskmesh_{DISTRICT}_homeassistant_ha1_online" in by_id

    seen = auditor.latest()
    auditor.close()
    seen.update(retained(ha_broker, f"{PREFIX}/maskmesh/#"))
    allowed = re.compile(
        rf"^(maskmesh/v1/{DISTRICT}/(cam1|cam2)/verdicts|maskmesh/v1/{DISTRICT}/status/[a-z0-9_-]+/"
        rf"[a-z0-9_-]+|{PREFIX}/maskmesh/{DISTRICT}/(cam1|cam2)/counts)$"
    )
    for topic, config in configs.items():
        assert CONFIG_TOPIC.match(topic), topic
        for key in REQUIRED:
            assert config.get(key), (topic, key)
        assert config["device"]["identifiers"] and config["device"]["name"]
        component = topic.split("/")[1]
        assert config["default_entity_id"] == f"{component}.{config['unique_id']}"
        assert "object_id" not in config  # deprecated by Home Assistant
        named = [config["state_topic"], config.get("json_attributes_topic")]
        named += [entry["topic"] for entry in config.get("availability", [])]
        for name in filter(None, named):
            assert allowed.match(name), (topic, name)
            assert "/faces" not in name and "/violations" not in name
        # The state topic is one maskmesh publishes, and its template reads its payload.
        state = seen.get(config["state_topic"])
        assert state is not None, f"nothing published on {config['state_topic']}"
        value = render_template(config.get("value_template", "{{ value }}"), state)
        if topic.startswith(f"{PREFIX}/binary_sensor/"):
            assert value in ("ON", "OFF"), (topic, value)
        elif config.get("device_class") == "enum":
            assert value in LABELS and value in config["options"]
        else:
            float(value)
        if "json_attributes_template" in config:
            attributes = json.loads(render_template(config["json_attributes_template"], state))
            assert "crop_jpeg" not in attributes and "context_jpeg" not in attributes
        for entry in config.get("availability", []):
            available = render_template(entry["value_template"], seen[entry["topic"]])
            assert available in (entry["payload_available"], entry["payload_not_available"])

    last = by_id[f"maskmesh_{DISTRICT}_cam1_last_verdict"]
    assert render_template(last["value_template"], encode(sent[2])) == "incorrect"
    violation = by_id[f"maskmesh_{DISTRICT}_cam1_violation"]
    assert render_template(violation["value_template"], encode(sent[0])) == "OFF"
    assert render_template(violation["value_template"], encode(sent[1])) == "ON"
    online = by_id[f"maskmesh_{DISTRICT}_cam1_online"]
    assert render_template(online["value_template"], status("capture", "cam1")) == "ON"
    assert render_template(online["value_template"], status("capture", "cam1", "offline")) == "OFF"
    mails = by_id[f"maskmesh_{DISTRICT}_notifier_n1_mails_sent"]
    assert render_template(mails["value_template"], seen[mails["state_topic"]]) == "4"


def test_totals_survive_a_restart_and_remove_clears_everything(
    ha_broker: Broker, tmp_path: Path
) -> None:
    inference = Client(ha_broker, "inference")
    counts = f"{PREFIX}/maskmesh/{DISTRICT}/cam1/counts"

    def totals() -> dict[str, int]:
        return json.loads(retained(ha_broker, counts, 0.3).get(counts, b"{}"))

    try:
        bridge = Bridge(ha_broker, tmp_path)
        wait_for(lambda: totals() == {"verdicts": 0, "violations": 0}, "zero totals")
        first = verdict("cam1", "no_mask", 0.1)
        inference.publish(topics.verdicts(DISTRICT, "cam1"), encode(first))
        wait_for(lambda: totals() == {"verdicts": 1, "violations": 1}, "one violation")
        assert bridge.stop() == 0, bridge.output()

        # Away: the persistent session keeps this verdict for the next start.
        inference.publish(topics.verdicts(DISTRICT, "cam1"), encode(verdict("cam1", "mask", 0.9)))
        bridge = Bridge(ha_broker, tmp_path)
        wait_for(lambda: totals() == {"verdicts": 2, "violations": 1}, "totals carried on")

        # Home Assistant's birth message brings every config again: cam1's six and the
        # bridge's own online sensor.
        watcher = Client(ha_broker, "homeassistant", f"{PREFIX}/+/+/+/config")
        time.sleep(0.5)
        with watcher.lock:
            watcher.messages.clear()
        watcher.publish(f"{PREFIX}/status", b"online")
        wait_for(lambda: len(watcher.latest()) >= 7, "configs again after the birth message")
        watcher.close()
        assert bridge.stop() == 0, bridge.output()
    finally:
        inference.close()

    assert retained(ha_broker, f"{PREFIX}/+/+/+/config")
    remover = Bridge(ha_broker, tmp_path, "--remove")
    assert remover.wait() == 0, remover.output()
    assert retained(ha_broker, f"{PREFIX}/#") == {}


def test_once_publishes_and_exits_beside_a_running_bridge(
    ha_broker: Broker, tmp_path: Path
) -> None:
    bridge = Bridge(ha_broker, tmp_path)
    inference = Client(ha_broker, "inference")
    counts = f"{PREFIX}/maskmesh/{DISTRICT}/cam1/counts"
    bridge_status = topics.status(DISTRICT, "homeassistant", "ha1")
    try:
        wait_for(lambda: counts in retained(ha_broker, counts, 0.3), "the bridge's totals")
        once = Bridge(ha_broker, tmp_path, "--once")
        assert once.wait() == 0, once.output()
        assert "published" in once.output()
        configs = retained(ha_broker, f"{PREFIX}/+/+/+/config")
        assert f"{PREFIX}/sensor/maskmesh_{DISTRICT}_cam1/last_verdict/config" in configs

        # The one-off run neither took the bridge's session nor touched its status.
        assert bridge.process.poll() is None
        state = retained(ha_broker, bridge_status, 0.3)[bridge_status]
        assert json.loads(state)["state"] == "online"
        inference.publish(topics.verdicts(DISTRICT, "cam1"), encode(verdict("cam1", "mask", 0.9)))
        wait_for(lambda: json.loads(retained(ha_broker, counts, 0.3)[counts])["verdicts"] == 1,
                 "the bridge still counting")
    finally:
        inference.close()
        assert bridge.stop() == 0, bridge.output()


def test_bad_settings_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "MASKMESH_HOMEASSISTANT__DISCOVERY_PREFIX": "no/slashes"}
    result = subprocess.run(
        [sys.executable, "-m", "maskmesh.cli", "homeassistant", "--once"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "discovery_prefix" in result.stderr
