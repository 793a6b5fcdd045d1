"""Every service, run as its own process, serves /metrics and /healthz.

Each test starts one service against the test broker with ``metrics_port`` set, gives it
some work, and scrapes: the counters, levels and latency histograms an operator's
dashboards rely on are there, and /healthz answers 200 once the service is ready (and
503 for an inference worker whose broker went away).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from maskmesh import topics
from maskmesh.brokerconf import capture_user
from maskmesh.messages import encode
from maskmesh.settings import REPO_ROOT
from services.notifier.mailsink import MailSink

from . import test_inference as inference_tests
from .conftest import DISTRICT, Broker, free_port
from .test_inference import Probe, make_face
from .test_notifier import Publisher, make_violation

fake_model = inference_tests.fake_model

# What every service exports as soon as it runs.
COMMON = ("maskmesh_dead_letters_total", "maskmesh_reconnects_total", "maskmesh_connected")


class ServiceProcess:
    """``maskmesh SERVICE --config FILE`` with its log in a file; killed at the end."""

    def __init__(self, service: str, config: Path, log: Path) -> None:
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("MASKMESH_")}
        env["PYTHONUNBUFFERED"] = "1"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "maskmesh.cli", service, "--config", str(config)],
                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
            )

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            return -9


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[[str, dict[str, Any]], ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(service: str, config: dict[str, Any]) -> ServiceProcess:
        path = tmp_path / f"{service}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        process = ServiceProcess(service, path, tmp_path / f"{service}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def base_config(broker: Broker, user: str, instance: str, port: int) -> dict[str, Any]:
    return {
        "district": broker.district,
        "instance": instance,
        "metrics_port": port,
        "status_interval_s": 0.5,
        "broker": {
            "host": "127.0.0.1",
            "port": broker.port,
            "username": user,
            "password": broker.files.passwords[user],
            "reconnect_min_delay_s": 0.2,
            "reconnect_max_delay_s": 1.0,
        },
    }


def get(port: int, path: str) -> tuple[int, str]:
    """Status and body of GET http://127.0.0.1:port/path; (0, reason) while not listening."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError) as exc:
        return 0, str(exc)


def samples(port: int) -> dict[str, float]:
    """Every sample on /metrics by name (labels dropped; one process, one instance)."""
    code, text = get(port, "/metrics")
    if code != 200:
        return {}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name] = sample.value
    return found


