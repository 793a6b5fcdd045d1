"""What docs/data-retention.md promises, checked where it is cheap to check.

- The capture spool deletes a face once the broker has it, and unsent faces after
  ``capture.retention_s``; the photo bytes then are gone from every spool file (the
  database, its write-ahead log), not just unlinked.
- The notifier outbox clears photos after ``notifier.retention_s`` and likewise leaves no
  copy in its files; the alert rows themselves stay.
- The defaults quoted in the document are the defaults in the code.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path

from maskmesh.brokerconf import BrokerPlan, render
from maskmesh.bus import Counters
from maskmesh.settings import REPO_ROOT, BrokerSettings
from services.capture.settings import CaptureSection
from services.capture.spool import Spool, SpoolLimits
from services.notifier.outbox import Outbox
from services.notifier.settings import NotifierSection

from .test_notifier import CROP_JPEG, make_violation

DOC = REPO_ROOT / "docs" / "data-retention.md"
MARKER = b"PERSONAL-PHOTO-BYTES-" * 400


def copies_in(folder: Path, needle: bytes) -> dict[str, int]:
    """How often ``needle`` occurs in each file of ``folder`` (0s left out)."""
    found = {}
    for path in folder.iterdir():
        count = path.read_bytes().count(needle)
        if count:
            found[path.name] = count
    return found


def test_sent_and_expired_faces_leave_no_photo_bytes_in_the_spool_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "cam1.sqlite3", SpoolLimits(retention_s=0.5), Counters())
    sent = [spool.put(f"{n:032x}", "t", MARKER + bytes([n])) for n in range(5)]
    for seq in sent:
        spool.remove(seq)  # what the sender does after the PUBACK
    spool.put("f" * 32, "t", MARKER)  # never sent: expires
    time.sleep(0.6)
    assert spool.expire() == 1
    assert len(spool) == 0
    assert copies_in(tmp_path, MARKER[:40]) == {}, "photo bytes survive in the spool files"
    spool.close()


def test_cleared_outbox_photos_leave_no_copy_in_the_outbox_files(tmp_path: Path) -> None:
    section = NotifierSection(outbox_path=tmp_path / "outbox.sqlite3", retention_s=60.0,
                              camera_cooldown_s=0.0)
    outbox = Outbox(section.outbox_path, section, ["email"])
    now = datetime.now(UTC).timestamp()
    violations = [make_violation(track=n) for n in range(3)]
    for violation in violations:
        outbox.accept(violation, now - 120.0)
    needle = CROP_JPEG[200:260]
    assert copies_in(tmp_path, needle), "the test photo is not in the outbox to begin with"

    assert outbox.clear_old_photos(now) == 3
    row = outbox.get(violations[0].face_id, "email")
    assert row is not None and row.crop_jpeg is None and row.context_jpeg is None
    assert copies_in(tmp_path, needle) == {}, "photo bytes survive in the outbox files"
    outbox.close()


def test_the_defaults_quoted_in_the_document_are_the_code_defaults(tmp_path: Path) -> None:
    text = DOC.read_text(encoding="utf-8")
    capture, notifier, broker = CaptureSection(), NotifierSection(), BrokerSettings()
    conf = render(BrokerPlan(district="d", cameras=("c",), port=1884), tmp_path).conf
    broker_conf = conf.read_text(encoding="utf-8")
    quoted = {
        "capture.retention_s": capture.retention_s,
        "capture.spool_max_items": capture.spool_max_items,
        "capture.spool_max_mb": capture.spool_max_mb,
        "notifier.retention_s": notifier.retention_s,
        "notifier.retention_sweep_s": notifier.retention_sweep_s,
        "broker.session_expiry_s": broker.session_expiry_s,
    }
    for name, value in quoted.items():
        match = re.search(rf"`{re.escape(name)}`[^|\n]*\|\s*`?([0-9.]+)", text)
        assert match, f"{name} is not in the settings table of {DOC.name}"
        assert float(match.group(1)) == float(value), (name, match.group(1), value)
    for line in ("persistent_client_expiration 7d", "max_queued_messages 100000",
                 "autosave_interval 30"):
        assert line in broker_conf, line
        assert f"`{line}`" in text, f"{DOC.name} does not quote `{line}`"
