"""``maskmesh up`` stopped from outside: nothing of the mesh may outlive it.

The mesh reads a stream URL on a loopback port nobody listens on, so it runs until it
is stopped. Each test sends a signal the way a shell or terminal does and then looks
for any process still naming the run's temporary folder, and for the folder itself
(it holds the broker passwords).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.inference.classifier import MaskClassifier
from services.inference.settings import DEFAULT_MODEL
from tests.conftest import free_port

MODEL = DEFAULT_MODEL
pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason=f"no shipped model at {MODEL}")


def _processes_naming(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def _start_up(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    process = subprocess.Popen(
        [sys.executable, "-m", "maskmesh.cli", "up", "--mail-dir", str(tmp_path / "mail"),
         "--source", f"rtsp://127.0.0.1:{free_port()}/none"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path, env=env,
        start_new_session=True,  # its own process group, as a terminal's job is
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if list(temp.glob("maskmesh-up-*/capture.yaml")):
            time.sleep(1.0)  # capture spawned; let it start reading
            return process, temp
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"maskmesh up did not get to start capture: {process.communicate()[0]!r}")


def _stopped_cleanly(process: subprocess.Popen[bytes], temp: Path) -> bytes:
    try:
        output, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("maskmesh up did not stop within 30 s")
    time.sleep(0.5)
    left = _processes_naming(str(temp))
    for line in left:  # clean up before failing, so nothing outlives the test
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    assert not left, f"left running after maskmesh up ended: {left}\n{output.decode()[-3000:]}"
    left_dirs = list(temp.glob("maskmesh-*"))
    assert left_dirs == [], f"the temporary run folder (with passwords) was left: {left_dirs}"
    return output


def test_a_hang_up_of_the_terminal_stops_the_whole_mesh(tmp_path: Path) -> None:
    process, temp = _start_up(tmp_path)
    os.killpg(process.pid, signal.SIGHUP)  # the terminal closed, the ssh link dropped
    _stopped_cleanly(process, temp)


def test_ctrl_c_stops_the_whole_mesh_and_prints_the_summary(tmp_path: Path) -> None:
    process, temp = _start_up(tmp_path)
    os.killpg(process.pid, signal.SIGINT)
    output = _stopped_cleanly(process, temp).decode()
    assert output.strip().splitlines()[-1].startswith('{"frames": 0')
    # Stopped in order, broker last: nobody lost the broker on the way out.
    assert "lost the broker" not in output, output[-3000:]


def test_sigterm_to_up_alone_stops_the_whole_mesh(tmp_path: Path) -> None:
    process, temp = _start_up(tmp_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        logs = list(temp.glob("maskmesh-up-*/logs/capture.log"))
        if logs and "stalled" in logs[0].read_text(encoding="utf-8", errors="replace"):
            time.sleep(1.5)  # the stalled status reaches up's monitor
            break
        time.sleep(0.2)
    process.terminate()
    output = _stopped_cleanly(process, temp).decode()
    # A source that never sends a frame is said in up's own output, not only in a log.
    assert "WARNING maskmesh.up: capture cam1 stalled" in output, output[-3000:]


def test_faces_left_in_the_capture_spool_make_up_fail(tmp_path: Path) -> None:
    """A broker away longer than capture's drain leaves faces on disk, never sent.

    ``up`` then must not report success (in a temporary run folder they are deleted
    with it): the counters it reads only know the faces that reached the broker.
    """
    import threading

    from maskmesh.bus import Counters
    from services.capture.spool import Spool, SpoolLimits
    from services.mesh import Mesh, _wait

    mesh = Mesh(tmp_path, tmp_path / "mail", "demo", "cam1")
    spool = Spool(tmp_path / "spool" / "cam1.sqlite3", SpoolLimits(), Counters())
    spool.put("f" * 32, "maskmesh/v1/demo/cam1/faces", b"{}")
    spool.close()
    mesh.processes["capture"] = subprocess.Popen([sys.executable, "-c", "pass"])
    mesh.processes["capture"].wait()
    # No status at all: no face published, nothing pending, so the tally is "drained".
    assert _wait(mesh, drain_timeout_s=10.0, stop=threading.Event()) is False


def test_a_service_that_fails_in_a_temporary_run_says_why(tmp_path: Path) -> None:
    """The run folder goes with the run, so the reason must be in up's own output."""
    video = tmp_path / "broken.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 500)
    result = subprocess.run(
        [sys.executable, "-m", "maskmesh.cli", "up", "--mail-dir", str(tmp_path / "mail"),
         "--source", str(video)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "cannot open video file" in result.stderr, result.stderr[-3000:]
    assert list(tmp_path.glob("maskmesh-up-*")) == []


@pytest.mark.parametrize("option", ["--mail-dir", "--run-dir"])
def test_a_folder_option_naming_a_file_exits_2_with_a_message(
    option: str, tmp_path: Path
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n", encoding="utf-8")
    argv = ["--mail-dir", str(tmp_path / "mail")] if option == "--run-dir" else []
    result = subprocess.run(
        [sys.executable, "-m", "maskmesh.cli", "up", *argv, option, str(a_file)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert option in result.stderr and str(a_file) in result.stderr, result.stderr
    assert _processes_naming(str(tmp_path)) == []


def test_a_redelivered_verdict_does_not_stand_in_for_a_missing_one() -> None:
    """Three faces, three verdicts of which one repeats a face: one face is unanswered."""
    from maskmesh.messages import ServiceStatus, utc_now
    from services.mesh import Tally

    tally = Tally()
    for service, counters in (
        ("capture", {"faces": 3}),
        ("inference", {"verdicts": 3, "duplicates": 1, "pending": 0}),
        ("notifier", {"violations_received": 0, "outbox_pending": 0}),
    ):
        tally.statuses[(service, "x")] = ServiceStatus(
            district="demo", service=service, instance="x", state="online",
            started_at=utc_now(), updated_at=utc_now(), counters=counters, version="t",
        )
    assert not tally.drained()


def test_up_takes_the_model_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.mesh import _parse

    monkeypatch.delenv("MASKMESH_MODEL", raising=False)
    assert _parse([]).model == DEFAULT_MODEL
    alexnet = DEFAULT_MODEL.parent / "maskmesh-alexnet.onnx"
    monkeypatch.setenv("MASKMESH_MODEL", str(alexnet))
    assert _parse([]).model == alexnet
    assert _parse(["--model", str(DEFAULT_MODEL)]).model == DEFAULT_MODEL
    monkeypatch.setenv("MASKMESH_MODEL", str(alexnet))
    assert _parse([]).model_id == MaskClassifier(alexnet).model_id


def test_a_model_file_that_is_no_model_stops_up_before_it_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from services.mesh import _parse

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(SystemExit) as exc:
        _parse(["--model", str(junk)])
    assert exc.value.code == 2
    assert "not a loadable ONNX model" in capsys.readouterr().err


def test_a_folder_given_as_the_model_is_named_as_such(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from services.mesh import _parse

    with pytest.raises(SystemExit) as exc:
        _parse(["--model", str(tmp_path)])
    assert exc.value.code == 2
    assert "is not a file" in capsys.readouterr().err
