"""Nothing lost under faults: broker restart, killed worker and notifier, mail server down.

Runs ``tests/faults/run_suite.py`` (real broker, mail sink, services as processes, the
shipped model, real face crops of both classes) at CI size; set
``MASKMESH_FAULT_FACES`` for a bigger run. The counts are printed as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.faults.run_suite import MODEL, run_suite

CI_FACES = 40


@pytest.mark.skipif(not MODEL.is_file(), reason=f"the shipped model {MODEL} is missing")
def test_every_face_gets_a_verdict_and_every_violation_one_mail_through_faults(
    shared: Path, tmp_path: Path
) -> None:
    faces = int(os.environ.get("MASKMESH_FAULT_FACES", CI_FACES))
    counts = run_suite(faces, tmp_path / "run", shared=shared, say=lambda line: None)
    print(json.dumps(counts, indent=2))
    events = [e["event"] for e in counts["faults"]]
    for fault in ("broker back", "inference restarted", "mail server stopped",
                  "notifier restarted", "mail server back"):
        assert fault in events, f"the fault {fault!r} did not happen"

    verdicts, violations, mails = counts["verdicts"], counts["violations"], counts["mails"]
    assert counts["faces_sent"] == faces
    assert verdicts["faces_without_verdict"] == 0, counts
    assert verdicts["distinct_faces"] == faces, counts
    assert verdicts["unknown_faces"] == 0, counts
    # Both classes went through, so both paths (violation and not) were exercised.
    assert violations["distinct"] > 0 and violations["non_violations"] > 0, counts
    assert violations["verdicts_without_violation_message"] == 0, counts
    assert mails["violations_without_mail"] == 0, counts
    assert mails["mails_for_non_violations"] == 0, counts
    # Exactly one alert (one Message-ID) per violation; an SMTP answer lost with the
    # connection may make the same mail arrive twice (see channels.py's Limitation).
    assert mails["violations_with_more_than_one_message_id"] == 0, counts
    assert mails["distinct_message_ids"] == violations["distinct"], counts
    assert mails["digests"] == 0, counts
    assert counts["dead_letters"] == 0, counts
    assert counts["outbox"] == {"sent_single": violations["distinct"]}, counts
    assert all(code == 0 for code in counts["exit_codes"].values()), counts
    assert counts["ok"], counts
