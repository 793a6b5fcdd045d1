"""A restarted capture node must not reuse the track ids of the run before.

The notifier sends no second alert for a (camera, track) that alerted within
``track_cooldown_s`` (300 s): that is how one person in front of a camera is one mail.
Track ids that start again at 0 after a restart (a crash, a reboot, a second
``maskmesh up --run-dir`` run) made a new person look like the one before, and their
violation was suppressed without any mail.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np

from maskmesh.messages import utc_now
from services.capture.detectors import Detection
from services.capture.service import CaptureNode, node_settings
from services.capture.settings import CaptureSection, CaptureSettings
from services.capture.sources import Frame
from services.notifier.outbox import Outbox
from services.notifier.settings import NotifierSection
from tests.test_notifier import make_violation


class _OneFace:
    name = "one-face"

    def detect(self, image: np.ndarray) -> list[Detection]:
        return [Detection((40, 40, 140, 160), 0.99)]


def _first_track(tmp_path: Path) -> int:
    settings = node_settings(CaptureSettings(capture=CaptureSection(
        camera="cam1", spool_dir=tmp_path / "spool", confirm_frames=1)))
    node = CaptureNode(settings, detector=_OneFace())  # type: ignore[arg-type]
    try:
        image = np.full((240, 320, 3), 128, np.uint8)
        node.process(Frame(image, 0, 0, utc_now(), 0.0))
        (track,) = node.tracker.tracks.values()
        return track.track_id
    finally:
        node.spool.close()


def test_a_restarted_node_gives_new_people_new_track_ids(tmp_path: Path) -> None:
    before = _first_track(tmp_path / "run1")
    after = _first_track(tmp_path / "run2")
    assert after != before


def test_the_first_violation_after_a_restart_is_mailed(tmp_path: Path) -> None:
    section = NotifierSection(outbox_path=tmp_path / "outbox.sqlite3",
                              recipients=["ops@district.test"], camera_cooldown_s=0)
    outbox = Outbox(section.outbox_path, section, ["email"])
    try:
        now = utc_now()
        first = make_violation(track=_first_track(tmp_path / "run1"), captured_at=now)
        again = make_violation(track=_first_track(tmp_path / "run2"),
                               captured_at=now + timedelta(seconds=30))
        assert not outbox.accept(first, now.timestamp()).suppressed
        assert not outbox.accept(again, now.timestamp() + 30).suppressed
    finally:
        outbox.close()
