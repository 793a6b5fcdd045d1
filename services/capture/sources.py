"""Where frames come from: a webcam, an RTSP/HTTP stream, a video file or an image folder.

``open_source`` picks the kind from the text given. Finite sources (files, folders) end
with ``read()`` returning None. Live sources (webcam, stream) never end on their own:
when frames stop they report "stalled" through a callback, reopen with back-off and
report again when frames flow.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from maskmesh.messages import utc_now

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
StallCallback = Callable[[str | None], None]  # detail while stalled, None when flowing


class SourceError(RuntimeError):
    """A source cannot be opened at all (missing file, empty folder)."""


@dataclass(frozen=True)
class Frame:
    """One frame and where it came from.

    index: frames read so far from this source, from 0.
    scene: changes when a frame is unrelated to the one before (each folder image).
    captured_at: UTC time at the grab.
    clock_s: seconds on the source's own clock (a video's position, else monotonic
        time), which the tracker's timing rules use.
    name: the file a frame came from, for folders.
    """

    image: np.ndarray
    index: int
    scene: int
    captured_at: datetime
    clock_s: float
    name: str | None = None


class FrameSource(Protocol):
    """Frames one after another; ``read`` returns None when a finite source is done."""

    finite: bool
    description: str
    unreadable: int

    def read(self) -> Frame | None: ...

    def close(self) -> None: ...


class _RateCap:
    """At most ``max_fps`` frames a second; waits on ``stop`` so shutdown is prompt."""

    def __init__(self, max_fps: float | None, stop: threading.Event) -> None:
        self.interval = 1.0 / max_fps if max_fps else 0.0
        self.stop = stop
        self.next_at = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self.next_at

    def wait(self) -> None:
        delay = self.next_at - time.monotonic()
        if delay > 0:
            self.stop.wait(delay)

    def taken(self) -> None:
        now = time.monotonic()
        # Never try to catch up after a slow frame: the next one is one interval on.
        self.next_at = max(self.next_at + self.interval, now) if self.interval else now


class FolderSource:
    """Images of a folder in name order; each is its own scene unless ``sequence``.

    Files that OpenCV cannot read are counted in ``unreadable`` and skipped with a
    warning.
    """

    finite = True

    def __init__(
        self,
        files: list[Path],
        description: str,
        max_fps: float | None = None,
        sequence: bool = False,
        stop: threading.Event | None = None,
    ) -> None:
        self.description = description
        self.unreadable = 0
        self.sequence = sequence
        self._files: Iterator[Path] = iter(files)
        self._stop = stop or threading.Event()
        self._rate = _RateCap(max_fps, self._stop)
        self._index = 0

    def read(self) -> Frame | None:
        for path in self._files:
            if self._stop.is_set():
                return None
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None or image.size == 0:
                self.unreadable += 1
                logger.warning("skipped %s: not an image OpenCV can read", path)
                continue
            self._rate.wait()
            self._rate.taken()
            index = self._index
            self._index += 1
            scene = 0 if self.sequence else index
            return Frame(image, index, scene, utc_now(), time.monotonic(), str(path))
        return None

    def close(self) -> None:
        self._files = iter(())


class VideoFileSource:
    """A video file read to its end at up to ``max_fps``."""

    finite = True

    def __init__(
        self,
        path: Path,
        max_fps: float | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.description = str(path)
        self.unreadable = 0
        self._capture = cv2.VideoCapture(str(path))
        if not self._capture.isOpened():
            raise SourceError(f"cannot open video file {path}")
        self._fps = float(self._capture.get(cv2.CAP_PROP_FPS) or 0.0) or 25.0
        self._stop = stop or threading.Event()
        self._rate = _RateCap(max_fps, self._stop)
        self._index = 0

    def read(self) -> Frame | None:
        if self._stop.is_set():
            return None
        self._rate.wait()
        ok, image = self._capture.read()
        if not ok or image is None:
            return None
        self._rate.taken()
        position_ms = float(self._capture.get(cv2.CAP_PROP_POS_MSEC) or 0.0)
        clock_s = position_ms / 1000.0 if position_ms > 0 else self._index / self._fps
        frame = Frame(image, self._index, 0, utc_now(), clock_s)
        self._index += 1
        return frame

    def close(self) -> None:
        self._capture.release()


Opener = Callable[[str | int], Any]  # returns something shaped like cv2.VideoCapture


def _open_capture(target: str | int) -> Any:
    if isinstance(target, int):
        return cv2.VideoCapture(target)
    # Bounded waits, so a dead stream surfaces as a failed read instead of a hang.
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 10000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 10000]
    return cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)


class LiveSource:
    """A webcam index or stream URL; reopened with back-off whenever frames stop.

    target: webcam index or URL.
    max_fps: frames above this rate are grabbed and dropped, so the stream's buffer
        never fills with stale frames.
    on_stall: called with a detail text when frames stop, with None when they flow.
    reopen_min_s / reopen_max_s: back-off between reopen attempts, doubling each time.
    opener: builds the capture object (cv2.VideoCapture by default; tests pass fakes).
    """

    finite = False

    def __init__(
        self,
        target: str | int,
        max_fps: float | None = None,
        on_stall: StallCallback | None = None,
        reopen_min_s: float = 1.0,
        reopen_max_s: float = 30.0,
        stop: threading.Event | None = None,
        opener: Opener = _open_capture,
    ) -> None:
        self.target = target
        self.description = f"camera {target}" if isinstance(target, int) else _redact(target)
        self.unreadable = 0
        self.reopens = 0
        self.stalled: str | None = None
        self._on_stall = on_stall
        self._stop = stop or threading.Event()
        self._rate = _RateCap(max_fps, self._stop)
        self._reopen_min_s = reopen_min_s
        self._reopen_max_s = reopen_max_s
        self._opener = opener
        self._capture: Any = None
        self._index = 0
        self._failures = 0

    def read(self) -> Frame | None:
        # Limitation: a webcam driver's grab can block for its own timeout (about 10 s
        # for V4L2); the node's status loop reports "stalled" meanwhile, and a stop
        # request waits for the grab to return.
        while not self._stop.is_set():
            if self._capture is None and not self._open():
                continue
            if not self._capture.grab():
                self._lost("no frame from the source")
                continue
            if not self._rate.due():
                continue  # dropped: above max_fps
            captured_at = utc_now()
            ok, image = self._capture.retrieve()
            if not ok or image is None:
                self.unreadable += 1
                continue
            self._rate.taken()
            self._flowing()
            frame = Frame(image, self._index, 0, captured_at, time.monotonic())
            self._index += 1
            return frame
        return None

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def _open(self) -> bool:
        capture = self._opener(self.target)
        if capture is not None and capture.isOpened():
            self._capture = capture
            return True
        if capture is not None:
            capture.release()
        self._lost("cannot open the source")
        return False

    def _lost(self, why: str) -> None:
        self.close()
        self._failures += 1
        delay = min(self._reopen_max_s, self._reopen_min_s * 2 ** (self._failures - 1))
        detail = f"{why} ({self.description}); reopening in {delay:.0f} s"
        if self.stalled is None:
            logger.warning("%s stalled: %s", self.description, why)
        self.stalled = detail
        if self._on_stall is not None:
            self._on_stall(detail)
        self.reopens += 1
        self._stop.wait(delay)

    def _flowing(self) -> None:
        if self.stalled is None:
            return
        logger.info("%s sends frames again", self.description)
        self.stalled = None
        self._failures = 0
        if self._on_stall is not None:
            self._on_stall(None)


def _redact(url: str) -> str:
    """A URL without its user:password part, fit for logs and status."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def list_images(folder: Path) -> list[Path]:
    """Candidate frames of a folder: visible regular files, sorted by name.

    Files with other suffixes are kept so that an unreadable one is counted, not
    silently ignored; only hidden files are left out.
    """
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def open_source(
    spec: str,
    max_fps: float | None = None,
    sequence: bool = False,
    on_stall: StallCallback | None = None,
    stop: threading.Event | None = None,
    reopen_min_s: float = 1.0,
    reopen_max_s: float = 30.0,
) -> FrameSource:
    """Open what ``spec`` names: a webcam index, a URL, a folder, an image or a video."""
    if spec.strip().isdigit():
        return LiveSource(int(spec), max_fps, on_stall, reopen_min_s, reopen_max_s, stop)
    if "://" in spec:
        return LiveSource(spec, max_fps, on_stall, reopen_min_s, reopen_max_s, stop)
    path = Path(spec)
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise SourceError(f"folder {path} holds no files")
        return FolderSource(files, str(path), max_fps, sequence, stop)
    if not path.is_file():
        raise SourceError(f"source {spec!r} is no webcam index, URL, folder or file")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return FolderSource([path], str(path), max_fps, sequence, stop)
    return VideoFileSource(path, max_fps, stop)
