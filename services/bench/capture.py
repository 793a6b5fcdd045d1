"""Capture on one core: detection, tracking, cropping, JPEG encoding and publishing.

Each run is a child process pinned to one core with OpenCV held to one thread, running
a real ``CaptureNode`` (tracker, spool, MQTT sender thread) against a broker. Frames
are street scenes at the size asked for, each held for ``hold`` consecutive frames as
one scene, as a camera sees people for a while: the tracker confirms a face on its
second sighting and publishes it once, so publishing costs what it costs in service.
Grabbing and decoding the camera stream are not part of the figure.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from services.bench.machine import load_snapshot
from services.bench.stack import DISTRICT, Stack, proc_status_kb

YUNET_FILE = "face_detection_yunet_2026may.onnx"


def _child(config: dict[str, Any], conn: Connection) -> None:
    try:
        conn.send(_measure(config))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        conn.send({"error": f"{exc.__class__.__name__}: {exc}"})


# Limitation: frames come from memory; grabbing and decoding a camera stream (RTSP, a
# video file) are not in the figure and cost extra on the same core.
def _measure(config: dict[str, Any]) -> dict[str, Any]:
    # Pinned before any thread exists, so paho's and the spool sender's threads share it.
    os.sched_setaffinity(0, {config["core"]})
    import cv2

    cv2.setNumThreads(1)
    from maskmesh.messages import utc_now
    from maskmesh.settings import BrokerSettings
    from services.bench.images import frames
    from services.capture.service import CaptureNode
    from services.capture.settings import CaptureSection, CaptureSettings
    from services.capture.sources import Frame

    section = CaptureSection(camera="cam1", detector=config["detector"],
                             detector_model=config["detector_model"], max_fps=None,
                             spool_dir=Path(config["spool_dir"]))
    settings = CaptureSettings(district=DISTRICT, instance="cam1", capture=section,
                               broker=BrokerSettings(**config["broker"]), log_level="WARNING")
    node = CaptureNode(settings)
    node.start(connect_wait_s=5.0)
    scenes, source = frames(config["width"], config["height"], config["scenes"])
    hold = config["hold"]

    def frame(i: int) -> Frame:
        return Frame(image=scenes[(i // hold) % len(scenes)], index=i,
                     scene=i // hold, captured_at=utc_now(), clock_s=time.monotonic())

    for i in range(3):  # warm-up: first forward passes allocate
        node.process(frame(i))
    start_index = 3
    cpu0 = time.process_time()
    started = time.perf_counter()
    count = faces = 0
    while count < config["min_frames"] or time.perf_counter() - started < config["min_s"]:
        faces += node.process(frame(start_index + count))
        count += 1
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    spool_left = len(node.spool)

    # Detection alone on the same frames, to split the cost.
    detected = 0
    det_started = time.perf_counter()
    det_count = 0
    while det_count < max(3, count // 2):
        detected += len(node.detector.detect(frame(det_count).image))
        det_count += 1
    det_elapsed = time.perf_counter() - det_started
    node.finish("benchmark done")
    return {
        "detector": config["detector"], "width": config["width"], "height": config["height"],
        "frames": count, "seconds": round(elapsed, 3), "fps": round(count / elapsed, 2),
        "cpu_cores": round(cpu / elapsed, 3),
        "detect_only_fps": round(det_count / det_elapsed, 2),
        "detections_per_frame": round(detected / det_count, 2),
        "faces_published": faces, "spool_left_at_end": spool_left,
        "hold_frames": hold, "scenes": len(scenes), "frames_source": source,
        "peak_rss_mb": round((proc_status_kb(os.getpid(), "VmHWM") or 0) / 1024, 1),
        "cv2_threads": cv2.getNumThreads(), "affinity": sorted(os.sched_getaffinity(0)),
    }


def detectors(shared: Path) -> list[tuple[str, str | None]]:
    """res10 (the default) and YuNet when its model file is there."""
    found: list[tuple[str, str | None]] = [("res10", None)]
    yunet = shared / "models" / YUNET_FILE
    if yunet.is_file():
        found.append(("yunet", str(yunet)))
    return found


def run(work_dir: Path, shared: Path, quick: bool) -> dict[str, Any]:
    """Frames per second for each detector at 640x480 and 1280x720 on core 0."""
    stack = Stack(work_dir / "capture", camera_count=1)
    stack.start_broker()
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    ctx = mp.get_context("spawn")
    try:
        sizes = [(640, 480)] if quick else [(640, 480), (1280, 720)]
        for name, model in detectors(shared):
            for width, height in sizes:
                config = {
                    "core": 0, "detector": name, "detector_model": model,
                    "width": width, "height": height, "scenes": 4 if quick else 40,
                    "hold": 10, "min_frames": 5 if quick else 100,
                    "min_s": 0.5 if quick else 10.0,
                    "spool_dir": str(work_dir / "capture" / f"spool-{name}-{width}"),
                    "broker": stack.broker_settings("capture-cam1"),
                }
                parent, child = ctx.Pipe()
                process = ctx.Process(target=_child, args=(config, child), daemon=True)
                process.start()
                reply = parent.recv() if parent.poll(300) else {"error": "no answer in 300 s"}
                process.join(30)
                if process.is_alive():
                    process.terminate()
                if "error" in reply:
                    skipped.append(f"{name} {width}x{height}: {reply['error']}")
                    continue
                reply["load"] = load_snapshot()
                rows.append(reply)
    finally:
        stack.close()
    if len(detectors(shared)) == 1:
        skipped.append(f"yunet: {shared / 'models' / YUNET_FILE} not found")
    return {"rows": rows, "skipped": skipped, "core": 0}
