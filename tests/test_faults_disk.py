"""Full disks and corrupt files: said clearly, nothing acknowledged that was not kept.

- The capture spool on a full filesystem (``RLIMIT_FSIZE`` in the child, so every
  write past a few kilobytes fails with EFBIG, as on a full disk): the node reports it
  in its status detail and ``spool_write_errors``, logs ERROR, and runs to the end of
  its source instead of dying.
- The notifier's outbox turned read-only under it: the violation is not acknowledged
  (the broker keeps it), ERROR says so, and once the outbox is writable again the
  violation is filed and mailed exactly once.
- A corrupt spool, outbox or model file: the service exits 1 with a message naming
  the file. (A missing or garbage model is covered in test_inference_process.py; a
  truncated copy of the shipped model is tested here.)
"""

from __future__ import annotations

import errno
import logging
import resource
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from maskmesh.bus import Bus
from maskmesh.messages import DeadLetter, ServiceStatus, decode
from maskmesh.settings import REPO_ROOT, ServiceSettings
from services.capture.spool import Spool, SpoolLimits, SpoolSender
from services.notifier.mailsink import MailSink
from services.notifier.service import Notifier
from services.notifier.settings import NotifierSettings

from . import test_notifier as notifier_tests
from .conftest import DISTRICT, Broker
from .faults.stack import MODEL, Auditor, wait_until
from .test_notifier import Publisher, make_violation, notifier_settings

publisher = notifier_tests.publisher
sink = notifier_tests.sink
start_notifier = notifier_tests.start_notifier

SPOOL_LIMIT_BYTES = 48 * 1024


def _run(argv: list[str], timeout_s: float = 120.0,
         preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    # Output through a pipe: a file the child writes would fall under its RLIMIT_FSIZE.
    return subprocess.run(
        [sys.executable, "-m", "maskmesh.cli", *argv], capture_output=True, text=True,
        timeout=timeout_s, cwd=REPO_ROOT, preexec_fn=preexec,
    )


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (SPOOL_LIMIT_BYTES, SPOOL_LIMIT_BYTES))


def _broker_section(broker: Broker, user: str) -> dict[str, object]:
    return {"host": "127.0.0.1", "port": broker.port, "username": user,
            "password": broker.files.passwords[user],
            "reconnect_min_delay_s": 0.2, "reconnect_max_delay_s": 1.0}


# -- capture spool --------------------------------------------------------------------


def test_capture_reports_a_spool_on_a_full_disk_and_runs_on(
    broker: Broker, tmp_path: Path
) -> None:
    from services.capture.sample import write_sample_images

    scenes = tmp_path / "scenes"
    write_sample_images(scenes)
    config = tmp_path / "capture.yaml"
    config.write_text(yaml.safe_dump({
        "district": DISTRICT, "status_interval_s": 0.3,
        "broker": _broker_section(broker, "capture-cam1"),
        "capture": {"camera": "cam1", "source": str(scenes), "max_fps": 5.0,
                    "spool_dir": str(tmp_path / "spool"), "drain_timeout_s": 2.0},
    }), encoding="utf-8")
    auditor = Auditor(broker, client_id="disk-auditor")
    try:
        result = _run(["capture", "--config", str(config)], preexec=_limit_file_size)
        statuses = [decode(ServiceStatus, p) for p in auditor.on("/status/capture/cam1")]
    finally:
        auditor.close()

    assert result.returncode == 0, result.stderr[-3000:]
    assert "ERROR" in result.stderr and "cannot write the spool" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    final = statuses[-1]
    assert final.state == "offline"
    assert final.counters.get("spool_write_errors", 0) >= 1, final
    assert any("spool" in (s.detail or "") and "cannot write the spool" in (s.detail or "")
               for s in statuses), [s.detail for s in statuses]


def test_the_spool_sender_reports_write_errors_and_clears_them_when_writes_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = ServiceSettings(district=DISTRICT, instance="cam1")
    bus = Bus(settings, "capture")  # never connected: statuses are only recorded here
    published: list[str | None] = []
    real_publish_status = bus.publish_status

    def publish_status(state: str | None = None, detail: str | None = None) -> None:
        real_publish_status(state, detail)  # type: ignore[arg-type]
        published.append(bus.detail)

    monkeypatch.setattr(bus, "publish_status", publish_status)
    spool = Spool(tmp_path / "spool" / "cam1.sqlite3", SpoolLimits(), bus.counters)
    sender = SpoolSender(bus, spool)
    real_put = spool.put

    def full(face_id: str, topic: str, payload: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "put", full)
    with caplog.at_level(logging.ERROR):
        assert not sender.submit("a" * 32, "t", b"{}")
        assert not sender.submit("b" * 32, "t", b"{}")
    assert bus.counters.get("spool_write_errors") == 2
    assert bus.detail is not None and "No space left" in bus.detail
    assert str(spool.path) in caplog.text
    monkeypatch.setattr(spool, "put", real_put)
    assert sender.submit("c" * 32, "t", b"{}")
    assert bus.detail is None and published[-1] is None
    assert len(spool) == 1
    spool.close()


