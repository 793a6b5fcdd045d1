"""Fuzzing the one door from payload to model, and the services' message handlers.

``decode`` must return the model or raise ``MessageError`` with a reason, whatever the
bytes. The inference worker's and the notifier's handlers, called directly with paho
``MQTTMessage`` objects, must never raise: every message ends either in its normal
outcome (a verdict, an outbox row) or in a dead letter that is itself a valid
``DeadLetter`` with a reason, and is acknowledged. Cases that once failed are kept as
``@example``s and plain tests.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from maskmesh import topics
from maskmesh.messages import (
    DeadLetter,
    FaceCrop,
    MessageError,
    ServiceStatus,
    Verdict,
    Violation,
    decode,
    encode,
    jpeg_size,
    utc_now,
)
from maskmesh.settings import BrokerSettings
from services.inference.service import InferenceWorker
from services.inference.settings import InferenceSettings
from services.notifier.channels import Outcome
from services.notifier.service import Notifier
from services.notifier.settings import NotifierSettings

from .conftest import DISTRICT, free_port
from .test_inference import build_fake_model, make_face
from .test_notifier import make_violation

FUZZ = settings(
    max_examples=200, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

MODELS: tuple[type[BaseModel], ...] = (FaceCrop, Verdict, Violation, ServiceStatus, DeadLetter)

# Cases that once escaped ``decode`` as something other than MessageError.
DEEP_ARRAY = b"[" * 100_000
DEEP_OBJECT = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
HUGE_INT = b'{"schema_version": 1, "frame": ' + b"7" * 5000 + b"}"


def _valid_samples() -> dict[type[BaseModel], BaseModel]:
    face = make_face("no_mask")
    violation = make_violation()
    now = utc_now()
    status = ServiceStatus(
        district=DISTRICT, service="inference", instance="w1", state="online",
        started_at=now, updated_at=now, counters={"verdicts": 3}, version="0.1",
    )
    letter = DeadLetter(
        district=DISTRICT, service="notifier", instance="n1", source_topic="a/b",
        reason="bad", received_at=now, payload_bytes=3, payload_excerpt="abc",
    )
    verdict = Verdict(**violation.model_dump(include=set(Verdict.model_fields)))
    return {FaceCrop: face, Verdict: verdict, Violation: violation, ServiceStatus: status,
            DeadLetter: letter}


SAMPLES = _valid_samples()
SAMPLE_JSON = {model: json.loads(encode(sample)) for model, sample in SAMPLES.items()}
# Dates that once overflowed on conversion to UTC.
EXTREME_TIMES = ("9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00",
                 "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z")

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def check_decode(model: type[BaseModel], payload: bytes) -> BaseModel | None:
    """decode's contract: the model, or MessageError with a non-empty reason."""
    try:
        message = decode(model, payload)
    except MessageError as exc:
        assert isinstance(exc.reason, str) and exc.reason.strip()
        return None
    assert isinstance(message, model)
    return message


@st.composite
def mutated(draw: st.DrawFn, model: type[BaseModel], base: dict[str, Any] | None = None
            ) -> bytes:
    """A valid message of ``model`` (or ``base``) with fields replaced, removed or added."""
    data = json.loads(json.dumps(base if base is not None else SAMPLE_JSON[model]))
    keys = sorted(data)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(("replace", "delete", "add", "time", "nest")))
        key = draw(st.sampled_from(keys))
        if action == "replace":
            data[key] = draw(json_values)
        elif action == "delete":
            data.pop(key, None)
        elif action == "add":
            data[draw(st.text(max_size=10))] = draw(json_values)
        elif action == "time":
            data[key] = draw(st.sampled_from(EXTREME_TIMES))
        elif isinstance(data.get(key), dict) and data[key]:
            inner = draw(st.sampled_from(sorted(data[key])))
            data[key][inner] = draw(json_values)
    text = json.dumps(data, allow_nan=True)
    return text.encode("utf-8")


@st.composite
def byte_mutated(draw: st.DrawFn, model: type[BaseModel]) -> bytes:
    """A valid message's bytes with a few bytes flipped, cut or inserted."""
    payload = bytearray(encode(SAMPLES[model]))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(payload) - 1))
        action = draw(st.sampled_from(("flip", "cut", "insert")))
        if action == "flip":
            payload[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del payload[at:at + draw(st.integers(1, 64))]
        else:
            payload[at:at] = draw(st.binary(min_size=1, max_size=8))
        if not payload:
            break
    return bytes(payload)


# -- decode ---------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [DEEP_ARRAY, DEEP_OBJECT, HUGE_INT],
                         ids=["deep-array", "deep-object", "huge-int"])
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_decode_refuses_pathological_json_with_a_reason(
    model: type[BaseModel], payload: bytes
) -> None:
    with pytest.raises(MessageError) as caught:
        decode(model, payload)
    assert caught.value.reason


