"""Open-loop load for the inference service: a publisher process and a verdict collector.

The publisher runs in its own process (its own GIL), one MQTT client per simulated camera
(user ``capture-{camera}``, QoS 1, as a capture node publishes), and sends FaceCrop
messages on a fixed schedule whatever the service does: open loop, so an overloaded
service shows as a growing backlog, not as a slower publisher. Each face id carries the
phase number and a sequence number, and ``captured_at`` is the moment of publishing, so
the collector can attribute every verdict to its phase and time it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from maskmesh import topics
from maskmesh.brokerconf import capture_user
from maskmesh.messages import Box, FaceCrop, encode

_ID_PLACEHOLDER = "0123456789abcdef" * 2
# Microseconds not zero: pydantic writes them only when there are some, and the
# placeholder must have the same length as every real time stamp.
_TIME_PLACEHOLDER_AT = datetime(2000, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
_TIME_PLACEHOLDER = b"2000-01-01T00:00:00.123456Z"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def face_id(phase: int, seq: int) -> str:
    return f"{phase:08x}{seq:024x}"


def phase_of(face: str) -> int:
    return int(face[:8], 16)


@dataclass(frozen=True)
class LoadConfig:
    """What the publisher needs: broker, cameras and their passwords, images."""

    host: str
    port: int
    district: str
    passwords: dict[str, str]  # camera -> password of capture-{camera}
    crops: list[bytes]
    contexts: list[bytes]


def templates(district: str, camera: str, crops: list[bytes],
              contexts: list[bytes]) -> list[bytes]:
    """Encoded FaceCrop payloads with a placeholder face id and capture time."""
    out = []
    for i, crop in enumerate(crops):
        face = FaceCrop(
            face_id=_ID_PLACEHOLDER, district=district, camera=camera, place="bench street",
            frame=i, track=i, captured_at=_TIME_PLACEHOLDER_AT, frame_width=640,
            frame_height=480, box=Box(x1=200, y1=120, x2=360, y2=320), detector_score=0.93,
            crop_jpeg=crop, context_jpeg=contexts[i % len(contexts)],
            context_box=Box(x1=200, y1=120, x2=360, y2=320),
        )
        payload = encode(face)
        assert payload.count(_TIME_PLACEHOLDER) == 1
        assert payload.count(_ID_PLACEHOLDER.encode()) == 1
        out.append(payload)
    return out


def _publisher_main(config: LoadConfig, cameras: list[str], conn: Connection) -> None:
    """The publisher process: connect every camera, then run the phases it is sent."""
    clients: list[tuple[str, mqtt.Client, list[bytes]]] = []
    try:
        for camera in cameras:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-load-{camera}",
                                 protocol=MQTTProtocolVersion.MQTTv5)
            client.username_pw_set(capture_user(camera), config.passwords[camera])
            client.connect(config.host, config.port, keepalive=30)
            client.loop_start()
            clients.append((camera, client, templates(config.district, camera, config.crops,
                                                       config.contexts)))
        deadline = time.monotonic() + 10
        while not all(c.is_connected() for _, c, _ in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("publisher clients did not connect")
            time.sleep(0.02)
        conn.send({"ready": True})
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            _, phase, rate, duration_s = command
            conn.send(_run_phase(clients, config.district, phase, rate, duration_s))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        conn.send({"error": f"{exc.__class__.__name__}: {exc}"})
    finally:
        for _, client, _ in clients:
            client.disconnect()
            client.loop_stop()


def _run_phase(clients: list[tuple[str, mqtt.Client, list[bytes]]], district: str, phase: int,
               rate: float, duration_s: float) -> dict[str, Any]:
    cpu0 = time.process_time()
    topic_of = {camera: topics.faces(district, camera) for camera, _, _ in clients}
    total = max(1, int(round(rate * duration_s)))
    interval = 1.0 / rate
    late: list[float] = []
    infos: list[mqtt.MQTTMessageInfo] = []
    started_wall = time.time()
    started = time.perf_counter()
    for seq in range(total):
        due = started + seq * interval
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        camera, client, payloads = clients[seq % len(clients)]
        now = datetime.now(UTC).strftime(_TIME_FORMAT).encode()
        payload = payloads[(seq // len(clients)) % len(payloads)]
        payload = payload.replace(_ID_PLACEHOLDER.encode(), face_id(phase, seq).encode(), 1)
        payload = payload.replace(_TIME_PLACEHOLDER, now, 1)
        infos.append(client.publish(topic_of[camera], payload, qos=1))
        late.append(time.perf_counter() - due)
    sent_s = time.perf_counter() - started
    unacked = 0
    for info in infos:
        try:
            info.wait_for_publish(timeout=max(0.1, 10.0 - (time.perf_counter() - started - sent_s)))
        except (RuntimeError, ValueError):
            pass
        unacked += 0 if info.is_published() else 1
    late.sort()
    return {
        "phase": phase, "sent": total, "offered_rate": rate, "started_at": started_wall,
        "duration_s": round(sent_s, 3), "achieved_rate": round(total / max(sent_s, 1e-9), 2),
        "late_ms_p99": round(1000 * late[int(0.99 * (len(late) - 1))], 2),
        "late_ms_max": round(1000 * late[-1], 2), "unacked": unacked,
        "payload_bytes": len(clients[0][2][0]),
        "cpu_s": round(time.process_time() - cpu0, 3),
    }


class Publisher:
    """The load generator's process, driven phase by phase from the benchmark."""

    # Limitation: it runs on the same cores as the service it loads (0.02-0.07 cores at
    # the sustained rates seen on 2 cores); a second machine would take it off them.

    def __init__(self, config: LoadConfig, cameras: list[str]) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_publisher_main, args=(config, cameras, child),
                                    name="bench-load", daemon=True)
        self._process.start()
        reply = self._recv(30.0)
        if "error" in reply:
            self.close()
            raise RuntimeError(f"the load publisher failed: {reply['error']}")

    def _recv(self, timeout_s: float) -> dict[str, Any]:
        if not self._conn.poll(timeout_s):
            raise RuntimeError("the load publisher did not answer")
        reply: dict[str, Any] = self._conn.recv()
        return reply

    def run(self, phase: int, rate: float, duration_s: float) -> dict[str, Any]:
        self._conn.send(("run", phase, rate, duration_s))
        reply = self._recv(duration_s * 3 + 60)
        if "error" in reply:
            raise RuntimeError(f"the load publisher failed: {reply['error']}")
        return reply

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)


