"""JSON logs: extras become fields, and one face can be followed from camera to mail."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from maskmesh.brokerconf import capture_user
from maskmesh.logs import JsonFormatter
from services.notifier.mailsink import MailSink

from . import test_inference as inference_tests
from . import test_observability_services as services_tests
from .conftest import Broker, free_port
from .test_observability_services import ServiceProcess, base_config, healthy, wait_until

fake_model = inference_tests.fake_model
run = services_tests.run

IDS = ("face_id", "camera", "track", "district")


def test_json_formatter_puts_extras_in_as_fields() -> None:
    record = logging.LogRecord(
        "services.inference.service", logging.INFO, __file__, 1,
        "violation: face %s on %s", ("abc", "cam1"), None,
    )
    for key, value in {"face_id": "abc", "camera": "cam1", "track": 7, "district": "north",
                       "p_mask": 0.25, "tags": ["x"]}.items():
        setattr(record, key, value)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "violation: face abc on cam1"
    assert entry["level"] == "INFO" and entry["logger"] == "services.inference.service"
    assert entry["face_id"] == "abc" and entry["camera"] == "cam1"
    # Numbers stay numbers; anything else is its text.
    assert entry["track"] == 7 and entry["p_mask"] == 0.25 and entry["tags"] == "['x']"
    assert entry["time"].endswith("+00:00")
    # The record's own attributes are not repeated as fields.
    assert "args" not in entry and "msg" not in entry and "levelno" not in entry


def test_json_formatter_keeps_the_traceback() -> None:
    try:
        raise ValueError("broken")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert "ValueError: broken" in entry["exception"]


def json_lines(process: ServiceProcess) -> list[dict[str, Any]]:
    """The log's JSON objects (a line that is not one, from a library, is skipped)."""
    entries = []
    for line in process.output().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def with_face(entries: list[dict[str, Any]], face_id: str) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry.get("face_id") == face_id]


def test_one_face_is_followed_through_the_logs_of_all_three_services(
    broker: Broker, fake_model: Path, tmp_path: Path,
    run: Callable[[str, dict[str, Any]], ServiceProcess],
) -> None:
    from services.capture.sample import write_sample_images

    sink = MailSink(tmp_path / "mail", port=free_port())
    sink.start()
    try:
        logs = {"log_format": "json", "log_level": "DEBUG"}
        inference_port, notifier_port = free_port(), free_port()
        inference = run("inference", {
            **base_config(broker, "inference", "w1", inference_port), **logs,
            # Every face a violation, so that every face ends in the notifier's log.
            "inference": {"model_path": str(fake_model), "worker_id": "w1",
                          "intra_op_threads": 1, "threshold": 1.0},
        })
        notifier = run("notifier", {
            **base_config(broker, "notifier", "n1", notifier_port), **logs,
            "notifier": {
                "smtp": {"host": "127.0.0.1", "port": sink.port, "timeout_s": 3},
                "recipients": ["operator@district.test"],
                "outbox_path": str(tmp_path / "outbox.sqlite3"),
            },
        })
        wait_until(lambda: healthy(inference_port), inference, "inference ready")
        wait_until(lambda: healthy(notifier_port), notifier, "notifier ready")

        write_sample_images(tmp_path / "scenes")
        capture = run("capture", {
            **base_config(broker, capture_user("cam1"), "cam1", free_port()), **logs,
            "capture": {"camera": "cam1", "place": "Gate", "spool_dir": str(tmp_path / "spool"),
                        "source": str(tmp_path / "scenes")},
        })
        wait_until(lambda: capture.process.poll() is not None, capture, "the capture run",
                   timeout_s=60)
        assert capture.process.returncode == 0, capture.output()[-3000:]

        published = [e for e in json_lines(capture) if "submitted" in e["message"]]
        assert published, capture.output()[-3000:]
        first = published[0]
        face_id = first["face_id"]
        wait_until(
            lambda: any("sent" in e["message"] for e in with_face(json_lines(notifier), face_id)),
            notifier, f"the alert for {face_id} sent",
        )
    finally:
        sink.stop()

    expected = {key: first[key] for key in IDS}
    assert expected["camera"] == "cam1" and expected["district"] == broker.district
    assert isinstance(expected["track"], int)
    assert first["level"] == "DEBUG" and first["logger"] == "services.capture.service"

    verdict_lines = with_face(json_lines(inference), face_id)
    assert [e["level"] for e in verdict_lines] == ["INFO"], verdict_lines
    assert verdict_lines[0]["message"].startswith("violation:")
    assert 0.0 <= verdict_lines[0]["p_mask"] <= 1.0

    alert_lines = with_face(json_lines(notifier), face_id)
    messages = [e["message"] for e in alert_lines]
    assert any("queued" in m for m in messages) and any(m.startswith("sent") for m in messages)
    for entry in [first, *verdict_lines, *alert_lines]:
        assert {key: entry[key] for key in IDS} == expected, entry
