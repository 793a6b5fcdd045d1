"""``maskmesh status``: the live state of a district, read from its status topics.

Every service keeps a retained ``ServiceStatus`` on ``maskmesh/v1/{district}/status/...``;
this command subscribes (as the read-only ``operator`` user), collects them for a moment
and prints one line per service instance: state, last seen, uptime, rates and errors.
Rates need two status messages from an instance, so the first look shows counts only;
``--watch`` refreshes and fills them in.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypedDict

import paho.mqtt.client as mqtt

from maskmesh import topics
from maskmesh.bus import Bus
from maskmesh.logs import configure_logging
from maskmesh.messages import DeadLetter, MessageError, ServiceStatus, decode, utc_now
from maskmesh.settings import ServiceSettings, SettingsError, load_settings

# The counters worth a rate column, per service; others are shown as totals.
RATE_COUNTERS = ("frames", "faces", "verdicts", "violations", "mails_sent")
ERROR_COUNTERS = ("dead_letters", "mails_failed", "spool_dropped", "unreadable_frames")


class StatusRow(TypedDict):
    """One instance's line of ``maskmesh status``, as printed in a table or as JSON."""

    service: str
    instance: str
    state: str
    last_seen_s: float
    uptime_s: int
    counters: dict[str, int]
    rates_per_s: dict[str, float]
    errors: dict[str, int]
    detail: str | None


@dataclass
class InstanceView:
    latest: ServiceStatus
    previous: ServiceStatus | None = None

    def rates(self) -> dict[str, float]:
        if self.previous is None:
            return {}
        seconds = (self.latest.updated_at - self.previous.updated_at).total_seconds()
        if seconds <= 0:
            return {}
        return {
            name: (self.latest.counters.get(name, 0) - self.previous.counters.get(name, 0))
            / seconds
            for name in RATE_COUNTERS
            if name in self.latest.counters
        }


@dataclass
class DistrictView:
    """What the status topics said so far; fed from the MQTT thread."""

    instances: dict[tuple[str, str], InstanceView] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_status(self, msg: mqtt.MQTTMessage) -> None:
        try:
            status = decode(ServiceStatus, msg.payload)
        except MessageError:
            return
        key = (status.service, status.instance)
        with self.lock:
            view = self.instances.get(key)
            if view is None:
                self.instances[key] = InstanceView(status)
            elif status.updated_at > view.latest.updated_at:
                view.previous, view.latest = view.latest, status

    def on_dead_letter(self, msg: mqtt.MQTTMessage) -> None:
        try:
            letter = decode(DeadLetter, msg.payload)
        except MessageError:
            return
        with self.lock:
            self.dead_letters.append(letter)
            del self.dead_letters[:-20]

    def rows(self, now: datetime) -> list[StatusRow]:
        with self.lock:
            views = sorted(self.instances.items())
        rows: list[StatusRow] = []
        for (service, instance), view in views:
            status = view.latest
            rows.append(
                {
                    "service": service,
                    "instance": instance,
                    "state": status.state,
                    "last_seen_s": round((now - status.updated_at).total_seconds(), 1),
                    "uptime_s": round((now - status.started_at).total_seconds()),
                    "counters": status.counters,
                    "rates_per_s": {k: round(v, 2) for k, v in view.rates().items()},
                    "errors": {k: status.counters[k] for k in ERROR_COUNTERS
                               if status.counters.get(k)},
                    "detail": status.detail,
                }
            )
        return rows


def format_table(rows: Sequence[StatusRow], stale_after_s: float) -> str:
    if not rows:
        return "no service has published a status in this district yet"
    sw = max(10, *(len(str(row["service"])) for row in rows))
    iw = max(12, *(len(str(row["instance"])) for row in rows))
    header = f"{'service':<{sw}} {'instance':<{iw}} {'state':<8} {'seen':>7} {'up':>8}  activity"
    lines = [header, "-" * len(header)]
    for row in rows:
        state = str(row["state"])
        seen = float(row["last_seen_s"])
        if state == "online" and seen > stale_after_s:
            state = "silent"
        rates = row["rates_per_s"] or {}
        counters = row["counters"] or {}
        activity = ", ".join(
            f"{name} {counters[name]}" + (f" ({rates[name]}/s)" if name in rates else "")
            for name in RATE_COUNTERS
            if name in counters
        )
        errors = ", ".join(f"{k} {v}" for k, v in (row["errors"] or {}).items())
        extra = "; ".join(part for part in (activity, errors and f"errors: {errors}",
                                             row["detail"] or "") if part)
        lines.append(
            f"{row['service']!s:<{sw}} {row['instance']!s:<{iw}} {state:<8} {seen:>6.0f}s "
            f"{int(row['uptime_s']):>7}s  {extra}"
        )
    return "\n".join(lines)


def _seconds(least: float | None) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds, at least ``least`` (None: above 0)."""

    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or value < (least or 0.0) or (least is None and value == 0):
            bound = f"at least {least:g}" if least is not None else "above 0"
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds {bound}")
        return value

    return parse


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="maskmesh status", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="YAML settings (broker, district)")
    parser.add_argument("--district")
    parser.add_argument("--wait-s", type=_seconds(0.0), default=2.0, help="how long to collect")
    parser.add_argument(
        "--watch", type=_seconds(None), metavar="SECONDS", help="refresh every SECONDS"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    try:
        settings = load_settings(ServiceSettings, args.config, district=args.district)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2

    view = DistrictView()
    try:
        bus = Bus(settings, "status", announce=False)
    except SettingsError as exc:  # an unreadable password file
        print(exc, file=sys.stderr)
        return 2
    bus.subscribe(topics.all_status(settings.district), view.on_status)
    bus.subscribe(topics.deadletter(settings.district), view.on_dead_letter)
    if not bus.start(wait_s=10):
        print(
            f"could not reach the broker at {settings.broker.host}:{settings.broker.port}",
            file=sys.stderr,
        )
        bus.stop()
        return 1
    try:
        while True:
            time.sleep(args.wait_s)
            rows = view.rows(utc_now())
            where = f"{settings.broker.host}:{settings.broker.port}"
            if args.json:
                print(json.dumps({"district": settings.district, "broker": where,
                                  "services": rows}))
            else:
                print(f"district {settings.district} on broker {where}")
                print(format_table(rows, stale_after_s=3 * settings.status_interval_s))
            if args.watch is None:
                return 0
            time.sleep(max(0.0, args.watch - args.wait_s))
    except KeyboardInterrupt:
        return 0
    finally:
        bus.stop()