@dataclass
class Arrival:
    """One verdict as it reached the collector (wall-clock seconds)."""

    captured_at: float
    decided_at: float
    received_at: float
    worker: str


@dataclass
class Collector:
    """Subscribes to every verdict of the district (as ``integrator``) and times them."""

    host: str
    port: int
    district: str
    password: str
    arrivals: dict[str, Arrival] = field(default_factory=dict)
    duplicates: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-collector",
                                   protocol=MQTTProtocolVersion.MQTTv5)
        self._client.username_pw_set("integrator", self.password)
        self._client.on_message = self._on_message
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *args: subscribed.set()
        self._client.connect(self.host, self.port, keepalive=30)
        self._client.subscribe(topics.all_verdicts(self.district), qos=1)
        self._client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the verdict collector could not subscribe")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        received = time.time()
        try:
            data = json.loads(msg.payload)
            face = data["face_id"]
            arrival = Arrival(datetime.fromisoformat(data["captured_at"]).timestamp(),
                              datetime.fromisoformat(data["decided_at"]).timestamp(),
                              received, data["worker"])
        except (ValueError, KeyError, TypeError):
            return
        with self.lock:
            if face in self.arrivals:
                self.duplicates += 1
            else:
                self.arrivals[face] = arrival

    def of_phase(self, phase: int) -> list[Arrival]:
        with self.lock:
            return [a for f, a in self.arrivals.items() if phase_of(f) == phase]

    def wait_for(self, phase: int, count: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.of_phase(phase)) >= count:
                return True
            time.sleep(0.1)
        return False


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def latency_slope(arrivals: list[Arrival]) -> float:
    """Least-squares slope of latency against capture time: > 0 means a growing backlog."""
    if len(arrivals) < 3:
        return 0.0
    xs = [a.captured_at for a in arrivals]
    ys = [a.received_at - a.captured_at for a in arrivals]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def summarise(published: dict[str, Any], arrivals: list[Arrival],
              grace_s: float = 0.5) -> dict[str, Any]:
    """Throughput and latency of one phase from what was sent and what came back."""
    start = published["started_at"]
    end = start + published["duration_s"]
    e2e = [1000 * (a.received_at - a.captured_at) for a in arrivals]
    worker = [1000 * (a.decided_at - a.captured_at) for a in arrivals]
    in_time = sum(1 for a in arrivals if a.received_at <= end + grace_s)
    # Delivered rate over the steady part: from a second in until publishing stopped
    # (the whole of a short phase).
    lead = 1.0 if end - start > 3.0 else 0.0
    window = [a for a in arrivals if start + lead <= a.received_at <= end]
    span = max(1e-9, end - start - lead)
    slope = latency_slope(arrivals)
    last = max((a.received_at for a in arrivals), default=start)
    saturated = len(arrivals) / (last - start) if last > start + 0.5 else None

    def pct(values: list[float], q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else round(value, 2)

    return {
        "offered_rate": round(published["offered_rate"], 2),
        "achieved_offer_rate": published["achieved_rate"],
        "sent": published["sent"],
        "answered": len(arrivals),
        "answered_in_time": in_time,
        "delivered_rate": round(len(window) / span, 2),
        "saturated_rate": None if saturated is None else round(saturated, 2),
        "latency_ms": {"p50": pct(e2e, 50), "p95": pct(e2e, 95), "p99": pct(e2e, 99),
                       "max": pct(e2e, 100)},
        "worker_latency_ms": {"p50": pct(worker, 50), "p99": pct(worker, 99)},
        "latency_slope": round(slope, 4),
        "publisher_late_ms_p99": published["late_ms_p99"],
        "publisher_cpu_s": published["cpu_s"],
        "payload_bytes": published["payload_bytes"],
        "workers": sorted({a.worker for a in arrivals}),
    }