def wait_until(check: Callable[[], bool], process: ServiceProcess, what: str,
               timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if process.process.poll() is not None:
            pytest.fail(f"the service exited ({process.process.returncode}) before {what}:\n"
                        f"{process.output()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}; log:\n{process.output()[-3000:]}")


def healthy(port: int) -> bool:
    return get(port, "/healthz")[0] == 200


def test_inference_metrics_and_health_follow_the_broker(
    broker: Broker, fake_model: Path, run: Callable[[str, dict[str, Any]], ServiceProcess]
) -> None:
    port = free_port()
    config = base_config(broker, "inference", "w1", port)
    config["inference"] = {"model_path": str(fake_model), "worker_id": "w1",
                           "intra_op_threads": 1}
    worker = run("inference", config)
    wait_until(lambda: healthy(port), worker, "/healthz 200")
    body = json.loads(get(port, "/healthz")[1])
    assert body["service"] == "inference" and body["problems"] == []

    camera = Probe(broker, capture_user("cam1"))
    try:
        for label in ("mask", "no_mask"):
            face = make_face(label, district=DISTRICT)
            camera.publish(topics.faces(DISTRICT, "cam1"), encode(face))
    finally:
        camera.close()
    wait_until(lambda: samples(port).get("maskmesh_verdicts_total") == 2, worker, "2 verdicts")

    found = samples(port)
    for name in (*COMMON, "maskmesh_faces_received_total", "maskmesh_violations_total",
                 "maskmesh_pending", "maskmesh_batches_total"):
        assert name in found, name
    assert found["maskmesh_violations_total"] == 1
    assert found["maskmesh_pending"] == 0
    # Capture-to-verdict latency per face, model time per batch.
    assert found["maskmesh_inference_latency_seconds_count"] == 2
    assert found["maskmesh_inference_batch_seconds_count"] >= 1

    broker.stop()
    wait_until(lambda: get(port, "/healthz")[0] == 503, worker, "/healthz 503")
    assert "not connected" in get(port, "/healthz")[1]
    broker.start()
    wait_until(lambda: healthy(port), worker, "/healthz 200 after the restart")
    wait_until(lambda: samples(port).get("maskmesh_reconnects_total") == 1, worker, "reconnects")
    assert worker.stop() == 0


def test_notifier_metrics_count_mails_and_time_them(
    broker: Broker, tmp_path: Path, run: Callable[[str, dict[str, Any]], ServiceProcess]
) -> None:
    sink = MailSink(tmp_path / "mail", port=free_port())
    sink.start()
    port = free_port()
    config = base_config(broker, "notifier", "n1", port)
    config["notifier"] = {
        "smtp": {"host": "127.0.0.1", "port": sink.port, "timeout_s": 3},
        "recipients": ["operator@district.test"],
        "outbox_path": str(tmp_path / "outbox.sqlite3"),
    }
    publisher = Publisher(broker)
    try:
        notifier = run("notifier", config)
        wait_until(lambda: healthy(port), notifier, "/healthz 200")
        found = samples(port)
        for name in (*COMMON, "maskmesh_violations_received_total", "maskmesh_mails_sent_total",
                     "maskmesh_mails_failed_total", "maskmesh_outbox_pending"):
            assert name in found, name
        assert found["maskmesh_mails_sent_total"] == 0

        publisher.send(make_violation())
        wait_until(lambda: samples(port).get("maskmesh_mails_sent_total") == 1, notifier,
                   "one mail sent")
        found = samples(port)
        assert found["maskmesh_violations_received_total"] == 1
        assert found["maskmesh_outbox_pending"] == 0
        # Violation received to mail accepted by the server, and the SMTP exchange alone.
        assert found["maskmesh_email_alert_latency_seconds_count"] == 1
        assert found["maskmesh_email_delivery_seconds_count"] == 1
        assert len(sink.messages()) == 1
        assert notifier.stop() == 0
    finally:
        publisher.close()
        sink.stop()


def test_capture_metrics_and_health_while_it_reads_frames(
    broker: Broker, tmp_path: Path, run: Callable[[str, dict[str, Any]], ServiceProcess]
) -> None:
    from services.capture.sample import write_sample_images

    # Enough frames at 4 a second to stay running while the test scrapes.
    scenes = write_sample_images(tmp_path / "scenes")
    frames = tmp_path / "frames"
    frames.mkdir()
    for n in range(60):
        scene = scenes[n % len(scenes)]
        shutil.copy(scene, frames / f"{n:03d}-{scene.name}")

    # A worker's share of the faces: with no subscriber the broker drops faces, and the
    # capture node keeps them spooled instead of counting them published.
    worker = Probe(broker, "inference", (topics.shared_faces(DISTRICT),))
    port = free_port()
    config = base_config(broker, capture_user("cam1"), "cam1", port)
    config["capture"] = {"camera": "cam1", "source": str(frames), "max_fps": 4.0,
                         "spool_dir": str(tmp_path / "spool")}
    capture = run("capture", config)
    wait_until(lambda: healthy(port), capture, "/healthz 200")
    wait_until(lambda: samples(port).get("maskmesh_faces_total", 0) >= 1, capture,
               "a face published")
    wait_until(lambda: "maskmesh_spool_items" in samples(port), capture, "the spool depth")

    found = samples(port)
    for name in (*COMMON, "maskmesh_frames_total", "maskmesh_detections_total",
                 "maskmesh_spooled_total", "maskmesh_spool_dropped_total"):
        assert name in found, name
    assert found["maskmesh_frames_total"] >= 1
    assert found["maskmesh_capture_frame_seconds_count"] >= 1
    assert capture.stop() == 0
    worker.close()
