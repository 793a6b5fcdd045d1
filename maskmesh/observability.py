"""Prometheus metrics and a health endpoint for a service, on one small HTTP server.

``start_observability`` serves ``/metrics`` (every ``bus.counters`` total as
``maskmesh_<name>_total``, every level as ``maskmesh_<name>``, plus latency
histograms recorded with ``observe``) and ``/healthz`` (200 while the service is
connected and ready, 503 otherwise, with a JSON body saying why). Compose health
checks and Kubernetes probes call ``/healthz``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from maskmesh.bus import Bus
from maskmesh.settings import ServiceSettings, SettingsError

logger = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
_HISTOGRAMS: dict[str, Histogram] = {}
_HISTOGRAM_LOCK = threading.Lock()
# Seconds; spans a fast local verdict (a few ms) to a mail that waited for a server.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def observe(name: str, seconds: float) -> None:
    """Record one latency sample in the histogram ``maskmesh_<name>_seconds``."""
    with _HISTOGRAM_LOCK:
        histogram = _HISTOGRAMS.get(name)
        if histogram is None:
            histogram = Histogram(
                f"maskmesh_{name}_seconds", f"{name} latency", buckets=_BUCKETS, registry=REGISTRY
            )
            _HISTOGRAMS[name] = histogram
    histogram.observe(seconds)


class _BusCollector(Collector):
    """Exports the counters of every Bus registered in this process (usually one)."""

    def __init__(self) -> None:
        self.buses: list[tuple[Bus, str]] = []

    def collect(self) -> Iterator[Metric]:
        labels = ["district", "service", "instance"]
        families: dict[str, Metric] = {}
        for bus, service in list(self.buses):
            values = [bus.district, service, bus.instance]
            for name, total in bus.counters.totals().items():
                family = families.setdefault(
                    name, CounterMetricFamily(f"maskmesh_{name}", f"{name} so far", labels=labels)
                )
                family.add_metric(values, total)  # type: ignore[attr-defined]
            for name, level in bus.counters.levels().items():
                family = families.setdefault(
                    name, GaugeMetricFamily(f"maskmesh_{name}", f"current {name}", labels=labels)
                )
                family.add_metric(values, level)  # type: ignore[attr-defined]
            connected = families.setdefault(
                "connected",
                GaugeMetricFamily("maskmesh_connected", "1 while connected", labels=labels),
            )
            state = 1.0 if bus.connected else 0.0
            connected.add_metric(values, state)  # type: ignore[attr-defined]
        yield from families.values()


_COLLECTOR = _BusCollector()
REGISTRY.register(_COLLECTOR)


class Observability:
    """The running HTTP server; ``stop`` shuts it down."""

    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread, bus: Bus) -> None:
        self.bus = bus
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        _COLLECTOR.buses[:] = [(b, s) for b, s in _COLLECTOR.buses if b is not self.bus]
        self.server.shutdown()
        self.server.server_close()


def check_metrics_port(settings: ServiceSettings) -> None:
    """Raise SettingsError when metrics_host:metrics_port cannot be served (in use, bad host).

    Called at start-up beside the settings check, so such a mistake stops a service with
    a message and status 2 instead of a traceback once it is connected.
    """
    if not settings.metrics_port:  # None: off; 0: any free port
        return
    address = (settings.metrics_host, settings.metrics_port)
    # The same socket options as the HTTP server, so that this test means what it will.
    with socket.socket(ThreadingHTTPServer.address_family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise SettingsError(
                f"metrics_port: cannot serve /metrics on {address[0]}:{address[1]} "
                f"({exc.strerror or exc})"
            ) from None


def start_observability(
    settings: ServiceSettings,
    bus: Bus,
    service: str,
    ready: Callable[[], bool] = lambda: True,
) -> Observability | None:
    """Serve /metrics and /healthz on settings.metrics_port; None when it is not set."""
    if settings.metrics_port is None:
        return None
    _COLLECTOR.buses.append((bus, service))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path.split("?")[0] == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
            elif self.path.split("?")[0] == "/healthz":
                problems = []
                if not bus.connected:
                    problems.append("not connected to the broker")
                if not ready():
                    problems.append("not ready")
                body = {"status": "ok" if not problems else "unhealthy", "problems": problems,
                        "service": service, "instance": bus.instance, "state": bus.state}
                code = 200 if not problems else 503
                self._reply(code, "application/json", json.dumps(body).encode())
            else:
                self._reply(404, "text/plain", b"not found\n")

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            # Probes call every few seconds; their access lines would drown the log.
            return

    server = ThreadingHTTPServer((settings.metrics_host, settings.metrics_port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="observability", daemon=True)
    thread.start()
    logger.info(
        "metrics and health on http://%s:%s/", settings.metrics_host, server.server_address[1]
    )
    return Observability(server, thread, bus)
