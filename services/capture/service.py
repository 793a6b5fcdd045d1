"""The capture node: frames in, one FaceCrop per person (and again now and then) out.

Each frame goes through the face detector and the tracker. A confirmed track publishes
its best crop at once and then at most every ``republish_s``, so a person standing in
front of the camera is one face message every few seconds, not thirty a second, and a
mask pulled down later is still seen. Faces go through the on-disk spool, which keeps
them across broker outages until their PUBACK.

``maskmesh capture --config node.yaml --source rtsp://... --camera gate1``
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import cv2

from maskmesh import topics
from maskmesh.brokerconf import capture_user
from maskmesh.bus import Bus
from maskmesh.logs import configure_logging
from maskmesh.messages import Box, FaceCrop, encode, new_face_id
from maskmesh.observability import check_metrics_port
from maskmesh.settings import SettingsError, load_settings
from services.capture.crops import EncodeError, context_photo, crop_face, jpeg, scale_box
from services.capture.detectors import Detection, Detector, DetectorError, make_detector
from services.capture.settings import CaptureSection, CaptureSettings
from services.capture.sources import (
    FolderSource,
    Frame,
    FrameSource,
    SourceError,
    open_source,
)
from services.capture.spool import Spool, SpoolLimits, SpoolSender
from services.capture.tracker import Track, Tracker, TrackerConfig

logger = logging.getLogger(__name__)

SERVICE = "capture"
STOP_DRAIN_S = 5.0
COUNTERS = (
    "frames",
    "faces",
    "detections",
    "tracks",
    "spooled",
    "spool_dropped",
    "unreadable_frames",
    "spool_write_errors",
    "dead_letters",
    "reconnects",
)


@dataclass(frozen=True)
class Sighting:
    """One detection with the frame it was seen in (kept while it is a track's best)."""

    frame: Frame
    detection: Detection


def build_detector(section: CaptureSection) -> Detector:
    """The detector the settings ask for."""
    return make_detector(
        section.detector,
        section.detector_model,
        section.score_threshold,
        section.min_face_px,
        section.detector_pad_ratio,
    )


class CaptureNode:
    """Runs one camera: reads frames, detects, tracks and publishes faces.

    settings: the node's settings; ``settings.instance`` should be the camera name.
    detector: the face detector (built from the settings when None).
    stop: set to end the run; the source stops at the next frame.
    """

    def __init__(
        self,
        settings: CaptureSettings,
        detector: Detector | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.section = settings.capture
        self.stop_event = stop or threading.Event()
        self.detector = detector or build_detector(self.section)
        client_id = f"capture-{settings.district}-{self.section.camera}"
        self.bus = Bus(settings, SERVICE, client_id=client_id)
        for name in COUNTERS:
            self.bus.counters.add(name, 0)  # every counter shows in the status from the start
        limits = SpoolLimits(
            self.section.spool_max_items, self.section.spool_max_mb, self.section.retention_s
        )
        self.spool = Spool(self.section.spool_file, limits, self.bus.counters)
        self.sender = SpoolSender(self.bus, self.spool)
        self.topic = topics.faces(settings.district, self.section.camera)
        # Track ids go on from where the last run of this camera stopped (about): the
        # notifier's cool-down takes one (camera, track) for one person, so ids that
        # started again at 0 after a restart made a new person's alert a "repeat".
        # Limitation: a clock set back across a restart (a Pi without a real-time clock,
        # before NTP) can bring back ids of the last run.
        self._first_track = time.time_ns() // 1_000_000
        self.tracker: Tracker[Sighting] = Tracker(
            self._tracker_config(confirm_frames=None), self._first_track
        )
        self.source: FrameSource | None = None
        self._scene: int | None = None
        self._last_frame_at = time.monotonic()
        self._context_cache: tuple[int, bytes, float, int, int] | None = None
        self._status_thread = threading.Thread(
            target=self._status_loop, name="capture-status", daemon=True
        )
        self._observability: object | None = None

    def _tracker_config(self, confirm_frames: int | None) -> TrackerConfig:
        return TrackerConfig(
            iou_threshold=self.section.track_iou,
            confirm_frames=confirm_frames or self.section.confirm_frames,
            republish_s=self.section.republish_s,
            ttl_s=self.section.track_ttl_s,
        )

    # -- life cycle -------------------------------------------------------------------

    def open(self, spec: str) -> FrameSource:
        """Open the source; a folder of unrelated photos publishes each face at once."""
        source = open_source(
            spec,
            self.section.max_fps,
            sequence=self.section.sequence,
            on_stall=self._on_stall,
            stop=self.stop_event,
            reopen_min_s=self.section.reopen_min_s,
            reopen_max_s=self.section.reopen_max_s,
        )
        if isinstance(source, FolderSource) and not self.section.sequence:
            self.tracker = Tracker(self._tracker_config(confirm_frames=1), self._first_track)
        self.source = source
        return source

    def start(self, connect_wait_s: float = 2.0) -> None:
        """Connect to the broker (in the background) and start the spool sender."""
        if not self.bus.start(wait_s=connect_wait_s):
            logger.warning(
                "broker %s:%s not reachable yet; faces wait in the spool %s",
                self.settings.broker.host,
                self.settings.broker.port,
                self.spool.path,
            )
        self.sender.start()
        self._status_thread.start()
        try:
            from maskmesh.observability import start_observability
        except ImportError:  # the endpoint is optional; the counters still reach status
            return
        self._observability = start_observability(
            self.settings, self.bus, SERVICE, ready=self.ready
        )

    def ready(self) -> bool:
        """The source is open and frames keep coming (not stalled)."""
        return self.source is not None and self.bus.state != "stalled"

    def run(self) -> int:
        """Process frames until the source ends or ``stop`` is set; returns frames read."""
        assert self.source is not None, "open() a source first"
        source = self.source
        frames = 0
        while not self.stop_event.is_set():
            frame = source.read()
            self._count_unreadable(source)
            if frame is None:
                break
            frames += 1
            try:
                self.process(frame)
            except cv2.error as exc:
                # One odd frame (a codec glitch) must not end the node.
                self.bus.counters.add("unreadable_frames")
                logger.warning("skipped frame %d: OpenCV failed on it (%s)", frame.index, exc)
        return frames

    def finish(self, reason: str, drain_s: float | None = None) -> None:
        """Wait for the spool to empty (bounded), then publish the final status.

        drain_s: longest wait for the spool; defaults to ``drain_timeout_s``. What is
        left stays on disk and goes out at the next start.
        """
        drain_s = self.section.drain_timeout_s if drain_s is None else drain_s
        if not self.sender.drain(drain_s):
            logger.warning(
                "%d faces stay in the spool %s for the next start (broker away, or no "
                "inference worker subscribed, for %g s)",
                len(self.spool),
                self.spool.path,
                drain_s,
            )
        self.sender.stop()
        self.bus.counters.set("spool_items", len(self.spool))
        self.bus.detail = reason
        self.stop_event.set()
        if self._status_thread.is_alive():
            self._status_thread.join(timeout=2)
        stop_obs = getattr(self._observability, "stop", None)
        if stop_obs is not None:
            stop_obs()
        self.bus.stop("offline")
        self.spool.close()
        if self.source is not None:
            self.source.close()
        counts = self.bus.counters.snapshot()
        logger.info(
            "capture %s stopped (%s): %d frames, %d faces published, %d spooled, %d dropped",
            self.section.camera,
            reason,
            counts.get("frames", 0),
            counts.get("faces", 0),
            counts.get("spooled", 0),
            counts.get("spool_dropped", 0),
        )

    # -- per frame --------------------------------------------------------------------

    def process(self, frame: Frame) -> int:
        """Detect, track and publish what is due for one frame; returns faces submitted."""
        started = time.monotonic()
        self._last_frame_at = started
        if self.bus.state == "stalled":
            self.bus.detail = None
            self.bus.publish_status("online")
        counters = self.bus.counters
        counters.add("frames")
        if frame.scene != self._scene:
            if self._scene is not None:
                self.tracker.reset()
            self._scene = frame.scene

        detections = self.detector.detect(frame.image)
        counters.add("detections", len(detections))
        created = self.tracker.created
        self.tracker.update(detections, [Sighting(frame, d) for d in detections], frame.clock_s)
        counters.add("tracks", self.tracker.created - created)

        submitted = 0
        for track in self.tracker.due(frame.clock_s):
            if self._publish(track):
                submitted += 1
            self.tracker.mark_published(track, frame.clock_s)
        _observe("capture_frame", time.monotonic() - started)
        return submitted

    def _publish(self, track: Track[Sighting]) -> bool:
        assert track.best is not None
        sighting = track.best[1]
        try:
            face = self.make_face(sighting, track.track_id)
        except (EncodeError, ValueError) as exc:
            logger.warning("could not build a face message for track %d: %s", track.track_id, exc)
            return False
        self.sender.submit(face.face_id, self.topic, encode(face))
        logger.debug(
            "face %s of track %d submitted",
            face.face_id,
            track.track_id,
            extra={
                "face_id": face.face_id,
                "camera": face.camera,
                "track": face.track,
                "district": face.district,
            },
        )
        return True

    def make_face(self, sighting: Sighting, track_id: int) -> FaceCrop:
        """The FaceCrop message for one sighting: crop with margin, context photo."""
        frame, det = sighting.frame, sighting.detection
        height, width = frame.image.shape[:2]
        crop = crop_face(frame.image, det.box, self.section.crop_margin)
        context_jpeg, context_box = None, None
        if self.section.context:
            context_jpeg, scale, cw, ch = self._context(frame)
            context_box = _box(scale_box(det.box, scale, cw, ch))
        return FaceCrop(
            face_id=new_face_id(),
            district=self.settings.district,
            camera=self.section.camera,
            place=self.section.place,
            frame=frame.index,
            track=track_id,
            captured_at=frame.captured_at,
            frame_width=width,
            frame_height=height,
            box=_box(det.box),
            detector_score=det.score,
            crop_jpeg=jpeg(crop, self.section.crop_jpeg_quality),
            context_jpeg=context_jpeg,
            context_box=context_box,
        )

    def _context(self, frame: Frame) -> tuple[bytes, float, int, int]:
        # Several faces of one frame share one encoded context photo.
        cached = self._context_cache
        if cached is not None and cached[0] == frame.index:
            return cached[1], cached[2], cached[3], cached[4]
        small, scale = context_photo(frame.image, self.section.context_max_side_px)
        data = jpeg(small, self.section.context_jpeg_quality)
        self._context_cache = (frame.index, data, scale, small.shape[1], small.shape[0])
        return data, scale, small.shape[1], small.shape[0]

    def _count_unreadable(self, source: FrameSource) -> None:
        seen = self.bus.counters.get("unreadable_frames")
        if source.unreadable > seen:
            self.bus.counters.add("unreadable_frames", source.unreadable - seen)

    # -- status -----------------------------------------------------------------------

    def _on_stall(self, detail: str | None) -> None:
        if detail is None:
            self.bus.detail = None
            self.bus.publish_status("online")
        elif self.bus.state != "stalled" or self.bus.detail != detail:
            self.bus.publish_status("stalled", detail)

    def _status_loop(self) -> None:
        interval = self.settings.status_interval_s
        while not self.stop_event.wait(interval):
            self.bus.counters.set("spool_items", len(self.spool))
            source = self.source
            idle_s = time.monotonic() - self._last_frame_at
            if (source is not None and not source.finite and self.bus.state != "stalled"
                    and idle_s > self.section.stall_after_s):
                logger.warning("no frame from %s for %.0f s", source.description, idle_s)
                self.bus.publish_status(
                    "stalled", f"no frame from {source.description} for {idle_s:.0f} s"
                )
                continue
            self.bus.publish_status()


def _observe(name: str, seconds: float) -> None:
    try:
        from maskmesh.observability import observe
    except ImportError:  # the endpoint is optional; the counters still reach status
        return
    observe(name, seconds)


def _box(box: tuple[int, int, int, int]) -> Box:
    return Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3])


