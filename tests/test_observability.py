"""Metrics and health endpoint of a service, against a real broker."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from maskmesh.bus import Bus
from maskmesh.observability import observe, start_observability
from maskmesh.settings import ServiceSettings

from .conftest import Broker, free_port


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_and_health(broker: Broker) -> None:
    settings = ServiceSettings(
        district=broker.district,
        instance="probe",
        broker=broker.settings("operator"),
        metrics_port=free_port(),
    )
    bus = Bus(settings, "operator")
    ready = {"value": True}
    obs = start_observability(settings, bus, "operator", ready=lambda: ready["value"])
    assert obs is not None
    base = f"http://127.0.0.1:{obs.port}"
    try:
        code, body = _get(f"{base}/healthz")
        assert code == 503 and "not connected" in body

        assert bus.start(wait_s=5)
        bus.counters.add("faces", 3)
        bus.counters.set("pending", 7)
        observe("probe_only_latency", 0.02)
        code, body = _get(f"{base}/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"

        code, text = _get(f"{base}/metrics")
        assert code == 200
        faces = [line for line in text.splitlines() if line.startswith("maskmesh_faces_total{")]
        assert len(faces) == 1 and 'service="operator"' in faces[0] and faces[0].endswith(" 3.0")
        pending = [line for line in text.splitlines() if line.startswith("maskmesh_pending{")]
        assert len(pending) == 1 and pending[0].endswith(" 7.0")
        assert "maskmesh_probe_only_latency_seconds_count 1.0" in text

        ready["value"] = False
        code, body = _get(f"{base}/healthz")
        assert code == 503 and "not ready" in body
    finally:
        obs.stop()
        bus.stop()
