"""A small IoU tracker: one person in front of a camera is one track, not one per frame.

Each frame's detections are matched greedily to live tracks by IoU, with the distance
between box centres (relative to the face size) as a fallback for a face that moved
fast enough to lose its overlap. A track is *confirmed* after ``confirm_frames``
sightings; from then on ``due`` says when its best crop should be published again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from services.capture.detectors import Box, Detection, iou

T = TypeVar("T")


@dataclass
class Track(Generic[T]):
    """One face followed across frames.

    track_id: stable number, unique within the tracker's life.
    box: the latest box.
    hits: frames the face was seen in.
    best: the best-scoring sighting since the last publication (score, payload).
    published_at: monotonic time of the last publication, None before the first.
    """

    track_id: int
    box: Box
    first_seen: float
    last_seen: float
    hits: int = 1
    best: tuple[float, T] | None = None
    published_at: float | None = None


@dataclass(frozen=True)
class TrackerConfig:
    """How tracks are matched, confirmed and re-published.

    iou_threshold: lowest IoU that continues a track.
    centre_ratio: centre distance, in units of the face width, that still continues a
        track when IoU is too low.
    confirm_frames: sightings before a track is published (1 publishes at once).
    republish_s: least time between two publications of one track.
    ttl_s: a track unseen for this long is forgotten.
    """

    iou_threshold: float = 0.3
    centre_ratio: float = 0.5
    confirm_frames: int = 2
    republish_s: float = 5.0
    ttl_s: float = 2.0


def _centre_distance(a: Box, b: Box) -> float:
    ax, ay = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    bx, by = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    return float(((ax - bx) ** 2 + (ay - by) ** 2) ** 0.5)


class Tracker(Generic[T]):
    """Follows faces across frames; ``T`` is what a sighting carries (a crop, a frame).

    config: matching and publication rules (TrackerConfig).
    """

    # Limitation: boxes only, no appearance model: two people whose faces cross can
    # swap track ids, and a face hidden longer than ttl_s comes back as a new track
    # (and is published again). Both cost extra messages, never a missed face.

    def __init__(self, config: TrackerConfig | None = None, first_id: int = 0) -> None:
        self.config = config or TrackerConfig()
        self.tracks: dict[int, Track[T]] = {}
        self.created = 0
        self._next_id = first_id

    def reset(self) -> None:
        """Forget every track (a new, unrelated scene); ids keep counting up."""
        self.tracks.clear()

    def update(
        self, detections: list[Detection], payloads: list[T], now: float
    ) -> list[Track[T]]:
        """Match one frame's detections; returns the track of each detection, in order."""
        self._expire(now)
        pairs: list[tuple[float, int, int]] = []
        live = list(self.tracks.values())
        for di, det in enumerate(detections):
            for track in live:
                overlap = iou(det.box, track.box)
                if overlap >= self.config.iou_threshold:
                    pairs.append((overlap + 1.0, di, track.track_id))
                    continue
                width = max(1, det.width, track.box[2] - track.box[0])
                distance = _centre_distance(det.box, track.box) / width
                if distance <= self.config.centre_ratio:
                    # Ranked below every IoU match: closeness in [0, 1).
                    pairs.append((1.0 - distance / (self.config.centre_ratio + 1e-9), di,
                                  track.track_id))

        assigned: dict[int, Track[T]] = {}
        used: set[int] = set()
        for _, di, tid in sorted(pairs, reverse=True):
            if di in assigned or tid in used:
                continue
            track = self.tracks[tid]
            track.box = detections[di].box
            track.last_seen = now
            track.hits += 1
            assigned[di] = track
            used.add(tid)

        result: list[Track[T]] = []
        for di, det in enumerate(detections):
            track = assigned.get(di) or self._start(det.box, now)
            if track.best is None or det.score > track.best[0]:
                track.best = (det.score, payloads[di])
            result.append(track)
        return result

    def due(self, now: float) -> list[Track[T]]:
        """Confirmed tracks whose best sighting should be published now.

        Limitation: a track that leaves before republish_s has passed since its last
        publication takes its newer sightings with it; only the first is certain.
        """
        ready = []
        for track in self.tracks.values():
            if track.best is None or track.hits < self.config.confirm_frames:
                continue
            if (track.published_at is None
                    or now - track.published_at >= self.config.republish_s):
                ready.append(track)
        return ready

    def mark_published(self, track: Track[T], now: float) -> None:
        """Record a publication; the next one waits republish_s for a new best crop."""
        track.published_at = now
        track.best = None

    def _start(self, box: Box, now: float) -> Track[T]:
        track: Track[T] = Track(self._next_id, box, now, now)
        self.tracks[track.track_id] = track
        self._next_id += 1
        self.created += 1
        return track

    def _expire(self, now: float) -> None:
        stale = [tid for tid, t in self.tracks.items() if now - t.last_seen > self.config.ttl_s]
        for tid in stale:
            del self.tracks[tid]
