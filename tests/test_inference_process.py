"""``maskmesh inference`` as a process: kill, stop, restart, drain, and a broken model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from maskmesh import topics
from maskmesh.messages import ServiceStatus, decode, encode
from maskmesh.settings import REPO_ROOT

from . import test_inference as base
from .conftest import Broker
from .test_inference import Probe, make_face, verdicts_of

# The in-process tests' fixtures, shared by name.
auditor = base.auditor
camera = base.camera
fake_model = base.fake_model
start_worker = base.start_worker


def write_config(path: Path, broker: Broker, model: Path, worker_id: str, **section: Any) -> Path:
    data = {
        "district": broker.district,
        "instance": worker_id,
        "status_interval_s": 0.5,
        "broker": {
            "host": "127.0.0.1",
            "port": broker.port,
            "username": "inference",
            "password": broker.files.passwords["inference"],
            "reconnect_min_delay_s": 0.2,
            "reconnect_max_delay_s": 2.0,
        },
        "inference": {
            "model_path": str(model),
            "worker_id": worker_id,
            "intra_op_threads": 1,
            **section,
        },
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


class WorkerProcess:
    """A ``maskmesh inference`` subprocess with its stderr in a file."""

    def __init__(self, config: Path, log: Path, *args: str) -> None:
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log.open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "maskmesh.cli", "inference", "--config", str(config),
                 *args],
                cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env,
            )

    def wait(self, timeout_s: float = 30.0) -> int:
        return self.process.wait(timeout=timeout_s)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def processes() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for process in started:
        process.close()


def status_of(auditor: Probe, broker: Broker, worker_id: str) -> ServiceStatus | None:
    payloads = auditor.on(topics.status(broker.district, "inference", worker_id))
    return decode(ServiceStatus, payloads[-1]) if payloads else None


def wait_online(auditor: Probe, broker: Broker, worker_id: str, since: int) -> None:
    """Wait for an online status published after the first ``since`` messages."""
    topic = topics.status(broker.district, "inference", worker_id)

    def online() -> bool:
        fresh = [p for t, p in auditor.messages[since:] if t == topic]
        return any(decode(ServiceStatus, p).state == "online" for p in fresh)

    # The status is published right after the SUBSCRIBE on the same connection, and the
    # broker handles both in order, so the subscription is in place once it is seen.
    assert auditor.wait_for(online, timeout_s=30), "worker did not come online"


def distinct_verdicts(auditor: Probe) -> set[str]:
    return {v.face_id for v in verdicts_of(auditor)}


def restart_and_expect_all(
    config: Path, log: Path, auditor: Probe, camera: Probe, broker: Broker,
    processes: list[WorkerProcess], faces: list[Any],
) -> WorkerProcess:
    """Queue a few more faces while w1 is down, restart it, and expect every verdict."""
    late = [make_face() for _ in range(20)]
    for face in late:
        camera.publish(topics.faces(broker.district, "cam1"), encode(face))
    process = WorkerProcess(config, log)
    processes.append(process)
    wanted = {f.face_id for f in faces + late}
    assert auditor.wait_for(lambda: distinct_verdicts(auditor) >= wanted, timeout_s=60), (
        f"{len(wanted - distinct_verdicts(auditor))} faces never got a verdict\n"
        + process.output()[-3000:]
    )
    assert distinct_verdicts(auditor) == wanted
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    assert "session present: True" in process.output()
    return process


def test_a_killed_worker_restarted_with_its_id_answers_every_face_in_flight(
    broker: Broker, auditor: Probe, camera: Probe, fake_model: Path,
    processes: list[WorkerProcess], tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "w1.yaml", broker, fake_model, "w1",
                          max_batch=1, max_pending=16)
    log = tmp_path / "w1.log"
    mark = len(auditor.messages)
    processes.append(WorkerProcess(config, log))
    wait_online(auditor, broker, "w1", mark)

    faces = [make_face("no_mask" if i % 2 else "mask") for i in range(400)]
    for face in faces:
        camera.client.publish(topics.faces(broker.district, "cam1"), encode(face), qos=1)
    assert auditor.wait_for(lambda: len(auditor.on("/verdicts")) >= 1, timeout_s=20)
    processes[0].signal(signal.SIGKILL)
    assert processes[0].wait() == -signal.SIGKILL
    assert len(distinct_verdicts(auditor)) < len(faces), "the worker finished before the kill"

    restart_and_expect_all(config, log, auditor, camera, broker, processes, faces)


def test_sigterm_leaves_queued_faces_unacknowledged_for_the_next_start(
    broker: Broker, auditor: Probe, camera: Probe, fake_model: Path,
    processes: list[WorkerProcess], tmp_path: Path,
) -> None:
    # Batches wait up to 3 s to fill, so the faces sit in the worker's queue.
    config = write_config(tmp_path / "w1.yaml", broker, fake_model, "w1",
                          max_batch=512, max_pending=512, max_wait_ms=3000)
    log = tmp_path / "w1.log"
    mark = len(auditor.messages)
    processes.append(WorkerProcess(config, log))
    wait_online(auditor, broker, "w1", mark)

    faces = [make_face() for _ in range(300)]
    for face in faces:
        camera.client.publish(topics.faces(broker.district, "cam1"), encode(face), qos=1)
    assert auditor.wait_for(
        lambda: (s := status_of(auditor, broker, "w1")) is not None
        and s.counters.get("pending", 0) >= 100,
        timeout_s=10,
    ), "the backlog never showed in the status"
    processes[0].signal(signal.SIGTERM)
    assert processes[0].wait() == 0, processes[0].output()
    assert not auditor.on("/verdicts")
    assert "un-acknowledged" in processes[0].output()
    status = status_of(auditor, broker, "w1")
    assert status is not None and status.state == "offline"

    restart_and_expect_all(config, log, auditor, camera, broker, processes, faces)


def test_a_missing_or_corrupt_model_is_reported_and_the_process_exits(
    broker: Broker, auditor: Probe, fake_model: Path, processes: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf" * 20)
    for model in (tmp_path / "missing.onnx", corrupt):
        config = write_config(tmp_path / "bad.yaml", broker, fake_model, "bad")
        process = WorkerProcess(config, tmp_path / f"{model.stem}.log", "--model", str(model))
        processes.append(process)
        assert process.wait() == 1
        assert str(model) in process.output() and "ERROR" in process.output()
        assert auditor.wait_for(
            lambda m=model: (s := status_of(auditor, broker, "bad")) is not None
            and s.state == "offline"
            and m.name in (s.detail or ""),
            timeout_s=5,
        ), status_of(auditor, broker, "bad")


def test_bad_settings_exit_2_naming_the_field(tmp_path: Path, fake_model: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("inference:\n  max_batch: -1\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "maskmesh.cli", "inference", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )
    assert result.returncode == 2
    assert "inference.max_batch" in result.stderr


def session_present(broker: Broker, client_id: str) -> bool:
    """Connect without cleaning under client_id and report whether a session was there."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=MQTTProtocolVersion.MQTTv5)
    client.username_pw_set("inference", broker.files.passwords["inference"])
    flags: list[bool] = []
    done = threading.Event()

    def on_connect(  # noqa: ANN001
        client, userdata, connect_flags, reason_code, properties
    ) -> None:
        flags.append(connect_flags.session_present)
        done.set()

    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0  # and leave none behind
    client.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
    client.loop_start()
    try:
        assert done.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return flags[0]


