"""A detection lying mostly inside a better one is a part of the same face, not a face."""

from __future__ import annotations

from services.capture.detectors import Detection, suppress_overlaps


def test_box_half_inside_a_better_one_is_dropped() -> None:
    face = Detection((83, 5, 407, 387), 0.96)
    # The lower right of the same close face: IoU 0.26 with it, but 47 % of it inside.
    part = Detection((239, 124, 500, 482), 0.93)
    assert suppress_overlaps([part, face]) == [face]


def test_neighbouring_faces_are_kept() -> None:
    left = Detection((0, 0, 100, 100), 0.9)
    right = Detection((80, 10, 180, 110), 0.8)  # 18 % of it overlaps the left face
    assert suppress_overlaps([left, right]) == [left, right]
