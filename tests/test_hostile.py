"""Hostile input through a real broker: refused with a reason, and the service answers on.

Each case publishes one bad message and then a good one to a running inference worker
(the tiny colour model of ``test_inference``) or notifier (with the local mail sink),
and checks that the bad one became a dead letter whose reason names the problem and
that the good one still got its verdict or its mail. Identifiers that could break out
of a topic, a file name or a mail header are refused at decoding; a valid message with
awkward but legal text still produces a mail whose headers carry no raw line break and
files that stay in their folders.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from maskmesh import topics
from maskmesh.messages import (
    MAX_PAYLOAD_BYTES,
    DeadLetter,
    MessageError,
    Violation,
    decode,
    encode,
    face_id_of,
    new_face_id,
)
from maskmesh.settings import SettingsError, load_settings
from services.capture.settings import CaptureSettings
from services.inference.service import InferenceWorker
from services.notifier.mailsink import MailSink
from services.notifier.service import Notifier
from services.notifier.settings import NotifierSettings

from . import test_inference as inference_tests
from . import test_notifier as notifier_tests
from .conftest import DISTRICT, Broker
from .test_inference import Probe, jpeg, make_face, verdicts_of
from .test_notifier import Publisher, make_violation, notifier_settings, wait_for

# Fixtures shared by name with the modules that define them.
auditor = inference_tests.auditor
camera = inference_tests.camera
fake_model = inference_tests.fake_model
start_worker = inference_tests.start_worker
publisher = notifier_tests.publisher
sink = notifier_tests.sink
start_notifier = notifier_tests.start_notifier

FACE_TOPIC = topics.faces(DISTRICT, "cam1")
VIOLATION_TOPIC = topics.violations(DISTRICT, "cam1")
# Above what decode accepts, below the broker's max_packet_size (8 MiB): it reaches the
# service, which must refuse it before parsing.
OVERSIZED = b'{"schema_version": 1, "pad": "' + b"x" * (MAX_PAYLOAD_BYTES + 1024) + b'"}'
BAD_IDS = ("cam+1", "cam#", "cam/1", "..", "cam1\r\nBcc: x@example.com", "cam1\n", "CAM1", "")
BAD_TEXT = ("Gate\r\nBcc: evil@example.com", "Gate\nX-Injected: 1", "Gate\u2028Bcc: evil",
            "Gate\x85Bcc: evil", "Gate\u2029X", "Gate\x00")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def face_variant(**changes: Any) -> bytes:
    """A valid face's JSON with fields changed (NaN and Infinity written as JSON literals)."""
    data = json.loads(encode(make_face("mask")))
    data.update(changes)
    return json.dumps(data, allow_nan=True).encode("utf-8")


def violation_variant(**changes: Any) -> bytes:
    data = json.loads(encode(make_violation()))
    data.update(changes)
    return json.dumps(data, allow_nan=True).encode("utf-8")


FACE_CASES: dict[str, tuple[bytes, str]] = {
    "oversized": (OVERSIZED, "above the"),
    "not-json": (b"\x00\x01garbage", "not"),
    "png-not-jpeg": (face_variant(crop_jpeg=_b64(b"\x89PNG\r\n\x1a\n" + b"0" * 64)),
                     "not a JPEG"),
    "jpeg-marker-then-garbage": (face_variant(crop_jpeg=_b64(b"\xff\xd8\xff" + b"\x00" * 300)),
                                 "could not be decoded"),
    "truncated-jpeg": (face_variant(crop_jpeg=_b64(jpeg((0, 255, 0))[:30])),
                       "could not be decoded"),
    "empty-crop": (face_variant(crop_jpeg=""), "image is empty"),
    "not-base64": (face_variant(crop_jpeg="@@@@"), "base64"),
    "zero-size-box": (face_variant(box={"x1": 10, "y1": 20, "x2": 10, "y2": 60}), "zero-size"),
    "negative-box": (face_variant(box={"x1": -5, "y1": 20, "x2": 10, "y2": 60}), "box"),
    "box-outside-frame": (face_variant(box={"x1": 600, "y1": 400, "x2": 700, "y2": 470}),
                          "outside"),
    "zero-size-frame": (face_variant(frame_width=0), "frame_width"),
    "nan-literal": (face_variant(detector_score=float("nan")), "detector_score"),
    "infinity-literal": (face_variant(detector_score=float("inf")), "detector_score"),
    "infinity-width": (face_variant(frame_width=float("inf")), "frame_width"),
    "schema-2": (face_variant(schema_version=2), "schema_version 2 is not supported"),
    "schema-string": (face_variant(schema_version="1"), "schema_version '1'"),
    "schema-missing": (face_variant(schema_version=None), "schema_version None"),
    "bad-face-id": (face_variant(face_id="../../etc/passwd"), "face_id"),
    "negative-track": (face_variant(track=-1), "track"),
    "string-track": (face_variant(track="1/#"), "track"),
    "payload-camera-not-topic-camera": (face_variant(camera="cam2"),
                                        "does not match topic camera"),
    "other-district": (face_variant(district="otherdistrict"), "district"),
    **{f"camera-{i}": (face_variant(camera=bad), "camera") for i, bad in enumerate(BAD_IDS)},
    **{f"district-{i}": (face_variant(district=bad), "district") for i, bad in enumerate(BAD_IDS)},
    **{f"place-{i}": (face_variant(place=bad), "place") for i, bad in enumerate(BAD_TEXT)},
}


