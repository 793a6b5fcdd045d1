"""The inference worker against a real broker: verdicts, sharing, dead letters, back-pressure.

A tiny ONNX model built here stands in for the trained one: it averages each colour
channel and calls a green crop "mask", a red one "no_mask" and a blue one "incorrect",
with the same ``maskmesh`` metadata keys as an exported model, so tests are fast and do
not depend on training. The shipped model, when present, gets its own test.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from maskmesh import topics
from maskmesh.brokerconf import capture_user
from maskmesh.messages import (
    Box,
    DeadLetter,
    FaceCrop,
    ServiceStatus,
    Verdict,
    Violation,
    decode,
    encode,
    new_face_id,
    utc_now,
)
from maskmesh.settings import SettingsError, load_settings
from services.inference.classifier import MaskClassifier
from services.inference.pending import PendingQueue, RecentIds
from services.inference.service import InferenceWorker
from services.inference.settings import DEFAULT_MODEL, InferenceSettings

from .conftest import Broker

COLOURS = {"mask": (0, 255, 0), "no_mask": (0, 0, 255), "incorrect": (255, 0, 0)}  # BGR
FAKE_MODEL_ID = "fake-colour-v1"


# -- the fake model -------------------------------------------------------------------


def build_fake_model(path: Path, model_id: str = FAKE_MODEL_ID) -> Path:
    """Write a colour-mean ONNX classifier with exported-model metadata to path."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    # Rows: input channels in RGB order; columns: mask, no_mask, incorrect.
    weights = np.array([[0, 4, 0], [4, 0, 0], [0, 0, 4]], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image"], ["means"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["means", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        "colour_mean",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 3])],
        initializer=[numpy_helper.from_array(weights, "weights")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    metadata = {
        "model_id": model_id,
        "arch": "colour-mean",
        "class_names": ["mask", "no_mask", "incorrect"],
        "mask_class": "mask",
        "input_size": 32,
        "resize": 36,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "color_order": "RGB",
        "scale": 1.0 / 255.0,
        "grayscale": False,
        "face_margin": 0.2,
        "threshold": 0.8,
        "input_name": "image",
        "output_name": "probs",
    }
    helper.set_model_props(model, {"maskmesh": json.dumps(metadata)})
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="session")
def fake_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_model(tmp_path_factory.mktemp("model") / "fake.onnx")


# -- faces and probes -----------------------------------------------------------------


def jpeg(colour: tuple[int, int, int], size: int = 40) -> bytes:
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[:] = colour
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return data.tobytes()


def make_face(label: str = "mask", camera: str = "cam1", district: str = "testdistrict",
              **changes: Any) -> FaceCrop:
    fields: dict[str, Any] = {
        "face_id": new_face_id(),
        "district": district,
        "camera": camera,
        "place": "Main St. entrance",
        "frame": 7,
        "track": 3,
        "captured_at": utc_now() - timedelta(milliseconds=5),
        "frame_width": 640,
        "frame_height": 480,
        "box": Box(x1=10, y1=20, x2=50, y2=60),
        "detector_score": 0.93,
        "crop_jpeg": jpeg(COLOURS[label]),
        "context_jpeg": jpeg((90, 90, 90), 64),
        "context_box": Box(x1=1, y1=2, x2=5, y2=6),
    }
    fields.update(changes)
    return FaceCrop(**fields)


class Probe:
    """A paho client that records every message under its filters."""

    def __init__(self, broker: Broker, user: str, filters: tuple[str, ...] = (),
                 client_id: str | None = None) -> None:
        # With a client id the probe keeps a session, so it misses nothing while away.
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or "",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.reconnect_delay_set(0.2, 1.0)
        self.client.username_pw_set(user, broker.files.passwords[user])
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Condition()
        self._subscribed = threading.Event()
        self._pending_subs = len(filters)
        self._filters = filters
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600 if client_id else 0
        self.client.connect("127.0.0.1", broker.port, clean_start=client_id is None,
                            properties=props)
        self.client.loop_start()
        if filters:
            assert self._subscribed.wait(10), "probe did not subscribe"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        for topic_filter in self._filters:
            client.subscribe(topic_filter, qos=1)
        if not self._filters:
            self._subscribed.set()

    def _on_subscribe(  # noqa: ANN001
        self, client, userdata, mid, reason_codes, properties
    ) -> None:
        self._pending_subs -= 1
        if self._pending_subs <= 0:
            self._subscribed.set()

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._lock.notify_all()

    def on(self, suffix: str) -> list[bytes]:
        with self._lock:
            return [payload for topic, payload in self.messages if topic.endswith(suffix)]

    def wait_for(self, check: Callable[[], bool], timeout_s: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not check():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def verdicts_of(probe: Probe) -> list[Verdict]:
    return [decode(Verdict, p) for p in probe.on("/verdicts")]


def settings_for(broker: Broker, model: Path, worker_id: str = "w1", **section: Any
                 ) -> InferenceSettings:
    return InferenceSettings(
        district=broker.district,
        instance=worker_id,
        broker=broker.settings("inference"),
        status_interval_s=0.5,
        inference={"model_path": model, "worker_id": worker_id, "intra_op_threads": 1,
                   **section},
    )


@pytest.fixture
def auditor(broker: Broker) -> Iterator[Probe]:
    probe = Probe(broker, "auditor", (f"{topics.district_root(broker.district)}/#",))
    yield probe
    probe.close()


@pytest.fixture
def camera(broker: Broker) -> Iterator[Probe]:
    probe = Probe(broker, capture_user("cam1"))
    yield probe
    probe.close()


@pytest.fixture
def start_worker(broker: Broker, fake_model: Path) -> Iterator[Callable[..., InferenceWorker]]:
    workers: list[InferenceWorker] = []

    def start(worker_id: str = "w1", classifier: Any = None, **section: Any) -> InferenceWorker:
        worker = InferenceWorker(settings_for(broker, fake_model, worker_id, **section),
                                 classifier=classifier)
        assert worker.start(wait_s=10)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        if worker.ready():
            worker.stop()


def face_topic(district: str, camera: str = "cam1") -> str:
    return topics.faces(district, camera)


# -- tests ----------------------------------------------------------------------------


def test_each_face_gets_one_valid_verdict_and_violations_carry_the_photos(
    broker: Broker, auditor: Probe, camera: Probe, start_worker: Callable[..., InferenceWorker]
) -> None:
    worker = start_worker()
    faces = [make_face(label) for label in ("mask", "no_mask", "incorrect") * 4]
    for face in faces:
        camera.publish(face_topic(broker.district), encode(face))

    assert auditor.wait_for(lambda: len(auditor.on("/verdicts")) >= len(faces))
    verdicts = {v.face_id: v for v in verdicts_of(auditor)}
    assert len(verdicts) == len(faces) == len(auditor.on("/verdicts"))
    for face in faces:
        verdict = verdicts[face.face_id]
        expected = next(label for label, c in COLOURS.items() if face.crop_jpeg == jpeg(c))
        assert verdict.label == expected
        assert verdict.violation is (expected != "mask")
        assert verdict.threshold == 0.8 and verdict.model_id == FAKE_MODEL_ID
        assert verdict.worker == "w1" and verdict.camera == "cam1"
        assert verdict.latency_ms >= 5.0 and verdict.inference_ms >= 0.0
        assert abs(sum(verdict.probs.values()) - 1.0) < 1e-4

    assert auditor.wait_for(lambda: len(auditor.on("/violations")) >= 8)
    violations = [decode(Violation, p) for p in auditor.on("/violations")]
    assert {v.face_id for v in violations} == {
        f.face_id for f in faces if f.crop_jpeg != jpeg(COLOURS["mask"])
    }
    sample = violations[0]
    source = next(f for f in faces if f.face_id == sample.face_id)
    assert sample.crop_jpeg == source.crop_jpeg and sample.context_jpeg == source.context_jpeg
    assert sample.box == source.box and sample.place == source.place
    assert (sample.frame_width, sample.frame_height) == (640, 480)
    assert sample.p_mask < 0.8

    counters = worker.counters.snapshot()
    assert counters["faces_received"] == 12 and counters["verdicts"] == 12
    assert counters["violations"] == 8 and counters["batches"] >= 1
    assert counters.get("dead_letters", 0) == 0 and counters.get("duplicates", 0) == 0

    status_topic = topics.status(broker.district, "inference", "w1")
    assert auditor.wait_for(
        lambda: any(
            "verdicts" in decode(ServiceStatus, p).counters for p in auditor.on(status_topic)
        ),
        timeout_s=5,
    )
    status = decode(ServiceStatus, auditor.on(status_topic)[-1])
    assert status.state == "online" and "pending" in status.counters
    assert FAKE_MODEL_ID in (status.detail or "")


def test_two_workers_split_the_faces_and_answer_each_once(
    broker: Broker, auditor: Probe, camera: Probe, start_worker: Callable[..., InferenceWorker]
) -> None:
    start_worker("w1")
    start_worker("w2")
    faces = [make_face("no_mask" if i % 3 else "mask") for i in range(40)]
    for face in faces:
        camera.publish(face_topic(broker.district), encode(face))

    assert auditor.wait_for(lambda: len(auditor.on("/verdicts")) >= len(faces))
    time.sleep(0.3)  # anything extra would arrive now
    verdicts = verdicts_of(auditor)
    assert len(verdicts) == len(faces)
    assert {v.face_id for v in verdicts} == {f.face_id for f in faces}
    by_worker = {w: sum(v.worker == w for v in verdicts) for w in ("w1", "w2")}
    assert by_worker["w1"] > 0 and by_worker["w2"] > 0, by_worker


def test_malformed_faces_are_dead_lettered_with_a_reason_and_work_goes_on(
    broker: Broker, auditor: Probe, camera: Probe, start_worker: Callable[..., InferenceWorker]
) -> None:
    worker = start_worker()
    good = json.loads(encode(make_face()))

    def variant(**changes: Any) -> bytes:
        return json.dumps({**good, "face_id": new_face_id(), **changes}).encode()

    corrupt_jpeg = jpeg((0, 255, 0))[:20] + b"\x00" * 200  # a JPEG header, then garbage
    import base64

    cases = {
        "not JSON": b"{this is not json",
        "schema_version": variant(schema_version=99),
        "not a JPEG": variant(crop_jpeg=base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * 50)
                              .decode()),
        "could not be decoded": variant(crop_jpeg=base64.b64encode(corrupt_jpeg).decode()),
        "outside": variant(box={"x1": 600, "y1": 400, "x2": 700, "y2": 470}),
        "detector_score": variant(detector_score=float("nan")),
        "does not match topic camera": variant(camera="cam2"),
    }
    for payload in cases.values():
        camera.publish(face_topic(broker.district), payload)
    last = make_face("no_mask")
    camera.publish(face_topic(broker.district), encode(last))

    assert auditor.wait_for(lambda: len(auditor.on("/deadletter")) >= len(cases))
    assert auditor.wait_for(lambda: any(v.face_id == last.face_id for v in verdicts_of(auditor)))
    letters = [decode(DeadLetter, p) for p in auditor.on("/deadletter")]
    assert len(letters) == len(cases)
    for needle in cases:
        assert any(needle in letter.reason for letter in letters), (needle, letters)
    assert all(letter.service == "inference" and letter.instance == "w1" for letter in letters)
    assert len(verdicts_of(auditor)) == 1
    assert worker.counters.get("dead_letters") == len(cases)
    assert worker.counters.get("faces_received") == len(cases) + 1


class SlowClassifier:
    """Wraps a classifier, sleeping in predict so that faces pile up."""

    def __init__(self, inner: MaskClassifier, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.info = inner.info
        self.model_id = inner.model_id
        self.threshold = inner.threshold
        self.batch_sizes: list[int] = []

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        return self.inner.preprocess(images)

    def predict(self, batch: np.ndarray) -> Any:
        self.batch_sizes.append(len(batch))
        time.sleep(self.delay_s)
        return self.inner.predict(batch)


def test_full_queue_holds_faces_at_the_broker_and_none_is_lost(
    broker: Broker, auditor: Probe, camera: Probe, fake_model: Path,
    start_worker: Callable[..., InferenceWorker],
) -> None:
    slow = SlowClassifier(MaskClassifier(fake_model), delay_s=0.05)
    worker = start_worker(classifier=slow, max_pending=4, max_batch=3, max_wait_ms=5)
    depths: list[int] = []
    original = worker.queue._on_depth  # noqa: SLF001 - observing the gauge's updates

    def record(depth: int) -> None:
        depths.append(depth)
        original(depth)

    worker.queue._on_depth = record  # noqa: SLF001
    faces = [make_face() for _ in range(40)]
    for face in faces:
        camera.publish(face_topic(broker.district), encode(face))

    assert auditor.wait_for(lambda: len(auditor.on("/verdicts")) >= len(faces), timeout_s=30)
    assert {v.face_id for v in verdicts_of(auditor)} == {f.face_id for f in faces}
    assert max(depths) == 4  # the queue filled up, and never went past its bound
    assert max(slow.batch_sizes) == 3 and len(slow.batch_sizes) >= 14
    assert worker.counters.get("pending") == 0


def test_faces_in_flight_across_a_broker_restart_all_get_verdicts(
    broker: Broker, camera: Probe, fake_model: Path,
    start_worker: Callable[..., InferenceWorker],
) -> None:
    watcher = Probe(broker, "auditor", (topics.all_verdicts(broker.district),),
                    client_id="verdict-watcher")
    try:
        slow = SlowClassifier(MaskClassifier(fake_model), delay_s=0.03)
        worker = start_worker(classifier=slow, max_batch=4, max_pending=16)
        faces = [make_face() for _ in range(80)]
        for face in faces:
            camera.publish(face_topic(broker.district), encode(face))
        assert watcher.wait_for(lambda: len(watcher.on("/verdicts")) >= 4)
        broker.restart(down_s=0.5)
        assert watcher.wait_for(
            lambda: {v.face_id for v in verdicts_of(watcher)} >= {f.face_id for f in faces},
            timeout_s=30,
        ), f"{len(verdicts_of(watcher))} verdicts, worker {worker.counters.snapshot()}"
        assert worker.counters.get("reconnects") >= 1
    finally:
        watcher.close()


def test_a_face_seen_twice_is_answered_twice_and_counted(
    broker: Broker, auditor: Probe, camera: Probe, start_worker: Callable[..., InferenceWorker]
) -> None:
    worker = start_worker()
    face = make_face("no_mask")
    for _ in range(2):
        camera.publish(face_topic(broker.district), encode(face))
    assert auditor.wait_for(lambda: len(auditor.on("/verdicts")) >= 2)
    assert {v.face_id for v in verdicts_of(auditor)} == {face.face_id}
    assert worker.counters.get("duplicates") == 1
    assert worker.counters.get("verdicts") == 2


def test_threshold_setting_overrides_the_model_default(
    broker: Broker, auditor: Probe, camera: Probe, start_worker: Callable[..., InferenceWorker]
) -> None:
    start_worker(threshold=1.0)  # nothing is ever certain enough: every face violates
    face = make_face("mask")
    camera.publish(face_topic(broker.district), encode(face))
    assert auditor.wait_for(lambda: len(auditor.on("/violations")) >= 1)
    verdict = verdicts_of(auditor)[0]
    assert verdict.label == "mask" and verdict.violation and verdict.threshold == 1.0


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"{DEFAULT_MODEL} not exported yet")
def test_the_shipped_model_gives_valid_verdicts(
    broker: Broker, auditor: Probe, camera: Probe, start_worker: Callable[..., InferenceWorker]
) -> None:
    model = MaskClassifier(DEFAULT_MODEL)
    start_worker(classifier=model)
    faces = [make_face(label) for label in COLOURS]
    for face in faces:
        camera.publish(face_topic(broker.district), encode(face))
    assert auditor.wait_for(lambda: len(auditor.on("/verdicts")) >= len(faces), timeout_s=30)
    verdicts = verdicts_of(auditor)
    assert {v.face_id for v in verdicts} == {f.face_id for f in faces}
    assert all(v.model_id == model.model_id for v in verdicts)
    assert all(v.threshold == model.threshold for v in verdicts)


# -- settings and building blocks -----------------------------------------------------


def test_settings_merge_yaml_environment_and_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "inference.yaml"
    config.write_text(
        "district: north\ninstance: host-a\n"
        "inference:\n  max_batch: 8\n  worker_id: a1\n  model_path: /yaml/model.onnx\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("MASKMESH_INFERENCE__MAX_WAIT_MS", "25")
    settings = load_settings(
        InferenceSettings, config, inference={"model_path": Path("/flag/model.onnx")}
    )
    section = settings.inference
    assert section.model_path == Path("/flag/model.onnx")
    assert (section.max_batch, section.max_wait_ms, settings.worker_id) == (8, 25.0, "a1")
    assert section.threshold is None and settings.worker_id_is_stable
    assert settings.intra_op_threads >= 1

    monkeypatch.setenv("MASKMESH_MODEL", "/env/model.onnx")
    bare = load_settings(InferenceSettings, None)
    assert bare.inference.model_path == Path("/env/model.onnx")
    assert not bare.worker_id_is_stable and bare.worker_id == bare.instance

    config.write_text("inference:\n  max_batch: 0\n  worker_id: Bad/Id\n", encoding="utf-8")
    with pytest.raises(SettingsError) as error:
        load_settings(InferenceSettings, config)
    assert "inference.max_batch" in str(error.value)
    assert "inference.worker_id" in str(error.value)


def test_pending_queue_batches_by_size_and_by_age() -> None:
    queue: PendingQueue[tuple[int, float]] = PendingQueue(10, arrived_at=lambda item: item[1])
    for i in range(5):
        assert queue.put((i, time.monotonic()))
    assert [i for i, _ in queue.take_batch(3, max_wait_s=1.0, idle_s=0.1)] == [0, 1, 2]
    started = time.monotonic()
    assert [i for i, _ in queue.take_batch(3, max_wait_s=0.05, idle_s=0.1)] == [3, 4]
    assert time.monotonic() - started < 0.5
    assert queue.take_batch(3, max_wait_s=0.05, idle_s=0.05) == []
    queue.put((9, time.monotonic()))
    assert [i for i, _ in queue.close()] == [9]
    assert not queue.put((10, time.monotonic()))


def test_pending_queue_put_waits_while_full() -> None:
    queue: PendingQueue[int] = PendingQueue(2, arrived_at=lambda item: 0.0)
    queue.put(1)
    queue.put(2)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (queue.put(3), done.set()))
    thread.start()
    assert not done.wait(0.2)
    assert queue.take_batch(1, 0.0, 0.1) == [1]
    assert done.wait(2)
    thread.join()
    assert len(queue) == 2


def test_recent_ids_forget_after_the_window() -> None:
    recent = RecentIds(window_s=10.0, limit=3)
    assert not recent.seen_before("a", now=0.0)
    assert recent.seen_before("a", now=5.0)
    assert not recent.seen_before("a", now=20.0)
    for key in "bcd":
        recent.seen_before(key, now=21.0)
    assert not recent.seen_before("a", now=21.5)  # pushed out by the limit


def test_onnxruntime_telemetry_is_off_before_the_runtime_starts() -> None:
    """A fresh interpreter that loads the classifier has ORT_DISABLE_TELEMETRY=1 set."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    code = ("import sys, os; import services.inference.classifier; "
            "assert 'onnxruntime' in sys.modules; print(os.environ['ORT_DISABLE_TELEMETRY'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "1"
    code = "import os, training.export; print(os.environ['ORT_DISABLE_TELEMETRY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "1"