def test_capture_with_a_corrupt_spool_file_exits_1_naming_it(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (spool_dir / "cam1.sqlite3").write_bytes(b"this is not an SQLite database" * 100)
    (tmp_path / "scenes").mkdir()
    result = _run(["capture", "--camera", "cam1", "--source", str(tmp_path / "scenes"),
                   "--spool-dir", str(spool_dir)], timeout_s=60)
    assert result.returncode == 1, result.stderr[-2000:]
    assert str(spool_dir / "cam1.sqlite3") in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


# -- notifier outbox ------------------------------------------------------------------


def test_the_notifier_does_not_ack_a_violation_its_outbox_cannot_keep(
    broker: Broker, tmp_path: Path, sink: MailSink, publisher: Publisher,
    start_notifier: Callable[[NotifierSettings], Notifier], caplog: pytest.LogCaptureFixture,
) -> None:
    sink.start()
    auditor = Auditor(broker, client_id="disk-auditor")
    notifier = start_notifier(notifier_settings(broker, tmp_path, sink.port))
    writable = notifier.outbox._db
    # As if the file system went read-only under the running notifier.
    notifier.outbox._db = sqlite3.connect(
        f"file:{notifier.outbox.path}?mode=ro", uri=True, check_same_thread=False,
        isolation_level=None,
    )
    notifier.outbox._db.row_factory = sqlite3.Row
    violation = make_violation()
    try:
        with caplog.at_level(logging.ERROR):
            publisher.send(violation)
            assert wait_until(lambda: "not acknowledged" in caplog.text, 10), caplog.text
        assert str(notifier.outbox.path) in caplog.text
        time.sleep(1.0)
        assert not sink.messages()
        assert notifier.counters.get("violations_received") == 0
        assert notifier.counters.get("outbox_errors") >= 1
        assert notifier.bus.detail is not None and "outbox" in notifier.bus.detail
    finally:
        notifier.outbox._db.close()
        notifier.outbox._db = writable

    # Writable again: the held violation is filed on the next round and mailed once.
    notifier.retry_unfiled()
    notifier_tests.wait_for(lambda: len(sink.messages()) == 1, what="the held violation's mail")
    time.sleep(1.0)
    assert len(sink.messages()) == 1
    assert violation.face_id in sink.messages()[0].read_text(errors="replace")
    assert notifier.counters.get("violations_received") == 1
    letters = [decode(DeadLetter, p) for p in auditor.on("/deadletter")]
    auditor.close()
    assert not letters, "a violation the outbox could not keep was dead-lettered"


def test_a_violation_held_across_a_notifier_restart_is_mailed_once(
    broker: Broker, tmp_path: Path, sink: MailSink, publisher: Publisher,
    start_notifier: Callable[[NotifierSettings], Notifier],
) -> None:
    """Never acknowledged, so the broker hands it to the next start of the notifier."""
    sink.start()
    settings = notifier_settings(broker, tmp_path, sink.port)
    notifier = start_notifier(settings)
    writable = notifier.outbox._db
    notifier.outbox._db = sqlite3.connect(
        f"file:{notifier.outbox.path}?mode=ro", uri=True, check_same_thread=False,
        isolation_level=None,
    )
    violation = make_violation()
    publisher.send(violation)
    assert wait_until(lambda: notifier.counters.get("outbox_errors") >= 1, 10)
    notifier.outbox._db.close()
    notifier.outbox._db = writable
    notifier.stop()

    start_notifier(settings)
    notifier_tests.wait_for(lambda: len(sink.messages()) == 1, what="the mail after restart")
    time.sleep(1.0)
    assert len(sink.messages()) == 1


def test_notifier_with_a_corrupt_outbox_exits_1_naming_it(
    broker: Broker, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.sqlite3"
    outbox.write_bytes(b"this is not an SQLite database" * 100)
    config = tmp_path / "notifier.yaml"
    config.write_text(yaml.safe_dump({
        "district": DISTRICT, "broker": _broker_section(broker, "notifier"),
        "notifier": {"outbox_path": str(outbox)},
    }), encoding="utf-8")
    result = _run(["notifier", "--config", str(config)], timeout_s=60)
    assert result.returncode == 1, result.stderr[-2000:]
    assert str(outbox) in result.stderr
    assert "Traceback" not in result.stderr


# -- model ----------------------------------------------------------------------------


@pytest.mark.skipif(not MODEL.is_file(), reason="the shipped model is missing")
def test_inference_with_a_truncated_model_exits_1_naming_it(
    broker: Broker, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(MODEL.read_bytes()[: MODEL.stat().st_size // 2])
    config = tmp_path / "inference.yaml"
    config.write_text(yaml.safe_dump({
        "district": DISTRICT, "instance": "w9", "broker": _broker_section(broker, "inference"),
        "inference": {"model_path": str(truncated), "worker_id": "w9"},
    }), encoding="utf-8")
    result = _run(["inference", "--config", str(config)], timeout_s=60)
    assert result.returncode == 1, result.stderr[-2000:]
    assert str(truncated) in result.stderr and "ERROR" in result.stderr
