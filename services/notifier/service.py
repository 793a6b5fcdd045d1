"""``maskmesh notifier``: turns a district's violations into one alert each.

The notifier subscribes to every camera's violations as user ``notifier`` with QoS 1, a
persistent session under a stable client id and manual acknowledgements: a violation is
acknowledged only once the outbox has committed it (or it was dead-lettered), so neither
a crash nor a broker restart loses one. The MQTT thread only validates and files; the
sender thread delivers, so a slow or dead mail server never holds up receiving.

Counters (in the retained status and on /metrics): ``violations_received`` (every valid
violation, duplicates included), ``duplicates`` (a face_id seen before),
``mails_suppressed`` (another frame of a track that already alerted), ``mails_sent``,
``mails_retried``, ``mails_failed`` (refused for good), ``digests_sent`` and
``alerts_digested`` (alerts that went out inside a digest), ``sms_sent``/``sms_retried``/
``sms_failed``, ``dead_letters``, ``outbox_errors`` (violations the outbox could not
take, kept un-acknowledged and retried), and the level ``outbox_pending``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt

from maskmesh import topics
from maskmesh.bus import Bus
from maskmesh.logs import configure_logging
from maskmesh.messages import MessageError, Violation, decode
from maskmesh.observability import check_metrics_port
from maskmesh.settings import SettingsError, load_settings
from services.notifier.channels import Channel, SmtpChannel, TwilioSmsChannel
from services.notifier.outbox import Accepted, Outbox
from services.notifier.sender import Sender
from services.notifier.settings import NotifierSettings

logger = logging.getLogger(__name__)

SERVICE = "notifier"
# QoS 1 messages in flight towards the notifier at once; filing one takes milliseconds.
RECEIVE_MAXIMUM = 32
# Shown on /metrics (at 0) from the start, before anything has happened.
_COUNTERS = (
    "violations_received", "duplicates", "mails_suppressed", "mails_sent", "mails_retried",
    "mails_failed", "digests_sent", "alerts_digested", "dead_letters", "reconnects",
    "outbox_errors",
)


def build_channels(
    settings: NotifierSettings, twilio_client: object | None = None
) -> list[Channel]:
    """The delivery channels the settings ask for: mail, and SMS when Twilio is on."""
    section = settings.notifier
    channels: list[Channel] = []
    if section.recipients:
        channels.append(SmtpChannel(section))
    if section.twilio.enabled:
        channels.append(TwilioSmsChannel(section, client=twilio_client))
    return channels


@dataclass(frozen=True)
class _Held:
    """A violation the outbox refused, with the connection it came on."""

    msg: mqtt.MQTTMessage
    connects: int
    violation: Violation


class Notifier:
    """The notifier service: bus subscription, outbox and sender thread.

    settings: validated notifier settings.
    channels: delivery channels; built from the settings when None.
    clock: epoch seconds, for the policy and the sender (tests steer it).
    """

    def __init__(
        self,
        settings: NotifierSettings,
        channels: Sequence[Channel] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.section = settings.notifier
        self.clock = clock
        self.channels = list(channels) if channels is not None else build_channels(settings)
        # Limitation: one notifier per district. The stable client id keeps the broker
        # session across restarts; a second instance with the same id would take the
        # session over, and one with another id would mail every alert a second time.
        self.bus = Bus(
            settings,
            SERVICE,
            client_id=self.section.client_id or f"{SERVICE}-{settings.district}",
            persistent=True,
            manual_ack=True,
            receive_maximum=RECEIVE_MAXIMUM,
        )
        self.counters = self.bus.counters
        for name in _COUNTERS:
            self.counters.add(name, 0)
        self.outbox = Outbox(
            self.section.outbox_path, self.section, [c.name for c in self.channels]
        )
        self.sender = Sender(
            self.outbox, self.channels, self.section, self.counters,
            report=self._report, clock=clock,
        )
        self._accepting = threading.Event()
        self._observability: Any = None
        # Violations the outbox could not take (full or read-only disk), not acknowledged.
        self._held: list[_Held] = []
        self._held_lock = threading.Lock()

    # -- life cycle -------------------------------------------------------------------

    def start(self, wait_s: float | None = None) -> bool:
        """Start delivering what the outbox holds, then connect and subscribe."""
        self.counters.set("outbox_pending", self.outbox.pending_count())
        configured = {c.name for c in self.channels}
        for channel, count in self.outbox.pending_by_channel().items():
            if channel not in configured:
                # Limitation: such rows wait until the channel is configured again; they
                # are neither sent nor dropped, and they count in outbox_pending.
                logger.warning(
                    "%d alerts wait for the %s channel, which is not configured", count, channel
                )
        self.sender.start()
        self._accepting.set()
        self.bus.subscribe(topics.all_violations(self.settings.district), self._on_violation)
        connected = self.bus.start(wait_s)
        if connected and wait_s is not None:
            # Until the SUBACK, a violation from a first-ever session would pass us by.
            wait_subscribed = getattr(self.bus, "wait_subscribed", None)
            if wait_subscribed is not None:
                connected = bool(wait_subscribed(wait_s))
        self._observability = _start_observability(self.settings, self.bus, self._ready)
        logger.info(
            "notifier for %s: %s; outbox %s (%d pending)",
            self.settings.district,
            ", ".join(c.name for c in self.channels),
            self.section.outbox_path,
            self.counters.get("outbox_pending"),
        )
        return connected

    def stop(self) -> None:
        """Stop taking messages, finish the delivery in progress, close, go offline."""
        self._accepting.clear()
        if self._held:
            logger.warning(
                "%d violations the outbox could not take stay with the broker for the next "
                "start", len(self._held),
            )
        # The SMTP time-out bounds a delivery in progress; a little more for the rest.
        if not self.sender.stop(self.section.smtp.timeout_s + 5.0):
            logger.warning("the sender did not finish in time; its alert stays pending")
        self.counters.set("outbox_pending", self.outbox.pending_count())
        self.bus.stop()
        if self._observability is not None:
            self._observability.stop()
        self.outbox.close()

    def _ready(self) -> bool:
        # Set once the outbox is open and the sender runs; cleared as the notifier stops.
        return self._accepting.is_set()

    def _report(self, detail: str | None) -> None:
        self.bus.detail = detail
        if self.bus.connected:
            self.bus.publish_status()

    # -- receiving --------------------------------------------------------------------

    def _on_violation(self, msg: mqtt.MQTTMessage) -> None:
        if not self._accepting.is_set():
            # Not acknowledged: the persistent session hands it over again next start.
            return
        payload = bytes(msg.payload)
        try:
            violation = decode(Violation, payload)
        except MessageError as exc:
            self.bus.dead_letter(msg.topic, payload, exc.reason)
            self.bus.ack(msg)
            return
        camera = topics.camera_of(msg.topic)
        if violation.camera != camera or violation.district != self.settings.district:
            self.bus.dead_letter(
                msg.topic, payload,
                f"violation of {violation.district}/{violation.camera} on topic {msg.topic}",
                face_id=violation.face_id,
            )
            self.bus.ack(msg)
            return

        if self._held:
            # Keep the order: what the outbox refused before goes in first.
            self.retry_unfiled()
        try:
            result = self.outbox.accept(violation, self.clock())
        except (sqlite3.Error, OSError) as exc:
            self._hold(msg, violation, exc)
            return
        # Only now, with the rows committed, may the broker forget the message.
        self.bus.ack(msg)
        self._filed(violation, result)

    def _hold(self, msg: mqtt.MQTTMessage, violation: Violation, exc: BaseException) -> None:
        """The outbox refused a violation (disk full, read-only): keep it un-acknowledged."""
        self.counters.add("outbox_errors")
        with self._held_lock:
            self._held.append(_Held(msg, self.bus.connects, violation))
        logger.error(
            "cannot file violation %s in the outbox %s (%s); not acknowledged, so the "
            "broker keeps it until the outbox takes it",
            violation.face_id, self.section.outbox_path, exc,
            extra={"face_id": violation.face_id, "camera": violation.camera},
        )
        self._report(f"outbox {self.section.outbox_path} cannot be written: {exc}")

    def retry_unfiled(self) -> None:
        """File the violations the outbox refused before; acknowledge each once committed."""
        with self._held_lock:
            held, self._held = self._held, []
        if not held:
            return
        still: list[_Held] = []
        for entry in held:
            if entry.connects != self.bus.connects:
                # Received on a connection that is gone: its packet id means nothing now,
                # and the broker sends the violation again on the new one.
                continue
            if still:
                still.append(entry)
                continue
            try:
                result = self.outbox.accept(entry.violation, self.clock())
            except (sqlite3.Error, OSError):
                still.append(entry)
                continue
            self.bus.ack(entry.msg)
            self._filed(entry.violation, result)
        with self._held_lock:
            self._held = still + self._held
        if not still:
            logger.info("the outbox %s takes violations again", self.section.outbox_path)
            self._report(None)

    def _filed(self, violation: Violation, result: Accepted) -> None:
        """Count and log what the outbox did with a violation, and wake the sender."""
        self.counters.add("violations_received")
        ids = {
            "face_id": violation.face_id, "camera": violation.camera, "track": violation.track,
            "district": violation.district,
        }
        if result.duplicate:
            self.counters.add("duplicates")
            logger.info(
                "violation %s seen before; no second alert", violation.face_id, extra=ids
            )
            return
        if result.suppressed:
            self.counters.add("mails_suppressed")
            logger.debug(
                "violation %s suppressed: camera %s track %d already alerted",
                violation.face_id, violation.camera, violation.track, extra=ids,
            )
        else:
            for channel, (_, mode, reason) in result.decisions.items():
                if mode == "digest":
                    logger.info(
                        "violation %s held for the %s digest (%s)",
                        violation.face_id, channel, reason, extra=ids,
                    )
                else:
                    logger.debug(
                        "violation %s queued for %s", violation.face_id, channel, extra=ids
                    )
        self.counters.set("outbox_pending", self.outbox.pending_count())
        self.sender.wake()

    # -- running ----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Refresh the retained status every status_interval_s until ``stop`` is set."""
        while not stop.wait(self.settings.status_interval_s):
            if self._held:
                self.retry_unfiled()
            if self.bus.connected:
                self.bus.publish_status()


