"""Passwords never show: not in logs at DEBUG, status, dead letters, /metrics or settings.

Each service runs as a process with DEBUG logging, its broker password (and for the
notifier the SMTP password and the Twilio auth token) given once through environment
variables and once through files. It does real work (a verdict and a dead letter, a
mail and an SMS and a dead letter, faces from sample scenes), and then its output,
everything the district published, and its /metrics page are searched for each secret
in plain text and in the base64 forms that SMTP AUTH and HTTP Basic use.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from maskmesh import topics
from maskmesh.messages import encode
from maskmesh.settings import SettingsError, load_settings
from services.capture.settings import CaptureSettings
from services.inference.settings import InferenceSettings
from services.notifier.mailsink import MailSink
from services.notifier.settings import NotifierSettings

from .conftest import DISTRICT, Broker, free_port
from .faults.stack import Auditor, Service, wait_until
from .test_inference import build_fake_model, make_face
from .test_notifier import ACCOUNT_SID, FakeTwilio, make_violation

SMTP_USER = "alerts"
# The test mail sink asks for a login on plain loopback SMTP, which aiosmtpd warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


def forms(secret: str, user: str | None = None) -> list[str]:
    """The secret as text and as it looks base64-encoded on the wire."""
    found = [secret, base64.b64encode(secret.encode()).decode()]
    if user is not None:
        found.append(base64.b64encode(f"\0{user}\0{secret}".encode()).decode())  # AUTH PLAIN
        found.append(base64.b64encode(f"{user}:{secret}".encode()).decode())  # HTTP Basic
    return found


def assert_hidden(secrets: list[str], where: str, text: str) -> None:
    for secret in secrets:
        assert secret not in text, f"a secret appears in {where}"


def _env(values: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MASKMESH_")}
    return {**base, "PYTHONUNBUFFERED": "1", **values}


def _secret_file(folder: Path, name: str, value: str) -> Path:
    path = folder / name
    path.write_text(value + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def _broker(broker: Broker, user: str, via: str, folder: Path) -> tuple[dict[str, Any],
                                                                        dict[str, str]]:
    """The broker section and environment for ``user`` with its password via env or file."""
    section: dict[str, Any] = {"host": "127.0.0.1", "port": broker.port, "username": user,
                               "reconnect_min_delay_s": 0.2, "reconnect_max_delay_s": 1.0}
    password = broker.files.passwords[user]
    if via == "env":
        return section, {"MASKMESH_BROKER__PASSWORD": password}
    section["password_file"] = str(_secret_file(folder, f"{user}.secret", password))
    return section, {}


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode("utf-8")


def _district_traffic(auditor: Auditor) -> str:
    with auditor._lock:
        return "\n".join(t + " " + p.decode("utf-8", "replace") for t, p in auditor.messages)


def _run(tmp_path: Path, name: str, argv: list[str], env: dict[str, str]) -> Service:
    service = Service(name, argv, tmp_path / f"{name}.log", _env(env))
    service.start()
    return service


@pytest.mark.parametrize("via", ["env", "file"])
def test_inference_keeps_the_broker_password_out_of_everything(
    via: str, broker: Broker, tmp_path: Path
) -> None:
    model = build_fake_model(tmp_path / "fake.onnx")
    section, env = _broker(broker, "inference", via, tmp_path)
    metrics_port = free_port()
    config = tmp_path / "inference.yaml"
    config.write_text(yaml.safe_dump({
        "district": DISTRICT, "instance": "w1", "log_level": "DEBUG", "status_interval_s": 0.5,
        "metrics_port": metrics_port, "broker": section,
        "inference": {"model_path": str(model), "worker_id": "w1", "intra_op_threads": 1},
    }), encoding="utf-8")
    auditor = Auditor(broker, client_id="secrets-auditor")
    service = _run(tmp_path, "inference", ["inference", "--config", str(config)], env)
    try:
        assert wait_until(lambda: auditor.status_count("inference", "w1") >= 1, 60), \
            service.output()
        _publish_as(broker, "capture-cam1", topics.faces(DISTRICT, "cam1"),
                    [encode(make_face("no_mask")), encode(make_face("mask")),
                     b'{"schema_version": 1}'])
        assert wait_until(
            lambda: len(auditor.on("/verdicts")) == 2 and bool(auditor.on("/deadletter")), 20
        )
        page = _metrics(metrics_port)
    finally:
        code = service.terminate()
        auditor.close()
    secrets = forms(broker.files.passwords["inference"], "inference")
    output = service.output()
    assert "DEBUG" in output and code == 0, output[-2000:]
    assert_hidden(secrets, "the inference log", output)
    assert_hidden(secrets, "a status or dead letter", _district_traffic(auditor))
    assert "maskmesh_dead_letters_total" in page
    assert_hidden(secrets, "/metrics", page)


def _publish_as(broker: Broker, user: str, topic: str, payloads: list[bytes]) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.username_pw_set(user, broker.files.passwords[user])
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        for payload in payloads:
            info = client.publish(topic, payload, qos=1)
            info.wait_for_publish(5)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("via", ["env", "file"])
def test_notifier_keeps_broker_smtp_and_twilio_secrets_out_of_everything(
    via: str, broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The local mail sink runs in this process: its log (aiosmtpd's at DEBUG) counts too.
    caplog.set_level(logging.DEBUG)
    smtp_secret = f"smtp-{uuid.uuid4().hex}"
    twilio_secret = f"twilio-{uuid.uuid4().hex}"
    sink = MailSink(tmp_path / "mail", port=free_port(), username=SMTP_USER,
                    password=smtp_secret)
    sink.start()
    twilio = FakeTwilio()
    section, env = _broker(broker, "notifier", via, tmp_path)
    smtp: dict[str, Any] = {"host": "127.0.0.1", "port": sink.port, "username": SMTP_USER,
                            "timeout_s": 3.0}
    twilio_section: dict[str, Any] = {
        "enabled": True, "account_sid": ACCOUNT_SID, "from_number": "+15550000000",
        "to_numbers": ["+15550000001"], "base_url": twilio.base_url, "timeout_s": 3.0,
    }
    if via == "env":
        env["MASKMESH_NOTIFIER__SMTP__PASSWORD"] = smtp_secret
        env["MASKMESH_NOTIFIER__TWILIO__AUTH_TOKEN"] = twilio_secret
    else:
        smtp["password_file"] = str(_secret_file(tmp_path, "smtp.secret", smtp_secret))
        twilio_section["auth_token_file"] = str(
            _secret_file(tmp_path, "twilio.secret", twilio_secret)
        )
    metrics_port = free_port()
    config = tmp_path / "notifier.yaml"
    config.write_text(yaml.safe_dump({
        "district": DISTRICT, "instance": "n1", "log_level": "DEBUG", "status_interval_s": 0.5,
        "metrics_port": metrics_port, "broker": section,
        "notifier": {"smtp": smtp, "recipients": ["operator@district.test"],
                     "outbox_path": str(tmp_path / "outbox.sqlite3"), "twilio": twilio_section},
    }), encoding="utf-8")
    auditor = Auditor(broker, client_id="secrets-auditor")
    service = _run(tmp_path, "notifier", ["notifier", "--config", str(config)], env)
    try:
        assert wait_until(lambda: auditor.status_count("notifier", "n1") >= 1, 60), \
            service.output()
        _publish_as(broker, "inference", topics.violations(DISTRICT, "cam1"),
                    [encode(make_violation()), b'{"schema_version": 1, "face_id": 3}'])
        assert wait_until(lambda: sink.messages() and twilio.requests
                          and auditor.on("/deadletter"), 30), service.output()[-3000:]
        page = _metrics(metrics_port)
    finally:
        code = service.terminate()
        auditor.close()
        sink.stop()
        twilio.close()
    # The secrets did reach the servers, so the search below looks for the right thing.
    expected_auth = base64.b64encode(f"{ACCOUNT_SID}:{twilio_secret}".encode()).decode()
    assert twilio.requests[0]["auth"] == f"Basic {expected_auth}"
    output = service.output()
    assert "DEBUG" in output and code == 0, output[-2000:]
    secrets = (forms(broker.files.passwords["notifier"], "notifier")
               + forms(smtp_secret, SMTP_USER) + forms(twilio_secret, ACCOUNT_SID))
    assert_hidden(secrets, "the notifier log", output)
    assert_hidden(secrets, "a status or dead letter", _district_traffic(auditor))
    assert "maskmesh_mails_sent_total" in page
    assert_hidden(secrets, "/metrics", page)
    assert "mail.log" in {record.name for record in caplog.records}
    assert_hidden(secrets, "the mail sink's log", caplog.text)
    assert_hidden(secrets, "a mail", "".join(p.read_text(errors="replace")
                                              for p in sink.messages()))


@pytest.mark.parametrize("via", ["env", "file"])
def test_capture_keeps_the_broker_password_out_of_its_log_and_status(
    via: str, broker: Broker, tmp_path: Path
) -> None:
    from services.capture.sample import write_sample_images

    scenes = tmp_path / "scenes"
    write_sample_images(scenes)
    section, env = _broker(broker, "capture-cam1", via, tmp_path)
    config = tmp_path / "capture.yaml"
    config.write_text(yaml.safe_dump({
        "district": DISTRICT, "log_level": "DEBUG", "status_interval_s": 0.5,
        "broker": section,
        "capture": {"camera": "cam1", "source": str(scenes), "max_fps": None,
                    "spool_dir": str(tmp_path / "spool"), "drain_timeout_s": 5.0},
    }), encoding="utf-8")
    auditor = Auditor(broker, client_id="secrets-auditor")
    service = _run(tmp_path, "capture", ["capture", "--config", str(config)], env)
    try:
        assert service.process is not None
        code = service.process.wait(120)
    finally:
        service.terminate()
        auditor.close()
    output = service.output()
    assert code == 0, output[-2000:]
    assert auditor.on("/faces"), "the capture node published no face"
    secrets = forms(broker.files.passwords["capture-cam1"], "capture-cam1")
    assert_hidden(secrets, "the capture log", output)
    assert_hidden(secrets, "a status message", _district_traffic(auditor))


def test_settings_show_no_secret_in_repr_str_dump_or_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker_secret, smtp_secret, token = (f"s{n}-{uuid.uuid4().hex}" for n in range(3))
    monkeypatch.setenv("MASKMESH_BROKER__PASSWORD", broker_secret)
    monkeypatch.setenv("MASKMESH_NOTIFIER__SMTP__PASSWORD", smtp_secret)
    monkeypatch.setenv("MASKMESH_NOTIFIER__TWILIO__AUTH_TOKEN", token)
    secrets = [broker_secret, smtp_secret, token]
    loaded: list[Any] = [
        load_settings(NotifierSettings, None),
        load_settings(InferenceSettings, None),
        load_settings(CaptureSettings, None),
    ]
    notifier = loaded[0]
    assert notifier.broker.resolved_password() == broker_secret
    assert notifier.notifier.smtp.resolved_password() == smtp_secret
    assert notifier.notifier.twilio.resolved_auth_token() == token
    for settings in loaded:
        for text in (repr(settings), str(settings), settings.model_dump_json(),
                     json.dumps(settings.model_dump(mode="json")), repr(settings.broker)):
            assert_hidden(secrets, f"{type(settings).__name__} as text", text)

    # A settings error next to a secret names the field, not the value.
    secret_file = _secret_file(tmp_path, "pw", broker_secret)
    with pytest.raises(SettingsError) as caught:
        load_settings(NotifierSettings, None,
                      broker={"password": broker_secret, "password_file": secret_file})
    assert "password" in str(caught.value)
    assert_hidden(secrets, "a settings error", str(caught.value))
    with pytest.raises(SettingsError) as caught:
        load_settings(NotifierSettings, None, notifier={"smtp": {"password": 12345,
                                                                  "port": smtp_secret}})
    assert_hidden(secrets, "a settings error", str(caught.value))