def test_drain_finishes_a_retired_workers_share_and_deletes_its_session(
    broker: Broker, auditor: Probe, camera: Probe, fake_model: Path,
    processes: list[WorkerProcess], tmp_path: Path, start_worker: Any,
) -> None:
    first = start_worker("w1")
    start_worker("w2")
    first.stop()  # w1 is gone, but its session keeps a share of the faces for it

    faces = [make_face() for _ in range(30)]
    for face in faces:
        camera.publish(topics.faces(broker.district, "cam1"), encode(face))
    time.sleep(0.5)
    assert len(distinct_verdicts(auditor)) < len(faces), "w1's share should be waiting"

    config = write_config(tmp_path / "w1.yaml", broker, fake_model, "w1", drain_idle_s=1.0)
    drainer = WorkerProcess(config, tmp_path / "drain.log", "--drain")
    processes.append(drainer)
    assert drainer.wait(timeout_s=60) == 0, drainer.output()
    assert distinct_verdicts(auditor) == {f.face_id for f in faces}
    assert "cleared the broker session" in drainer.output()

    more = [make_face() for _ in range(20)]
    for face in more:
        camera.publish(topics.faces(broker.district, "cam1"), encode(face))
    wanted = {f.face_id for f in faces + more}
    assert auditor.wait_for(lambda: distinct_verdicts(auditor) >= wanted, timeout_s=15)
    latest = {v.face_id: v.worker for v in verdicts_of(auditor)}
    assert {latest[f.face_id] for f in more} == {"w2"}
    assert not session_present(broker, "inference-testdistrict-w1")