def node_settings(settings: CaptureSettings) -> CaptureSettings:
    """The settings as a node runs them: instance = camera, MQTT user capture-{camera}."""
    camera = settings.capture.camera
    update: dict[str, object] = {"instance": camera}
    if settings.broker.username is None:
        update["broker"] = settings.broker.model_copy(update={"username": capture_user(camera)})
    return settings.model_copy(update=update)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="maskmesh capture", description="Run a capture node.")
    parser.add_argument("--config", type=Path, help="YAML settings file (or MASKMESH_CONFIG)")
    parser.add_argument("--source", help="webcam index, RTSP/HTTP URL, video, image or folder")
    parser.add_argument("--camera", help="camera name (capture.camera)")
    parser.add_argument("--place", help="camera location text (capture.place)")
    parser.add_argument("--max-fps", type=float, help="frame-rate cap (capture.max_fps)")
    parser.add_argument("--detector", choices=["res10", "yunet"], help="capture.detector")
    parser.add_argument("--detector-model", type=Path, help="capture.detector_model")
    parser.add_argument("--spool-dir", type=Path, help="capture.spool_dir")
    parser.add_argument("--sequence", action="store_true", default=None,
                        help="a folder's images are frames of one scene (capture.sequence)")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    """``maskmesh capture``: 0 after a clean end, 1 when it cannot run, 2 for bad settings."""
    args = _parse(argv)
    section = {
        "source": args.source,
        "camera": args.camera,
        "place": args.place,
        "max_fps": args.max_fps,
        "detector": args.detector,
        "detector_model": args.detector_model,
        "spool_dir": args.spool_dir,
        "sequence": args.sequence,
    }
    section = {key: value for key, value in section.items() if value is not None}
    try:
        settings = node_settings(
            load_settings(CaptureSettings, args.config, capture=section or None)
        )
        # An unreadable password file is a settings error, not a traceback at connect.
        settings.broker.resolved_password()
        check_metrics_port(settings)
    except SettingsError as exc:
        print(f"maskmesh capture: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)

    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("received %s; sending what the spool holds", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    sample_dir: Path | None = None
    spec = settings.capture.source
    if spec is None:
        from services.capture.sample import write_sample_images

        sample_dir = Path(tempfile.mkdtemp(prefix="maskmesh-sample-"))
        write_sample_images(sample_dir)
        spec = str(sample_dir)
        logger.info("no source given; running on the sample scenes in %s", sample_dir)
    try:
        return _run(settings, spec, stop)
    finally:
        if sample_dir is not None:
            shutil.rmtree(sample_dir, ignore_errors=True)


def _run(settings: CaptureSettings, spec: str, stop: threading.Event) -> int:
    try:
        node = CaptureNode(settings, stop=stop)
    except DetectorError as exc:
        logger.error("cannot load the face detector: %s", exc)
        return 1
    except (sqlite3.Error, OSError) as exc:
        # A corrupt spool file or an unusable spool folder: the faces it may hold must
        # not be overwritten, so the node does not start without it.
        logger.error("cannot open the face spool %s: %s", settings.capture.spool_file, exc)
        return 1
    try:
        source = node.open(spec)
    except SourceError as exc:
        logger.error("cannot open the source: %s", exc)
        node.spool.close()
        return 1
    logger.info(
        "capture %s (%s) reading %s with the %s detector",
        settings.capture.camera,
        settings.capture.place or "no place set",
        source.description,
        node.detector.name,
    )
    node.start()
    frames = node.run()
    drain_s = settings.capture.drain_timeout_s
    if stop.is_set():
        reason = f"stopped after {frames} frames"
        # Asked to stop: a short drain, since the spool on disk keeps the rest anyway.
        drain_s = min(drain_s, STOP_DRAIN_S)
    else:
        reason = f"source ended after {frames} frames"
        logger.info("%s finished after %d frames", source.description, frames)
    node.finish(reason, drain_s)
    return 0