def with_declared_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0) claims another size; the data stays small."""
    at = data.index(b"\xff\xc0")
    return (data[: at + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big")
            + data[at + 9:])


# A 40x40 JPEG claiming 16000x16000: a decoder would allocate 768 MB for it.
BOMB = with_declared_size(jpeg((0, 255, 0)), 16000, 16000)
FACE_CASES["declared-16000x16000"] = (face_variant(crop_jpeg=_b64(BOMB)), "pixels")
FACE_CASES["declared-0x40"] = (
    face_variant(crop_jpeg=_b64(with_declared_size(jpeg((0, 255, 0)), 0, 40))), "zero size"
)
FACE_CASES["context-bomb"] = (face_variant(context_jpeg=_b64(BOMB)), "pixels")


def letters_of(probe: Probe) -> list[DeadLetter]:
    return [decode(DeadLetter, p) for p in probe.on("/deadletter")]


@pytest.mark.parametrize("case", sorted(FACE_CASES))
def test_inference_refuses_hostile_faces_with_a_reason_and_answers_the_next(
    case: str, broker: Broker, auditor: Probe, camera: Probe,
    start_worker: Callable[..., InferenceWorker],
) -> None:
    payload, reason = FACE_CASES[case]
    worker = start_worker()
    camera.publish(FACE_TOPIC, payload)
    good = make_face("no_mask")
    camera.publish(FACE_TOPIC, encode(good))

    assert auditor.wait_for(lambda: any(v.face_id == good.face_id for v in verdicts_of(auditor)))
    assert auditor.wait_for(lambda: len(auditor.on("/deadletter")) >= 1)
    (letter,) = letters_of(auditor)
    assert reason in letter.reason, letter.reason
    assert letter.service == "inference" and letter.payload_bytes == len(payload)
    # Only the start of a payload travels on, and never a raw control character.
    assert len(letter.payload_excerpt) <= 256
    assert not re.search(r"[\x00-\x1f\x7f]", letter.payload_excerpt)
    assert len(verdicts_of(auditor)) == 1
    assert worker.counters.get("dead_letters") == 1


def test_the_broker_refuses_packets_above_max_packet_size(
    broker: Broker, auditor: Probe, camera: Probe, start_worker: Callable[..., InferenceWorker],
) -> None:
    """A 9 MiB publish never reaches a service: the broker drops the connection."""
    assert "max_packet_size 8388608" in broker.files.conf.read_text()
    worker = start_worker()
    # MQTT 3.1.1 carries no Maximum Packet Size in the CONNACK, so paho sends the packet
    # and it is the broker that must refuse it.
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
    client.username_pw_set("capture-cam1", broker.files.passwords["capture-cam1"])
    gone = threading.Event()
    client.on_disconnect = lambda *args: gone.set()
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        client.publish(FACE_TOPIC, b"x" * (9 * 1024 * 1024), qos=1)
        assert gone.wait(15), "the broker kept a client that sent a 9 MiB packet"
    finally:
        client.loop_stop()

    good = make_face("no_mask")
    camera.publish(FACE_TOPIC, encode(good))
    assert auditor.wait_for(lambda: any(v.face_id == good.face_id for v in verdicts_of(auditor)))
    assert worker.counters.get("faces_received") == 1
    assert not auditor.on("/deadletter")


# -- notifier -------------------------------------------------------------------------


VIOLATION_CASES: dict[str, tuple[bytes, str]] = {
    "oversized": (OVERSIZED, "above the"),
    "nan-p-mask": (violation_variant(p_mask=float("nan")), "p_mask"),
    "infinity-latency": (violation_variant(latency_ms=float("inf")), "latency_ms"),
    "schema-2": (violation_variant(schema_version=2), "schema_version 2 is not supported"),
    "png-not-jpeg": (violation_variant(crop_jpeg=_b64(b"\x89PNG\r\n\x1a\n" + b"0" * 64)),
                     "not a JPEG"),
    "context-bomb": (violation_variant(context_jpeg=_b64(BOMB)), "pixels"),
    "zero-size-box": (violation_variant(box={"x1": 10, "y1": 20, "x2": 10, "y2": 60}),
                      "zero-size"),
    "far-future": (violation_variant(captured_at="9999-12-31T23:59:59Z"), "captured_at"),
    "camera-not-topic-camera": (violation_variant(camera="cam2"), "on topic"),
    **{f"camera-{i}": (violation_variant(camera=bad), "camera") for i, bad in enumerate(BAD_IDS)},
    **{f"place-{i}": (violation_variant(place=bad), "place") for i, bad in enumerate(BAD_TEXT)},
    **{f"model-id-{i}": (violation_variant(model_id=bad), "model_id")
       for i, bad in enumerate(BAD_TEXT)},
}


def _mail_files_stay_put(mail_dir: Path) -> None:
    for path in mail_dir.rglob("*"):
        assert path.parent == mail_dir, f"{path} is not directly in {mail_dir}"
        assert re.fullmatch(r"[A-Za-z0-9._-]+\.eml", path.name), path.name


def _header_lines_are_clean(raw: bytes) -> None:
    """Every header line is a header or a folded continuation; no bare CR or LF."""
    head = raw.split(b"\r\n\r\n", 1)[0] if b"\r\n\r\n" in raw else raw.split(b"\n\n", 1)[0]
    for line in re.split(rb"\r?\n", head):
        assert b"\r" not in line
        assert re.match(rb"^([A-Za-z0-9-]+:|[ \t])", line), line
    names = [line.split(b":", 1)[0].lower() for line in re.split(rb"\r?\n", head)
             if line and line[:1] not in (b" ", b"\t")]
    assert b"bcc" not in names and b"x-injected" not in names


@pytest.mark.parametrize("case", sorted(VIOLATION_CASES))
def test_notifier_refuses_hostile_violations_with_a_reason_and_mails_the_next(
    case: str, broker: Broker, tmp_path: Path, sink: MailSink, publisher: Publisher,
    start_notifier: Callable[[NotifierSettings], Notifier],
) -> None:
    payload, reason = VIOLATION_CASES[case]
    sink.start()
    probe = Probe(broker, "auditor", (topics.deadletter(DISTRICT),))
    try:
        notifier = start_notifier(notifier_settings(broker, tmp_path, sink.port))
        publisher.raw(VIOLATION_TOPIC, payload)
        good = make_violation()
        publisher.send(good)

        wait_for(lambda: len(sink.messages()) == 1, what="the good violation's mail")
        assert probe.wait_for(lambda: len(probe.on("/deadletter")) >= 1)
        (letter,) = letters_of(probe)
    finally:
        probe.close()
    assert reason in letter.reason, letter.reason
    assert letter.service == "notifier"
    assert notifier.counters.get("dead_letters") == 1
    assert good.face_id in sink.messages()[0].read_text(encoding="utf-8", errors="replace")
    _mail_files_stay_put(sink.directory)


AWKWARD_PLACES = ("../../../etc/passwd", "<script>alert(1)</script>", '"; rm -rf / #',
                  "Gate 3 \u202eRTL", "Zürich Hauptbahnhof, Gleis 7 \u2014 Süd", "a" * 200,
                  "=?utf-8?b?QmNjOiBldmls?=")


def test_awkward_but_legal_text_reaches_the_mail_without_breaking_headers_or_paths(
    broker: Broker, tmp_path: Path, sink: MailSink, publisher: Publisher,
    start_notifier: Callable[[NotifierSettings], Notifier],
) -> None:
    sink.start()
    outbox = tmp_path / "outbox"
    start_notifier(notifier_settings(broker, tmp_path, sink.port,
                                     outbox_path=outbox / "outbox.sqlite3"))
    sent = [make_violation(place=place, track=n) for n, place in enumerate(AWKWARD_PLACES)]
    for violation in sent:
        publisher.send(violation)
    wait_for(lambda: len(sink.messages()) == len(sent), timeout_s=20, what="every mail")

    _mail_files_stay_put(sink.directory)
    for path in sink.messages():
        _header_lines_are_clean(path.read_bytes())
    subjects = " ".join(str(notifier_tests.read_mail(p)["Subject"]) for p in sink.messages())
    # Text, not markup or paths: it arrives as written (an encoded-word in it is shown
    # decoded by mail readers, but stays inside the Subject header).
    assert "../../../etc/passwd" in subjects and "<script>" in subjects
    assert {p.parent for p in outbox.rglob("*")} == {outbox}
    assert all(p.name.startswith("outbox.sqlite3") for p in outbox.iterdir())


def test_bad_identifiers_never_make_it_into_settings_file_names_or_topics() -> None:
    for bad in BAD_IDS:
        with pytest.raises(SettingsError):
            load_settings(CaptureSettings, None, capture={"camera": bad})
        with pytest.raises(SettingsError):
            load_settings(CaptureSettings, None, district=bad)
        with pytest.raises(ValueError):
            topics.faces("demo", bad)
    # The spool file name is made of the camera alone.
    section = load_settings(CaptureSettings, None, capture={"camera": "gate-1"}).capture
    assert section.spool_file.parent == section.spool_dir


def test_a_dead_letter_keys_only_a_well_formed_face_id() -> None:
    payload = violation_variant(face_id="../" + new_face_id())
    with pytest.raises(MessageError):
        decode(Violation, payload)
    assert face_id_of(payload) is None
