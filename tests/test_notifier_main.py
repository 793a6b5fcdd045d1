"""``maskmesh notifier`` as a process: config file, one mail, SIGTERM, offline status."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from maskmesh import topics
from maskmesh.messages import ServiceStatus, decode
from services.notifier.mailsink import MailSink

from .conftest import DISTRICT, Broker, free_port
from .test_notifier import Publisher, make_violation, read_mail, wait_for


def _status_watcher(broker: Broker) -> tuple[mqtt.Client, list[ServiceStatus]]:
    seen: list[ServiceStatus] = []
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.username_pw_set("operator", broker.files.passwords["operator"])
    client.on_message = lambda c, u, msg: seen.append(decode(ServiceStatus, msg.payload))
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    client.subscribe(topics.all_status(DISTRICT), qos=1)
    assert subscribed.wait(5)
    return client, seen


def test_the_notifier_command_mails_and_stops_cleanly_on_sigterm(
    broker: Broker, tmp_path: Path
) -> None:
    password = broker.files.passwords["notifier"]
    sink = MailSink(tmp_path / "mail", port=free_port())
    sink.start()
    config = tmp_path / "notifier.yaml"
    config.write_text(
        json.dumps({
            "district": DISTRICT,
            "instance": "main-test",
            "status_interval_s": 0.5,
            "broker": {"host": "127.0.0.1", "port": broker.port, "username": "notifier",
                       "password": password},
            "notifier": {
                "smtp": {"host": "127.0.0.1", "port": sink.port, "timeout_s": 3},
                "recipients": ["operator@district.test"],
                "outbox_path": str(tmp_path / "outbox.sqlite3"),
            },
        }),
        encoding="utf-8",
    )
    watcher, statuses = _status_watcher(broker)
    publisher = Publisher(broker)
    process = subprocess.Popen(
        [sys.executable, "-m", "maskmesh.cli", "notifier", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: any(s.state == "online" for s in statuses), timeout_s=30,
                 what="the notifier online")
        # Its first session subscribes right after connecting; give the SUBACK a moment.
        wait_for(lambda: len(statuses) >= 2, timeout_s=5, what="a status refresh")
        violation = make_violation()
        publisher.send(violation)
        wait_for(lambda: len(sink.messages()) == 1, timeout_s=15, what="the mail")
        assert read_mail(sink.messages()[0])["X-Maskmesh-Alert-Id"] == violation.face_id
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        publisher.close()
        sink.stop()
    log = output.decode()
    assert process.returncode == 0, log
    assert password not in log
    assert "sent alert" in log
    wait_for(lambda: statuses[-1].state == "offline", timeout_s=5, what="offline status")
    assert statuses[-1].counters.get("mails_sent") == 1
    watcher.disconnect()
    watcher.loop_stop()


def test_bad_settings_exit_2_with_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("notifier:\n  quiet_hours: 'all night'\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "maskmesh.cli", "notifier", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "notifier.quiet_hours" in result.stderr