@pytest.mark.parametrize("when", EXTREME_TIMES)
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_decode_refuses_times_outside_the_supported_range(
    model: type[BaseModel], when: str
) -> None:
    key = "captured_at" if "captured_at" in SAMPLE_JSON[model] else (
        "updated_at" if model is ServiceStatus else "received_at"
    )
    payload = json.dumps({**SAMPLE_JSON[model], key: when}).encode()
    with pytest.raises(MessageError) as caught:
        decode(model, payload)
    assert key in caught.value.reason


@FUZZ
@given(model=st.sampled_from(MODELS), payload=st.binary(max_size=600))
@example(model=FaceCrop, payload=DEEP_ARRAY)
@example(model=Violation, payload=HUGE_INT)
@example(model=FaceCrop, payload=b"\xef\xbb\xbf{}")
@example(model=FaceCrop, payload=b"\xff\xfe{\x00}\x00")
def test_decode_of_arbitrary_bytes_is_a_model_or_a_reason(
    model: type[BaseModel], payload: bytes
) -> None:
    check_decode(model, payload)


@FUZZ
@given(model=st.sampled_from(MODELS), value=json_values)
@example(model=FaceCrop, value={"schema_version": 1.0})
@example(model=FaceCrop, value={"schema_version": True})
@example(model=Verdict, value={"schema_version": float("nan")})
def test_decode_of_arbitrary_json_is_a_model_or_a_reason(
    model: type[BaseModel], value: Any
) -> None:
    check_decode(model, json.dumps(value, allow_nan=True).encode())


@FUZZ
@given(data=st.data(), model=st.sampled_from(MODELS))
def test_decode_of_mutated_messages_is_a_model_or_a_reason(
    data: st.DataObject, model: type[BaseModel]
) -> None:
    message = check_decode(model, data.draw(mutated(model)))
    if message is not None:
        # Whatever got through is a message that encodes and decodes to itself.
        assert decode(model, encode(message)) == message


@FUZZ
@given(data=st.data(), model=st.sampled_from(MODELS))
def test_decode_of_byte_mutated_messages_is_a_model_or_a_reason(
    data: st.DataObject, model: type[BaseModel]
) -> None:
    check_decode(model, data.draw(byte_mutated(model)))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_valid_messages_survive_the_round_trip(model: type[BaseModel]) -> None:
    assert decode(model, encode(SAMPLES[model])) == SAMPLES[model]


# -- handlers -------------------------------------------------------------------------


class _Published:
    """Stands in for paho's MQTTMessageInfo: already PUBACKed."""

    rc = mqtt.MQTT_ERR_SUCCESS

    def is_published(self) -> bool:
        return True

    def wait_for_publish(self, timeout: float | None = None) -> None:
        return None


@dataclass
class Recorder:
    """What a handler published and acknowledged, in place of the broker."""

    published: list[tuple[str, bytes]] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, topic: str, payload: bytes, qos: int = 1,
                retain: bool = False) -> _Published:
        with self.lock:
            self.published.append((topic, bytes(payload)))
        return _Published()

    def ack(self, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.acked.append(msg.mid)

    def take(self) -> tuple[list[tuple[str, bytes]], list[int]]:
        with self.lock:
            out = (self.published, self.acked)
            self.published, self.acked = [], []
        return out


def message(topic: str, payload: bytes, mid: int = 1) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(mid=mid, topic=topic.encode("utf-8"))
    msg.payload = payload
    msg.qos = 1
    return msg


def dead_letters(published: list[tuple[str, bytes]]) -> list[DeadLetter]:
    """Every dead letter published, each a valid DeadLetter with a reason."""
    letters = [decode(DeadLetter, p) for t, p in published if t == topics.deadletter(DISTRICT)]
    for letter in letters:
        assert letter.reason.strip()
        assert letter.payload_bytes >= 0 and len(letter.payload_excerpt) <= 512
    return letters


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InferenceWorker, Recorder]]:
    model = build_fake_model(tmp_path_factory.mktemp("fuzz-model") / "fake.onnx")
    settings_ = InferenceSettings(
        district=DISTRICT, instance="fuzz",
        broker=BrokerSettings(host="127.0.0.1", port=free_port()),
        inference={"model_path": model, "worker_id": "fuzz", "intra_op_threads": 1},
    )
    instance = InferenceWorker(settings_)
    recorder = Recorder()
    # Never connected: the handlers' publishes and acks go to the recorder instead.
    instance.bus.publish = recorder.publish  # type: ignore[method-assign]
    instance.bus.ack = recorder.ack  # type: ignore[method-assign]
    yield instance, recorder


def run_inference(worker: InferenceWorker, recorder: Recorder, topic: str,
                  payload: bytes) -> tuple[list[tuple[str, bytes]], list[DeadLetter]]:
    """One faces message through on_face and the worker's batch step."""
    worker.on_face(message(topic, payload))
    batch = worker.queue.take_batch(32, 0.0, 0.0)
    worker._process(batch)
    awaiting, worker._awaiting = worker._awaiting, []
    published, _ = recorder.take()
    letters = dead_letters(published)
    outcomes = [t.rsplit("/", 1)[-1] for t, _ in published]
    if letters:
        assert outcomes == ["deadletter"], outcomes
    else:
        assert outcomes in (["verdicts"], ["verdicts", "violations"]), outcomes
        decode(Verdict, published[0][1])
    # Every message waits for its acknowledgement once its publishes are done.
    assert len(awaiting) == 1
    return published, letters