def _start_observability(
    settings: NotifierSettings, bus: Bus, ready: Callable[[], bool]
) -> Any:
    try:
        from maskmesh.observability import start_observability
    except ImportError:
        return None
    return start_observability(settings, bus, SERVICE, ready=ready)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskmesh notifier", description="Send one alert mail per mask violation."
    )
    parser.add_argument("--config", type=Path, help="YAML settings file (or MASKMESH_CONFIG)")
    parser.add_argument("--district", help="district name")
    parser.add_argument("--smtp-host", help="mail server host")
    parser.add_argument("--smtp-port", type=int, help="mail server port")
    parser.add_argument("--outbox", type=Path, help="SQLite outbox file")
    parser.add_argument("--metrics-port", type=int, help="serve /metrics and /healthz here")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    section: dict[str, Any] = {}
    smtp = {k: v for k, v in (("host", args.smtp_host), ("port", args.smtp_port)) if v}
    if smtp:
        section["smtp"] = smtp
    if args.outbox is not None:
        section["outbox_path"] = args.outbox
    return {
        "district": args.district,
        "metrics_port": args.metrics_port,
        "log_level": args.log_level,
        "notifier": section or None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the notifier until SIGTERM or SIGINT; exit 2 on bad settings."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = load_settings(NotifierSettings, args.config, **_overrides(args))
        check_metrics_port(settings)
    except SettingsError as exc:
        print(f"maskmesh notifier: {exc}", file=sys.stderr)
        return 2
    try:
        notifier = Notifier(settings)
    except SettingsError as exc:
        print(f"maskmesh notifier: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        print(
            f"maskmesh notifier: cannot open the outbox {settings.notifier.outbox_path}: {exc}",
            file=sys.stderr,
        )
        return 1
    configure_logging(settings.log_level, settings.log_format)
    # Twilio's client logs every request at INFO; its answers are not an operator's news.
    logging.getLogger("twilio").setLevel(logging.WARNING)

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("got %s; finishing", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    notifier.start()
    try:
        notifier.run(stop)
    finally:
        notifier.stop()
    logger.info("notifier stopped")
    return 0
