"""A whole district with the real capture process: peak memory of every service.

Broker, one inference worker, the notifier (with a local mail sink) and a real
``maskmesh capture`` process reading a folder of 640x480 street scenes. Peak RSS is
the kernel's high-water mark (``VmHWM`` in /proc/<pid>/status), read while each process
runs and again from its exit status; the verdict times give capture -> verdict latency
of the real path (frame grab to verdict on the integrator's side).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2

from services.bench.images import frames
from services.bench.load import Collector, percentile
from services.bench.machine import load_snapshot
from services.bench.stack import DISTRICT, Stack


def run(model: Path, work_dir: Path, quick: bool, max_fps: float = 15.0) -> dict[str, Any]:
    run_dir = work_dir / "mesh"
    folder = run_dir / "frames"
    folder.mkdir(parents=True, exist_ok=True)
    scenes, source = frames(640, 480, 6 if quick else 120, seed=1)
    for i, image in enumerate(scenes):
        cv2.imwrite(str(folder / f"{i:04d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])

    stack = Stack(run_dir, camera_count=1)
    result: dict[str, Any] = {"frames": len(scenes), "frames_source": source,
                              "max_fps": max_fps, "load_before": load_snapshot()}
    try:
        stack.start_broker()
        stack.start_notifier()
        stack.start_workers(1, model)
        collector = Collector("127.0.0.1", stack.port, DISTRICT, stack.password("integrator"))
        collector.start()
        config = stack.capture_config("cam1", {"source": str(folder), "max_fps": max_fps})
        capture = stack.spawn("capture-cam1", ["capture", "--config", str(config)])
        started = time.monotonic()
        code = capture.wait(timeout_s=60 + len(scenes) / max_fps * 3)
        result["capture_exit"] = code
        result["capture_s"] = round(time.monotonic() - started, 2)
        # Every published face answered (statuses refresh every second).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            faces = stack.board.total("capture", "faces")
            if faces and len(collector.arrivals) >= faces:
                break
            time.sleep(0.2)
        time.sleep(1.5)
        stack.sample()
        arrivals = list(collector.arrivals.values())
        e2e = [1000 * (a.received_at - a.captured_at) for a in arrivals]
        result.update({
            "faces_published": stack.board.total("capture", "faces"),
            "verdicts": len(arrivals),
            "violations": stack.board.total("inference", "violations"),
            "mails_sent": stack.board.total("notifier", "mails_sent"),
            "latency_ms": {f"p{q}": None if not e2e else round(percentile(e2e, q) or 0, 1)
                           for q in (50, 95, 99)},
        })
        collector.stop()
    finally:
        result["memory"] = stack.close()
        result["load_after"] = load_snapshot()
    return result
