"""The notifier end to end: a real broker, the real aiosmtpd sink, real SQLite.

Each test publishes Violation messages (built around a real JPEG of skimage's astronaut)
as the ``inference`` user and reads what the mail sink stored as .eml files.
"""

from __future__ import annotations

import base64
import email
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import default as default_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import skimage.data
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from maskmesh import topics
from maskmesh.messages import Box, Violation, encode, new_face_id
from services.notifier.mailsink import MailSink
from services.notifier.service import Notifier
from services.notifier.settings import NotifierSettings

from .conftest import DISTRICT, Broker, free_port

# -- test data ------------------------------------------------------------------------

_ASTRONAUT = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
# The astronaut's face in the 512x512 original.
_FACE = (170, 30, 300, 200)


def _jpeg(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return data.tobytes()


CROP_JPEG = _jpeg(_ASTRONAUT[_FACE[1] : _FACE[3], _FACE[0] : _FACE[2]])
# The context photo is scaled to half size, so its box is half the frame box.
CONTEXT_JPEG = _jpeg(cv2.resize(_ASTRONAUT, (256, 256), interpolation=cv2.INTER_AREA))


def make_violation(
    camera: str = "cam1",
    track: int = 1,
    face_id: str | None = None,
    captured_at: datetime | None = None,
    place: str | None = "Main entrance",
    context: bool = True,
    label: str = "no_mask",
    p_mask: float = 0.12,
) -> Violation:
    """A realistic violation from camera/track, with a crop and (optionally) context."""
    now = captured_at or datetime.now(UTC)
    x1, y1, x2, y2 = _FACE
    return Violation(
        face_id=face_id or new_face_id(),
        district=DISTRICT,
        camera=camera,
        frame=7,
        track=track,
        captured_at=now,
        decided_at=now,
        label=label,  # type: ignore[arg-type]
        p_mask=p_mask,
        probs={"mask": p_mask, "no_mask": 1 - p_mask, "incorrect": 0.0},
        threshold=0.8,
        violation=True,
        model_id="maskmesh-test",
        worker="w1",
        latency_ms=12.0,
        inference_ms=4.0,
        place=place,
        box=Box(x1=x1, y1=y1, x2=x2, y2=y2),
        frame_width=512,
        frame_height=512,
        detector_score=0.97,
        crop_jpeg=CROP_JPEG,
        context_jpeg=CONTEXT_JPEG if context else None,
        context_box=Box(x1=x1 // 2, y1=y1 // 2, x2=x2 // 2, y2=y2 // 2) if context else None,
    )


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what or condition}")


def read_mail(path: Path) -> EmailMessage:
    message = email.message_from_bytes(path.read_bytes(), policy=default_policy)
    assert isinstance(message, EmailMessage)
    return message


def jpeg_parts(message: EmailMessage) -> list[tuple[EmailMessage, np.ndarray]]:
    """Every image/jpeg part with its decoded pixels (asserting each one decodes)."""
    found = []
    for part in message.walk():
        if part.get_content_type() == "image/jpeg":
            data = part.get_content()
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            assert image is not None, "an image part does not decode as JPEG"
            found.append((part, image))
    return found


def body_text(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


# -- fixtures -------------------------------------------------------------------------


class Publisher:
    """Publishes violations as the inference user, waiting for each PUBACK."""

    def __init__(self, broker: Broker) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.username_pw_set("inference", broker.files.passwords["inference"])
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def send(self, violation: Violation, topic: str | None = None) -> None:
        self.raw(topic or topics.violations(DISTRICT, violation.camera), encode(violation))

    def raw(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(broker: Broker) -> Iterator[Publisher]:
    pub = Publisher(broker)
    yield pub
    pub.close()


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[MailSink]:
    """A mail sink on a free port, not started: tests start it when they want it up."""
    mail_sink = MailSink(tmp_path / "mail", port=free_port())
    yield mail_sink
    mail_sink.stop()


def notifier_settings(
    broker: Broker, tmp_path: Path, sink_port: int, **section: Any
) -> NotifierSettings:
    values: dict[str, Any] = {
        "smtp": {"host": "127.0.0.1", "port": sink_port, "timeout_s": 3.0},
        "recipients": ["operator@district.test"],
        "mail_from": "maskmesh@district.test",
        "timezone": "Europe/Berlin",
        "outbox_path": tmp_path / "outbox.sqlite3",
        "camera_cooldown_s": 0.0,
        "retry_base_s": 0.2,
        "retry_max_s": 1.0,
        "retry_jitter": 0.0,
    }
    values.update(section)
    return NotifierSettings(
        district=DISTRICT,
        instance="test",
        broker=broker.settings("notifier"),
        status_interval_s=1.0,
        notifier=values,
    )


@pytest.fixture
def start_notifier() -> Iterator[Callable[[NotifierSettings], Notifier]]:
    running: list[Notifier] = []

    def start(settings: NotifierSettings) -> Notifier:
        notifier = Notifier(settings)
        assert notifier.start(wait_s=10), "the notifier did not connect"
        running.append(notifier)
        return notifier

    yield start
    for notifier in running:
        if notifier.sender._thread is not None and notifier.sender._thread.is_alive():
            notifier.stop()


def stop_notifier(notifier: Notifier) -> None:
    notifier.stop()


# -- tests ----------------------------------------------------------------------------


def test_a_violation_becomes_exactly_one_mail_with_the_photo(
    broker: Broker, tmp_path: Path, sink: MailSink, publisher: Publisher,
    start_notifier: Callable[[NotifierSettings], Notifier],
) -> None:
    sink.start()
    notifier = start_notifier(notifier_settings(broker, tmp_path, sink.port))
    violation = make_violation(
        captured_at=datetime(2026, 7, 1, 12, 30, 5, tzinfo=UTC), p_mask=0.12
    )
    publisher.send(violation)

    wait_for(lambda: len(sink.messages()) == 1, what="one stored mail")
    message = read_mail(sink.messages()[0])
    # 12:30 UTC is 14:30 in Berlin (summer time).
    assert message["Subject"] == "[maskmesh] No mask at Main entrance 2026-07-01 14:30"
    assert message["To"] == "operator@district.test"
    assert violation.face_id in message["Message-ID"]
    text = body_text(message)
    assert violation.face_id in text
    assert "p(mask) 12%" in text and "no_mask" in text
    assert "2026-07-01 14:30:05 CEST" in text
    html_part = message.get_body(preferencelist=("html",))
    assert html_part is not None and "cid:" in html_part.get_content()

    images = jpeg_parts(message)
    assert len(images) == 2  # the annotated photo inline and the crop attached
    inline = [img for part, img in images if part.get_content_disposition() == "inline"]
    attached = [part for part, _ in images if part.get_content_disposition() == "attachment"]
    assert inline and inline[0].shape[1] >= 480
    assert attached and attached[0].get_filename() == f"{violation.face_id}-crop.jpg"
    assert attached[0].get_content() == CROP_JPEG

    wait_for(lambda: notifier.counters.get("mails_sent") == 1, what="mails_sent")
    row = notifier.outbox.get(violation.face_id, "email")
    assert row is not None and row.state == "sent"
    time.sleep(0.5)
    assert len(sink.messages()) == 1
    assert notifier.counters.get("outbox_pending") == 0


def test_a_duplicate_delivery_sends_no_second_mail(
    broker: Broker, tmp_path: Path, sink: MailSink, publisher: Publisher,
    start_notifier: Callable[[NotifierSettings], Notifier],
) -> None:
    sink.start()
    notifier = start_notifier(notifier_settings(broker, tmp_path, sink.port))
    violation = make_violation()
    publisher.send(violation)
    publisher.send(violation)

    wait_for(lambda: notifier.counters.get("duplicates") == 1, what="a counted duplicate")
    wait_for(lambda: len(sink.messages()) == 1, what="one mail")
    time.sleep(0.5)
    assert len(sink.messages()) == 1
    assert notifier.counters.get("violations_received") == 2
    assert notifier.counters.get("mails_sent") == 1


def test_many_frames_of_one_track_make_one_mail(
    broker: Broker, tmp_path: Path, sink: MailSink, publisher: Publisher,
    start_notifier: Callable[[NotifierSettings], Notifier],
) -> None:
    sink.start()
    notifier = start_notifier(
        notifier_settings(broker, tmp_path, sink.port, track_cooldown_s=60.0)
    )
    for _ in range(6):
        publisher.send(make_violation(track=4))
    publisher.send(make_violation(track=5))  # another person: another mail

    wait_for(lambda: notifier.counters.get("mails_suppressed") == 5, what="5 suppressed")
    wait_for(lambda: len(sink.messages()) == 2, what="two mails")
    time.sleep(0.5)
    assert len(sink.messages()) == 2
    counts = notifier.outbox.counts("email")
    assert counts["suppressed"] == 5 and counts["sent"] == 2


def test_mail_waits_in_the_outbox_while_the_server_is_down(
    broker: Broker, tmp_path: Path, sink: MailSink, publisher: Publisher,
    start_notifier: Callable[[NotifierSettings], Notifier],
) -> None:
    notifier = start_notifier(notifier_settings(broker, tmp_path, sink.port))
    violation = make_violation()
    publisher.send(violation)

    wait_for(lambda: notifier.counters.get("mails_retried") >= 2, what="retries")
    row = notifier.outbox.get(violation.face_id, "email")
    assert row is not None and row.state == "pending" and row.attempts >= 2
    assert "Connection" in (row.last_error or "") or "refused" in (row.last_error or "")
    assert notifier.counters.get("outbox_pending") == 1
    assert notifier.bus.detail and "unreachable" in notifier.bus.detail

    sink.start()
    wait_for(lambda: len(sink.messages()) == 1, timeout_s=10, what="the held mail")
    wait_for(lambda: notifier.counters.get("mails_sent") == 1, what="mails_sent")
    time.sleep(1.5)  # longer than the longest back-off: nothing is sent again
    assert len(sink.messages()) == 1
    assert notifier.bus.detail is None


def test_a_restart_between_receiving_and_sending_sends_exactly_once(
    broker: Broker, tmp_path: Path, sink: MailSink, publisher: Publisher,
    start_notifier: Callable[[NotifierSettings], Notifier],
) -> None:
    settings = notifier_settings(broker, tmp_path, sink.port)
    first = start_notifier(settings)
    held = make_violation(track=1)
    publisher.send(held)
    wait_for(lambda: first.outbox.get(held.face_id, "email") is not None, what="filed")
    stop_notifier(first)

    # While the notifier is away its persistent session queues the next violation.
    queued = make_violation(track=2)
    publisher.send(queued)
    sink.start()
    second = start_notifier(settings)

    wait_for(lambda: len(sink.messages()) == 2, timeout_s=15, what="two mails")
    time.sleep(1.0)
    ids = sorted(read_mail(path)["X-Maskmesh-Alert-Id"] for path in sink.messages())
    assert ids == sorted([held.face_id, queued.face_id])
    assert second.counters.get("duplicates") == 0


def test_a_permanent_refusal_is_recorded_and_not_retried(
    broker: Broker, tmp_path: Path, sink: MailSink, publisher: Publisher,
    start_notifier: Callable[[NotifierSettings], Notifier],
) -> None:
    sink.refuse_code = 550
    sink.start()
    notifier = start_notifier(notifier_settings(broker, tmp_path, sink.port))
    violation = make_violation()
    publisher.send(violation)

    wait_for(lambda: notifier.counters.get("mails_failed") == 1, what="mails_failed")
    time.sleep(1.5)  # past several back-off steps
    row = notifier.outbox.get(violation.face_id, "email")
    assert row is not None and row.state == "failed_permanent"
    assert row.attempts == 1
    assert "550" in (row.last_error or "")
    assert notifier.counters.get("mails_retried") == 0
    assert notifier.counters.get("outbox_pending") == 0
    assert notifier.bus.detail and violation.face_id in notifier.bus.detail
    assert sink.messages() == []


def test_a_temporary_refusal_is_retried_until_accepted(
    broker: Broker, tmp_path: Path, sink: MailSink, publisher: Publisher,
    start_notifier: Callable[[NotifierSettings], Notifier],
) -> None:
    sink.refuse_code = 451
    sink.refuse_stage = "data"
    sink.start()
    notifier = start_notifier(notifier_settings(broker, tmp_path, sink.port))
    publisher.send(make_violation())

    wait_for(lambda: notifier.counters.get("mails_retried") >= 1, what="a retry")
    sink.refuse_code = None
    wait_for(lambda: len(sink.messages()) == 1, what="the mail after the refusal")
    assert notifier.counters.get("mails_failed") == 0


def test_a_slow_mail_server_does_not_block_receiving(
    broker: Broker, tmp_path: Path, sink: MailSink, publisher: Publisher,
    start_notifier: Callable[[NotifierSettings], Notifier],
) -> None:
    sink.delay_s = 2.0
    sink.start()
    notifier = start_notifier(notifier_settings(broker, tmp_path, sink.port))
    started = time.monotonic()
    for track in range(5):
        publisher.send(make_violation(track=track))

    wait_for(lambda: notifier.counters.get("violations_received") == 5, timeout_s=1.5,
             what="all five received while the first mail is still in progress")
    assert time.monotonic() - started < 2.0
    assert notifier.counters.get("mails_sent") == 0
    assert notifier.outbox.counts("email")["pending"] == 5
    wait_for(lambda: len(sink.messages()) >= 1, timeout_s=5, what="the slow first mail")


def test_a_malformed_violation_is_dead_lettered_and_the_notifier_goes_on(
    broker: Broker, tmp_path: Path, sink: MailSink, publisher: Publisher,
    start_notifier: Callable[[NotifierSettings], Notifier],
) -> None:
    sink.start()
    notifier = start_notifier(notifier_settings(broker, tmp_path, sink.port))
    publisher.raw(topics.violations(DISTRICT, "cam1"), b'{"schema_version": 1, "face_id": 3}')
    # A violation of cam2 published on cam1's topic is refused as well.
    publisher.send(make_violation(camera="cam2"), topic=topics.violations(DISTRICT, "cam1"))
    publisher.send(make_violation())

    wait_for(lambda: len(sink.messages()) == 1, what="the valid violation's mail")
    assert notifier.counters.get("dead_letters") == 2
    assert notifier.counters.get("violations_received") == 1


# -- Twilio ---------------------------------------------------------------------------

ACCOUNT_SID = "AC" + "0" * 32


class FakeTwilio:
    """A local stand-in for Twilio's Messages API on 127.0.0.1, recording each request."""

    def __init__(self, refuse: dict[str, int] | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.refuse = refuse or {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length", "0"))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                fake.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "form": form}
                )
                status = fake.refuse.get(form.get("To", ""), 201)
                if status == 201:
                    body = {"sid": "SM" + "1" * 32, "status": "queued", "to": form.get("To"),
                            "from": form.get("From"), "body": form.get("Body")}
                else:
                    body = {"code": 21211, "message": "invalid 'To' number", "status": status}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_twilio() -> Iterator[FakeTwilio]:
    fake = FakeTwilio(refuse={"+15550000002": 400})
    yield fake
    fake.close()


def test_twilio_sms_goes_to_a_local_fake_api(
    broker: Broker, tmp_path: Path, sink: MailSink, publisher: Publisher,
    fake_twilio: FakeTwilio, start_notifier: Callable[[NotifierSettings], Notifier],
) -> None:
    sink.start()
    twilio = {
        "enabled": True,
        "account_sid": ACCOUNT_SID,
        "auth_token": "test-token",
        "from_number": "+15550000000",
        "to_numbers": ["+15550000001"],
        "base_url": fake_twilio.base_url,
        "timeout_s": 3.0,
    }
    notifier = start_notifier(notifier_settings(broker, tmp_path, sink.port, twilio=twilio))
    violation = make_violation()
    publisher.send(violation)

    wait_for(lambda: notifier.counters.get("sms_sent") == 1, what="one SMS")
    wait_for(lambda: len(sink.messages()) == 1, what="the mail as well")
    assert len(fake_twilio.requests) == 1
    request = fake_twilio.requests[0]
    assert request["path"] == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    expected = base64.b64encode(f"{ACCOUNT_SID}:test-token".encode()).decode()
    assert request["auth"] == f"Basic {expected}"
    assert request["form"]["To"] == "+15550000001"
    assert request["form"]["From"] == "+15550000000"
    assert violation.face_id in request["form"]["Body"]
    row = notifier.outbox.get(violation.face_id, "sms")
    assert row is not None and row.state == "sent"


def test_twilio_refusing_a_number_is_a_permanent_sms_failure(
    broker: Broker, tmp_path: Path, sink: MailSink, publisher: Publisher,
    fake_twilio: FakeTwilio, start_notifier: Callable[[NotifierSettings], Notifier],
) -> None:
    sink.start()
    twilio = {
        "enabled": True,
        "account_sid": ACCOUNT_SID,
        "auth_token": "test-token",
        "from_number": "+15550000000",
        "to_numbers": ["+15550000002"],
        "base_url": fake_twilio.base_url,
    }
    notifier = start_notifier(notifier_settings(broker, tmp_path, sink.port, twilio=twilio))
    violation = make_violation()
    publisher.send(violation)

    wait_for(lambda: notifier.counters.get("sms_failed") == 1, what="a failed SMS")
    row = notifier.outbox.get(violation.face_id, "sms")
    assert row is not None and row.state == "failed_permanent"
    assert "21211" in (row.last_error or "")
    wait_for(lambda: notifier.counters.get("mails_sent") == 1, what="the mail still goes")
