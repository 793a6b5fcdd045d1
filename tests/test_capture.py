"""Capture node on a real broker: sample folder, tracking, spool through a broker outage."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from maskmesh import topics
from maskmesh.brokerconf import capture_user
from maskmesh.bus import Counters
from maskmesh.messages import FaceCrop, ServiceStatus, decode, utc_now
from services.capture import service
from services.capture.detectors import Detection, iou
from services.capture.sample import (
    astronaut_bgr,
    find_face,
    place_in_frame,
    write_sample_images,
)
from services.capture.service import CaptureNode, node_settings
from services.capture.settings import CaptureSection, CaptureSettings
from services.capture.sources import Frame, LiveSource
from services.capture.spool import Spool, SpoolLimits
from services.capture.tracker import Tracker, TrackerConfig

from .conftest import Broker

CAMERA = "cam1"


class Auditor:
    """Reads every message of the district, with a session that outlives a broker restart."""

    def __init__(self, broker: Broker, client_id: str = "test-auditor") -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.username_pw_set("auditor", broker.files.passwords["auditor"])
        self.client.reconnect_delay_set(0.2, 1.0)
        self.faces: list[FaceCrop] = []
        self.status: dict[str, ServiceStatus] = {}
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.district = broker.district
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        self.client.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(5)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not flags.session_present:
            client.subscribe(f"{topics.district_root(self.district)}/#", qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            if msg.topic.endswith("/faces"):
                self.faces.append(decode(FaceCrop, msg.payload))
            elif "/status/" in msg.topic:
                self.status[msg.topic] = decode(ServiceStatus, msg.payload)

    def wait_faces(self, count: int, timeout_s: float = 20.0) -> list[FaceCrop]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len({f.face_id for f in self.faces}) >= count:
                    break
            time.sleep(0.05)
        time.sleep(0.3)  # anything extra (duplicates, strays) shows up too
        with self.lock:
            return list(self.faces)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def settings_for(broker: Broker, tmp_path: Path, **capture: object) -> CaptureSettings:
    section = {"camera": CAMERA, "spool_dir": tmp_path / "spool", "max_fps": None,
               "drain_timeout_s": 20.0, **capture}
    return node_settings(CaptureSettings(
        district=broker.district,
        broker=broker.settings(capture_user(CAMERA)),
        capture=CaptureSection(**section),
        status_interval_s=0.5,
    ))


def write_config(broker: Broker, tmp_path: Path, **capture: object) -> Path:
    creds = broker.settings(capture_user(CAMERA))
    config = {
        "district": broker.district,
        "status_interval_s": 0.5,
        "broker": {"host": creds.host, "port": creds.port, "username": creds.username,
                   "password": broker.files.passwords[capture_user(CAMERA)],
                   "reconnect_min_delay_s": 0.2, "reconnect_max_delay_s": 1.0},
        "capture": {"spool_dir": str(tmp_path / "spool"), "max_fps": None,
                    "drain_timeout_s": 20.0, **capture},
    }
    path = tmp_path / "capture.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_main(argv: list[str]) -> int:
    # In a worker thread, so main() leaves pytest's signal handlers alone.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(service.main, argv).result(timeout=90)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sample")
    write_sample_images(folder)
    return folder


def test_sample_folder_publishes_one_face_per_image(
    broker: Broker, tmp_path: Path, sample_dir: Path
) -> None:
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for image in sorted(sample_dir.iterdir()):
        (scenes / image.name).write_bytes(image.read_bytes())
    (scenes / "99-broken.jpg").write_bytes(b"not a jpeg at all")
    expected = len(list(sample_dir.iterdir()))  # one face in each sample scene

    auditor = Auditor(broker)
    try:
        config = write_config(broker, tmp_path, place="Main gate")
        status = run_main(["--config", str(config), "--source", str(scenes), "--camera", CAMERA])
        assert status == 0
        faces = auditor.wait_faces(expected)
        assert len(faces) == expected
        assert [f.frame for f in faces] == list(range(expected))
        assert len({f.track for f in faces}) == expected  # unrelated photos, own tracks
        for face in faces:
            assert face.camera == CAMERA and face.place == "Main gate"
            assert face.box.fits(face.frame_width, face.frame_height)
            assert face.context_jpeg is not None and face.context_box is not None
            crop = cv2.imdecode(np.frombuffer(face.crop_jpeg, np.uint8), cv2.IMREAD_COLOR)
            # The crop carries the 0.2 margin: larger than the box, clipped to the frame.
            assert crop.shape[1] > face.box.x2 - face.box.x1
            assert face.detector_score > 0.5

        final = auditor.status[topics.status(broker.district, "capture", CAMERA)]
        assert final.state == "offline" and final.instance == CAMERA
        assert final.counters["frames"] == expected
        assert final.counters["faces"] == expected
        assert final.counters["tracks"] == expected
        assert final.counters["unreadable_frames"] == 1
        assert final.counters["spooled"] == 0
        assert "source ended" in (final.detail or "")
    finally:
        auditor.close()


def test_moving_face_in_a_sequence_is_one_track(tmp_path: Path) -> None:
    settings = node_settings(CaptureSettings(capture=CaptureSection(
        camera=CAMERA, spool_dir=tmp_path / "spool", republish_s=5.0)))
    node = CaptureNode(settings)
    face = astronaut_bgr()
    x1, y1, x2, y2 = find_face(face)

    def walk(image: np.ndarray, scale: float, origin: tuple[int, int], frame: Frame) -> int:
        """Process one frame; the track id given to the face where it really is."""
        node.process(frame)
        where = (origin[0] + x1 * scale, origin[1] + y1 * scale,
                 origin[0] + x2 * scale, origin[1] + y2 * scale)
        best = max(node.tracker.tracks.values(), key=lambda t: iou(t.box, where))
        assert iou(best.box, where) > 0.5
        return best.track_id

    start = time.monotonic()
    ids = set()
    for i in range(12):
        # The face walks right and grows a little, at 10 frames a second.
        scale, origin = 0.6 + 0.01 * i, (10 + 15 * i, 60)
        image = place_in_frame(face, scale, origin)
        ids.add(walk(image, scale, origin, Frame(image, i, 0, utc_now(), start + 0.1 * i)))
    assert len(ids) == 1
    assert node.bus.counters.get("frames") == 12

    # The person stays, seen twice a second: after republish_s the best crop goes again.
    standing = place_in_frame(face, 0.72, (190, 60))
    for i in range(12, 24):
        frame = Frame(standing, i, 0, utc_now(), start + 0.5 * (i - 10))
        ids.add(walk(standing, 0.72, (190, 60), frame))
    assert len(ids) == 1
    spooled = [decode(FaceCrop, f.payload) for f in node.spool.pending(0, 100)]
    assert [f.track for f in spooled].count(ids.pop()) == 2
    node.spool.close()


def test_tracker_keeps_two_people_apart_and_expires() -> None:
    tracker: Tracker[int] = Tracker(TrackerConfig(confirm_frames=2, ttl_s=1.0))
    for step in range(5):
        left = Detection((10 + 5 * step, 10, 60 + 5 * step, 70), 0.9)
        right = Detection((300 - 5 * step, 20, 350 - 5 * step, 80), 0.8)
        tracks = tracker.update([left, right], [step, step], now=step * 0.1)
        assert [t.track_id for t in tracks] == [0, 1]
    assert {t.track_id for t in tracker.due(0.5)} == {0, 1}
    tracker.update([], [], now=5.0)
    assert tracker.tracks == {}
    assert tracker.update([Detection((10, 10, 60, 70), 0.9)], [9], now=5.1)[0].track_id == 2


def test_spool_bounds_drop_the_oldest_and_retention_deletes(tmp_path: Path) -> None:
    counters = Counters()
    spool = Spool(tmp_path / "s.sqlite3", SpoolLimits(max_items=3), counters)
    for i in range(5):
        spool.put(f"{i:032x}", "t", b"x" * 100)
    assert counters.get("spool_dropped") == 2
    assert [f.face_id for f in spool.pending(0, 10)] == [f"{i:032x}" for i in (2, 3, 4)]

    by_size = Spool(tmp_path / "b.sqlite3", SpoolLimits(max_mb=0.001), counters)
    for i in range(3):
        by_size.put(f"{i:032x}", "t", b"x" * 600)
    assert len(by_size) == 1 and counters.get("spool_dropped") == 4

    old = Spool(tmp_path / "r.sqlite3", SpoolLimits(retention_s=60), counters)
    old.put("a" * 32, "t", b"photo")
    assert old.expire(now=time.time() + 120) == 1
    assert len(old) == 0 and counters.get("spool_dropped") == 5
    for item in (spool, by_size, old):
        item.close()


@pytest.mark.parametrize("down_at_start", [True, False], ids=["down-at-start", "lost-later"])
def test_faces_survive_a_broker_outage_in_order(
    broker: Broker, tmp_path: Path, sample_dir: Path, down_at_start: bool
) -> None:
    auditor = Auditor(broker, client_id="test-auditor-outage")
    node = None
    try:
        if down_at_start:
            broker.stop()
        node = CaptureNode(settings_for(broker, tmp_path))
        node.open(str(sample_dir))
        node.start()
        if not down_at_start:
            assert node.bus.wait_connected(5)
            broker.stop()
            deadline = time.monotonic() + 5
            while node.bus.connected and time.monotonic() < deadline:
                time.sleep(0.02)
        frames = node.run()
        counters = node.bus.counters
        assert frames == len(list(sample_dir.iterdir()))
        assert counters.get("spooled") == frames and counters.get("faces") == 0
        assert len(node.spool) == frames

        broker.start()
        node.finish("test done")
        assert counters.get("spool_items") == 0 and counters.get("faces") == frames
        faces = auditor.wait_faces(frames)
        distinct: list[str] = []
        for face in faces:
            if face.face_id not in distinct:
                distinct.append(face.face_id)
        assert len(distinct) == frames
        firsts = [next(f.frame for f in faces if f.face_id == fid) for fid in distinct]
        assert firsts == sorted(firsts) == list(range(frames))
    finally:
        if node is not None and node.bus.connected:
            node.bus.stop()
        auditor.close()


def test_full_spool_counts_dropped_faces(broker: Broker, tmp_path: Path, sample_dir: Path) -> None:
    broker.stop()
    node = CaptureNode(settings_for(broker, tmp_path, spool_max_items=2, drain_timeout_s=0.0))
    node.open(str(sample_dir))
    node.start()
    frames = node.run()
    assert node.bus.counters.get("spooled") == frames
    assert node.bus.counters.get("spool_dropped") == frames - 2
    node.finish("test done")
    assert node.bus.counters.get("spool_items") == 2


class FakeCapture:
    """Gives ``frames`` frames, then fails every grab (a camera that went away)."""

    def __init__(self, frames: int, opens: bool = True) -> None:
        self.left = frames
        self.opens = opens

    def isOpened(self) -> bool:  # noqa: N802 - the cv2.VideoCapture API
        return self.opens

    def grab(self) -> bool:
        self.left -= 1
        return self.left >= 0

    def retrieve(self) -> tuple[bool, np.ndarray]:
        return True, np.zeros((48, 64, 3), np.uint8)

    def release(self) -> None:
        pass


def test_live_source_reports_a_stall_and_reopens() -> None:
    captures = iter([FakeCapture(2), FakeCapture(0, opens=False), FakeCapture(3)])
    reports: list[str | None] = []
    source = LiveSource(
        "rtsp://user:secret@camera.invalid/stream",
        on_stall=reports.append,
        reopen_min_s=0.01,
        reopen_max_s=0.05,
        opener=lambda target: next(captures),
    )
    frames = [source.read() for _ in range(5)]
    assert all(f is not None for f in frames)
    assert [f.index for f in frames if f] == [0, 1, 2, 3, 4]
    assert reports[-1] is None  # flowing again
    stalls = [r for r in reports if r is not None]
    assert len(stalls) == 2
    assert "no frame from the source" in stalls[0] and "cannot open" in stalls[1]
    assert all("secret" not in r for r in stalls)
    assert source.reopens == 2


def test_stalled_source_shows_in_status(broker: Broker, tmp_path: Path) -> None:
    auditor = Auditor(broker, client_id="test-auditor-stall")
    node = CaptureNode(settings_for(broker, tmp_path))
    try:
        node.start()
        assert node.bus.wait_connected(5)
        node._on_stall("no frame from the source (camera 0); reopening in 1 s")
        deadline = time.monotonic() + 5
        topic = topics.status(broker.district, "capture", CAMERA)
        while time.monotonic() < deadline:
            status = auditor.status.get(topic)
            if status is not None and status.state == "stalled":
                break
            time.sleep(0.05)
        assert status is not None and status.state == "stalled"
        assert "no frame" in (status.detail or "")
    finally:
        node.finish("test done")
        auditor.close()


def test_bad_settings_exit_2(tmp_path: Path) -> None:
    assert service.main(["--camera", "Bad Name!", "--spool-dir", str(tmp_path)]) == 2
    assert service.main(["--detector", "yunet", "--spool-dir", str(tmp_path)]) == 2


def test_video_file_is_one_track_and_ends(tmp_path: Path) -> None:
    video = tmp_path / "walk.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (640, 480))
    assert writer.isOpened()
    face = astronaut_bgr()
    for i in range(15):
        writer.write(place_in_frame(face, 0.65, (40 + 12 * i, 50)))
    writer.release()

    settings = node_settings(CaptureSettings(capture=CaptureSection(
        camera=CAMERA, spool_dir=tmp_path / "spool", max_fps=None)))
    node = CaptureNode(settings)
    node.open(str(video))
    assert node.source is not None and node.source.finite
    assert node.run() == 15
    assert node.bus.counters.get("tracks") == 1
    assert len(node.spool) == 1  # 1.5 s of video: confirmed once, below republish_s
    node.spool.close()


def test_sigterm_stops_the_node_cleanly(broker: Broker, tmp_path: Path, sample_dir: Path) -> None:
    import signal
    import subprocess
    import sys

    auditor = Auditor(broker, client_id="test-auditor-sigterm")
    config = write_config(broker, tmp_path, max_fps=2.0)
    log = (tmp_path / "capture.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "maskmesh.cli", "capture", "--config", str(config),
         "--source", str(sample_dir), "--camera", CAMERA],
        stdout=log, stderr=log,
    )
    try:
        assert auditor.wait_faces(1, timeout_s=30)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        topic = topics.status(broker.district, "capture", CAMERA)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and auditor.status[topic].state != "offline":
            time.sleep(0.05)
        final = auditor.status[topic]
        assert final.state == "offline" and "stopped after" in (final.detail or "")
        assert final.counters["frames"] < len(list(sample_dir.iterdir()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
        auditor.close()