FACE_TOPIC = topics.faces(DISTRICT, "cam1")
face_topics = st.sampled_from([FACE_TOPIC, topics.faces(DISTRICT, "cam2"),
                               "maskmesh/v1/other/cam1/faces", "maskmesh/v1/x/faces"])


@FUZZ
@given(payload=st.binary(max_size=400) | st.builds(
    lambda v: json.dumps(v, allow_nan=True).encode(), json_values), topic=face_topics)
@example(payload=DEEP_ARRAY, topic=FACE_TOPIC)
@example(payload=HUGE_INT, topic=FACE_TOPIC)
def test_inference_handler_dead_letters_arbitrary_payloads(
    worker: tuple[InferenceWorker, Recorder], payload: bytes, topic: str
) -> None:
    run_inference(*worker, topic, payload)


@FUZZ
@given(data=st.data())
def test_inference_handler_answers_or_dead_letters_mutated_faces(
    worker: tuple[InferenceWorker, Recorder], data: st.DataObject
) -> None:
    payload = data.draw(mutated(FaceCrop) | byte_mutated(FaceCrop))
    run_inference(*worker, FACE_TOPIC, payload)


def test_inference_handler_answers_a_valid_face(
    worker: tuple[InferenceWorker, Recorder]
) -> None:
    published, letters = run_inference(*worker, FACE_TOPIC, encode(make_face("no_mask")))
    assert not letters and len(published) == 2


class _IdleChannel:
    name = "email"

    def send_alert(self, alert: Any) -> Outcome:
        return Outcome("temporary", "not sending in fuzz tests")

    def send_digest(self, alerts: Any) -> Outcome:
        return self.send_alert(alerts[0])


@pytest.fixture(scope="module")
def notifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Notifier, Recorder]]:
    folder = tmp_path_factory.mktemp("fuzz-notifier")
    settings_ = NotifierSettings(
        district=DISTRICT, instance="fuzz",
        broker=BrokerSettings(host="127.0.0.1", port=free_port()),
        notifier={"outbox_path": folder / "outbox.sqlite3", "camera_cooldown_s": 0.0},
    )
    instance = Notifier(settings_, channels=[_IdleChannel()])
    recorder = Recorder()
    instance.bus.publish = recorder.publish  # type: ignore[method-assign]
    instance.bus.ack = recorder.ack  # type: ignore[method-assign]
    instance._accepting.set()
    yield instance, recorder
    instance.outbox.close()


def run_notifier(notifier: Notifier, recorder: Recorder, topic: str,
                 payload: bytes) -> list[DeadLetter]:
    received = notifier.counters.get("violations_received")
    notifier._on_violation(message(topic, payload, mid=7))
    published, acked = recorder.take()
    letters = dead_letters(published)
    # Every message is acknowledged once, after it was filed or dead-lettered.
    assert acked == [7]
    filed = notifier.counters.get("violations_received") - received
    assert (len(letters), filed) in ((1, 0), (0, 1)), (letters, filed)
    return letters


VIOLATION_TOPIC = topics.violations(DISTRICT, "cam1")


@FUZZ
@given(payload=st.binary(max_size=400) | st.builds(
    lambda v: json.dumps(v, allow_nan=True).encode(), json_values))
@example(payload=DEEP_OBJECT)
@example(payload=HUGE_INT)
def test_notifier_handler_dead_letters_arbitrary_payloads(
    notifier: tuple[Notifier, Recorder], payload: bytes
) -> None:
    run_notifier(*notifier, VIOLATION_TOPIC, payload)


@FUZZ
@given(data=st.data())
def test_notifier_handler_files_or_dead_letters_mutated_violations(
    notifier: tuple[Notifier, Recorder], data: st.DataObject
) -> None:
    # A fresh face id each time, so that a mutation that keeps the message valid files
    # a new row instead of counting as a duplicate.
    base = json.loads(encode(make_violation()))
    payload = data.draw(mutated(Violation, base) | byte_mutated(Violation))
    run_notifier(*notifier, VIOLATION_TOPIC, payload)


@FUZZ
@given(rest=st.binary(max_size=300))
@example(rest=b"\xff\xc0\x00")
@example(rest=b"\xff\xc0\x00\x11\x08\x3e\x80\x3e\x80")
@example(rest=b"\xff\xe0\x00\x00")
def test_jpeg_size_reads_any_header_without_raising(rest: bytes) -> None:
    size = jpeg_size(b"\xff\xd8" + rest)
    assert size is None or (len(size) == 2 and all(0 <= n < 65536 for n in size))
