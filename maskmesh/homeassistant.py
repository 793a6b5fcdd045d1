"""Home Assistant MQTT discovery for a district: every camera shows up as a device.

``maskmesh homeassistant`` connects as the broker user ``homeassistant`` (generated with
``maskmesh broker --homeassistant``) and publishes retained discovery configs under
``{prefix}/sensor/...`` and ``{prefix}/binary_sensor/...``. Home Assistant then lists, per
camera, a device with:

- ``last verdict`` (mask / no_mask / incorrect) and ``p_mask``, read from the camera's
  verdicts topic with a ``value_template`` on the verdict JSON;
- ``violation`` (on while the last verdict was one), from the same topic;
- ``violations`` and ``faces classified`` (running totals), from a small retained
  counts topic that this command keeps, because no maskmesh message carries a count
  per camera;
- ``online`` (connectivity), from the capture node's retained status topic, which is
  also every camera entity's availability.

A district device carries one ``online`` sensor per service instance seen on the status
topics (inference workers, notifier, this bridge), and the notifier's mail counters.

Home Assistant reads verdicts and status only, never faces or violations: those carry
face photos. The broker's ACL for the ``homeassistant`` user allows nothing else.

Cameras are learnt from the retained capture statuses and from verdicts as they come,
plus ``homeassistant.cameras`` from the settings. Configs are published again whenever
Home Assistant announces itself (``{prefix}/status`` = ``online``). ``--once`` publishes
and exits; ``--remove`` clears the configs (empty retained payloads), which removes the
entities from Home Assistant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ConfigDict, Field

from maskmesh import __version__, topics
from maskmesh.brokerconf import HOMEASSISTANT_USER
from maskmesh.bus import Bus
from maskmesh.ids import CameraId, Identifier, check_camera
from maskmesh.logs import configure_logging
from maskmesh.messages import LABELS, MessageError, ServiceStatus, Verdict, decode
from maskmesh.settings import ServiceSettings, SettingsError, load_settings

logger = logging.getLogger(__name__)

SERVICE = "homeassistant"
# How long --once and --remove listen for retained statuses before they publish.
_SETTLE_S = 1.5
# Face ids remembered to count a redelivered verdict once.
_RECENT_FACES = 10000


class HomeAssistantSection(BaseModel):
    """The ``homeassistant`` section.

    discovery_prefix: Home Assistant's discovery prefix (its MQTT integration setting).
    cameras: cameras to announce even before their capture node has been seen.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    discovery_prefix: Identifier = "homeassistant"
    cameras: list[CameraId] = Field(default_factory=list)


class HomeAssistantSettings(ServiceSettings):
    """Settings of ``maskmesh homeassistant``."""

    homeassistant: HomeAssistantSection = Field(default_factory=HomeAssistantSection)


# -- the discovery payloads ---------------------------------------------------------------


def counts_topic(prefix: str, district: str, camera: str) -> str:
    """The retained per-camera totals this command keeps (Home Assistant ignores it)."""
    return f"{prefix}/maskmesh/{district}/{check_camera(camera)}/counts"


def _origin() -> dict[str, str]:
    return {"name": "maskmesh", "sw_version": __version__}


def district_device(district: str) -> dict[str, Any]:
    return {
        "identifiers": [f"maskmesh_{district}"],
        "name": f"maskmesh {district}",
        "manufacturer": "maskmesh",
        "model": "district mesh",
        "sw_version": __version__,
    }


def camera_device(district: str, camera: str) -> dict[str, Any]:
    return {
        "identifiers": [f"maskmesh_{district}_{camera}"],
        "name": f"{camera} ({district})",
        "manufacturer": "maskmesh",
        "model": "mask-detection camera",
        "sw_version": __version__,
        "via_device": f"maskmesh_{district}",
    }


def _status_availability(topic: str) -> list[dict[str, str]]:
    # A stalled camera is still there (its last values stay meaningful); offline is not.
    return [{
        "topic": topic,
        "value_template": "{{ 'offline' if value_json.state == 'offline' else 'online' }}",
        "payload_available": "online",
        "payload_not_available": "offline",
    }]


_VERDICT_ATTRIBUTES = (
    "{{ {'face_id': value_json.face_id, 'track': value_json.track, "
    "'p_mask': value_json.p_mask, 'violation': value_json.violation, "
    "'threshold': value_json.threshold, 'decided_at': value_json.decided_at, "
    "'model_id': value_json.model_id} | tojson }}"
)
_STATUS_ATTRIBUTES = (
    "{{ {'state': value_json.state, 'detail': value_json.detail, "
    "'updated_at': value_json.updated_at, 'version': value_json.version} | tojson }}"
)
_ONLINE = "{{ 'ON' if value_json.state == 'online' else 'OFF' }}"


def camera_configs(
    prefix: str, district: str, camera: str, bridge_status: str
) -> dict[str, dict[str, Any]]:
    """Discovery topic -> config for one camera's entities.

    bridge_status: this command's own status topic, the availability of the totals.
    """
    check_camera(camera)
    node = f"maskmesh_{district}_{camera}"
    verdicts = topics.verdicts(district, camera)
    status = topics.status(district, "capture", camera)
    counts = counts_topic(prefix, district, camera)
    device = camera_device(district, camera)
    entities: list[tuple[str, str, dict[str, Any]]] = [
        ("sensor", "last_verdict", {
            "name": "Last verdict",
            "state_topic": verdicts,
            "value_template": "{{ value_json.label }}",
            "device_class": "enum",
            "options": list(LABELS),
            "json_attributes_topic": verdicts,
            "json_attributes_template": _VERDICT_ATTRIBUTES,
            "availability": _status_availability(status),
            "icon": "mdi:face-mask",
        }),
        ("sensor", "p_mask", {
            "name": "p_mask",
            "state_topic": verdicts,
            "value_template": "{{ value_json.p_mask }}",
            "state_class": "measurement",
            "suggested_display_precision": 2,
            "availability": _status_availability(status),
        }),
        ("binary_sensor", "violation", {
            "name": "Violation",
            "state_topic": verdicts,
            "value_template": "{{ 'ON' if value_json.violation else 'OFF' }}",
            "device_class": "problem",
            "availability": _status_availability(status),
        }),
        ("sensor", "violations", {
            "name": "Violations",
            "state_topic": counts,
            "value_template": "{{ value_json.violations }}",
            "state_class": "total_increasing",
            "availability": _status_availability(bridge_status),
            "icon": "mdi:alert-circle-outline",
        }),
        ("sensor", "verdicts", {
            "name": "Faces classified",
            "state_topic": counts,
            "value_template": "{{ value_json.verdicts }}",
            "state_class": "total_increasing",
            "availability": _status_availability(bridge_status),
            "icon": "mdi:account-multiple",
        }),
        ("binary_sensor", "online", {
            "name": "Online",
            "state_topic": status,
            "value_template": _ONLINE,
            "device_class": "connectivity",
            "entity_category": "diagnostic",
            "json_attributes_topic": status,
            "json_attributes_template": _STATUS_ATTRIBUTES,
        }),
    ]
    return {
        f"{prefix}/{component}/{node}/{key}/config": {
            # default_entity_id replaced object_id (Home Assistant 2025.10; object_id
            # stops working in 2026.4).
            **config, "unique_id": f"{node}_{key}",
            "default_entity_id": f"{component}.{node}_{key}",
            "device": device, "origin": _origin(), "qos": 1,
        }
        for component, key, config in entities
    }


# Counters of a service worth a sensor on the district device: key -> (name, counter).
_SERVICE_SENSORS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "notifier": (
        ("mails_sent", "Mails sent", "total_increasing"),
        ("outbox_pending", "Mails waiting", "measurement"),
        ("mails_failed", "Mails refused", "total_increasing"),
    ),
    "inference": (("pending", "Faces waiting", "measurement"),),
}


def service_configs(
    prefix: str, district: str, service: str, instance: str
) -> dict[str, dict[str, Any]]:
    """Discovery topic -> config for one service instance's entities (district device)."""
    node = f"maskmesh_{district}"
    status = topics.status(district, service, instance)
    key = f"{service}_{instance}"
    device = district_device(district)
    entities: list[tuple[str, str, dict[str, Any]]] = [
        ("binary_sensor", f"{key}_online", {
            "name": f"{service} {instance} online",
            "state_topic": status,
            "value_template": _ONLINE,
            "device_class": "connectivity",
            "json_attributes_topic": status,
            "json_attributes_template": _STATUS_ATTRIBUTES,
        }),
    ]
    for counter, name, state_class in _SERVICE_SENSORS.get(service, ()):
        entities.append(("sensor", f"{key}_{counter}", {
            "name": f"{service} {instance} {name.lower()}",
            "state_topic": status,
            "value_template": f"{{{{ value_json.counters.{counter} | default(0) }}}}",
            "state_class": state_class,
            "availability": _status_availability(status),
        }))
    return {
        f"{prefix}/{component}/{node}/{object_key}/config": {
            **config, "unique_id": f"{node}_{object_key}",
            "default_entity_id": f"{component}.{node}_{object_key}",
            "device": device, "origin": _origin(), "qos": 1,
        }
        for component, object_key, config in entities
    }


# -- the bridge -------------------------------------------------------------------------


# Limitation: the totals live in one retained message per camera; a broker that loses
# its persistence starts them again at 0 (Home Assistant's statistics take it for a
# reset). And verdicts are not retained, so after a Home Assistant restart the last
# verdict and p_mask read "unknown" until the camera's next face.
class CameraCounts:
    """Running totals for one camera: restored from the retained counts, then counted."""

    def __init__(self) -> None:
        self.base_verdicts = 0
        self.base_violations = 0
        self.restored = False
        self.verdicts = 0
        self.violations = 0

    def payload(self) -> bytes:
        return json.dumps({
            "verdicts": self.base_verdicts + self.verdicts,
            "violations": self.base_violations + self.violations,
        }).encode()


class DiscoveryPublisher:
    """Keeps Home Assistant's view of a district: discovery configs and camera totals.

    settings: validated settings; the broker user should be ``homeassistant``.
    announce: publish configs as cameras and services appear (False for ``--remove``).
    one_off: a run that publishes (or clears) once and exits, next to a running bridge
        perhaps: it takes neither the bridge's client id and session (so verdicts stay
        queued for the bridge) nor its status topic.
    """

    def __init__(
        self, settings: HomeAssistantSettings, announce: bool = True, one_off: bool = False
    ) -> None:
        self.settings = settings
        self.prefix = settings.homeassistant.discovery_prefix
        self.district = settings.district
        self.announce = announce
        self.one_off = one_off
        client_id = f"{SERVICE}-{settings.district}-{settings.instance}"
        # The long-running bridge keeps a persistent session: verdicts that come while it
        # is away are queued by the broker and still counted when it is back.
        self.bus = Bus(
            settings, SERVICE,
            client_id=f"{client_id}-once-{os.getpid()}" if one_off else client_id,
            persistent=not one_off, announce=not one_off,
        )
        self._published: list[mqtt.MQTTMessageInfo] = []
        self.counters = self.bus.counters
        for name in ("configs_published", "verdicts_counted", "dead_letters", "reconnects"):
            self.counters.add(name, 0)
        self._lock = threading.Lock()
        self._cameras: dict[str, CameraCounts] = {}
        self._services: set[tuple[str, str]] = set()
        self._recent: OrderedDict[str, None] = OrderedDict()
        # Totals go out only once the retained ones had time to come back: publishing a
        # lower total first would look like a reset to a total_increasing sensor.
        self._settled = threading.Event()
        for camera in settings.homeassistant.cameras:
            self._cameras[camera] = CameraCounts()

    # -- life cycle -----------------------------------------------------------------

    def start(self, wait_s: float = 10.0) -> bool:
        """Subscribe, connect; True once connected and subscribed."""
        # Counts first: the retained totals should be in before verdicts add to them.
        self.bus.subscribe(f"{self.prefix}/maskmesh/{self.district}/+/counts", self._on_counts)
        self.bus.subscribe(topics.all_status(self.district), self._on_status)
        if not self.one_off:
            # Counting is the running bridge's job alone; two counters would fight over
            # the retained totals.
            self.bus.subscribe(topics.all_verdicts(self.district), self._on_verdict)
        self.bus.subscribe(f"{self.prefix}/status", self._on_homeassistant)
        self.bus.start()
        ok = self.bus.wait_subscribed(wait_s)
        if ok and self.announce:
            for topic, config in self.configs().items():
                self._publish_config(topic, config)
        timer = threading.Timer(_SETTLE_S, self._settle)
        timer.daemon = True
        timer.start()
        return ok

    def _settle(self) -> None:
        self._settled.set()
        if self.announce and not self.one_off:
            for camera in self.cameras:
                self._publish_counts(camera)

    def wait_settled(self, timeout_s: float = _SETTLE_S + 5.0) -> bool:
        """Wait until retained statuses and totals had time to arrive."""
        return self._settled.wait(timeout_s)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait for the PUBACK of everything a one-off run published; False if some failed."""
        deadline = time.monotonic() + timeout_s
        ok = True
        for info in self._published:
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                ok = False
                continue
            ok = ok and info.is_published()
        self._published.clear()
        return ok

    def stop(self) -> None:
        """Publish the offline status (a one-off run has none) and disconnect."""
        self.bus.stop("offline")

    @property
    def cameras(self) -> list[str]:
        with self._lock:
            return sorted(self._cameras)

    def configs(self) -> dict[str, dict[str, Any]]:
        """Every discovery config this bridge publishes now, by topic."""
        with self._lock:
            cameras = sorted(self._cameras)
            services = sorted(self._services | {(SERVICE, self.settings.instance)})
        found: dict[str, dict[str, Any]] = {}
        for camera in cameras:
            found.update(camera_configs(self.prefix, self.district, camera, self.bus.status_topic))
        for service, instance in services:
            found.update(service_configs(self.prefix, self.district, service, instance))
        return found

    def announce_all(self) -> None:
        """Publish every config (retained) and every camera's totals."""
        for topic, config in self.configs().items():
            self._publish_config(topic, config)
        for camera in self.cameras:
            self._publish_counts(camera)

    def remove_all(self) -> list[str]:
        """Clear every config and total this bridge knows of; returns the topics cleared."""
        cleared = list(self.configs())
        cleared += [counts_topic(self.prefix, self.district, camera) for camera in self.cameras]
        for topic in cleared:
            self._keep(self.bus.publish(topic, b"", retain=True))
        return cleared

    # -- messages -------------------------------------------------------------------

    def _keep(self, info: mqtt.MQTTMessageInfo) -> None:
        if self.one_off:
            self._published.append(info)

    def _publish_config(self, topic: str, config: dict[str, Any]) -> None:
        self._keep(self.bus.publish(topic, json.dumps(config).encode(), qos=1, retain=True))
        self.counters.add("configs_published")

    def _publish_counts(self, camera: str) -> None:
        if self.one_off:
            return  # the running bridge owns the totals
        with self._lock:
            counts = self._cameras[camera]
            if not (counts.restored or self._settled.is_set()):
                return  # _settle publishes it
            payload = counts.payload()
        topic = counts_topic(self.prefix, self.district, camera)
        self._keep(self.bus.publish(topic, payload, retain=True))

    def _learn_camera(self, camera: str) -> bool:
        """Add a camera; True when it is new (its configs then go out)."""
        with self._lock:
            if camera in self._cameras:
                return False
            self._cameras[camera] = CameraCounts()
        if not self.announce:
            return True
        logger.info("announcing camera %s of %s to Home Assistant", camera, self.district)
        for topic, config in camera_configs(
            self.prefix, self.district, camera, self.bus.status_topic
        ).items():
            self._publish_config(topic, config)
        self._publish_counts(camera)
        return True

    def _on_status(self, msg: mqtt.MQTTMessage) -> None:
        try:
            status = decode(ServiceStatus, bytes(msg.payload))
        except MessageError as exc:
            # Not ours to dead-letter: the operator's tools see the same message.
            logger.debug("ignoring a status on %s: %s", msg.topic, exc.reason)
            return
        if status.district != self.district:
            return
        if status.service == "capture":
            self._learn_camera(status.instance)
            return
        key = (status.service, status.instance)
        # Limitation: an instance retired for good keeps its (offline) entities until
        # ``--remove`` and a fresh run, as its retained status stays on the broker too.
        with self._lock:
            if key in self._services or key == (SERVICE, self.settings.instance):
                return
            self._services.add(key)
        if not self.announce:
            return
        for topic, config in service_configs(
            self.prefix, self.district, status.service, status.instance
        ).items():
            self._publish_config(topic, config)

    def _on_verdict(self, msg: mqtt.MQTTMessage) -> None:
        try:
            verdict = decode(Verdict, bytes(msg.payload))
        except MessageError as exc:
            logger.debug("ignoring a verdict on %s: %s", msg.topic, exc.reason)
            return
        if verdict.camera != topics.camera_of(msg.topic) or verdict.district != self.district:
            return
        self._learn_camera(verdict.camera)
        with self._lock:
            if verdict.face_id in self._recent:
                return  # a redelivery; already counted
            self._recent[verdict.face_id] = None
            if len(self._recent) > _RECENT_FACES:
                self._recent.popitem(last=False)
            counts = self._cameras[verdict.camera]
            counts.verdicts += 1
            if verdict.violation:
                counts.violations += 1
        self.counters.add("verdicts_counted")
        if self.announce:
            self._publish_counts(verdict.camera)

    def _on_counts(self, msg: mqtt.MQTTMessage) -> None:
        # Only the retained copy the broker hands over on subscribing restores the
        # totals; the echo of our own publishes arrives without the retain flag.
        if not msg.retain or not msg.payload:
            return
        camera = msg.topic.split("/")[-2]
        try:
            check_camera(camera)
            data = json.loads(bytes(msg.payload))
            verdicts, violations = int(data["verdicts"]), int(data["violations"])
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring unreadable totals on %s", msg.topic)
            return
        with self._lock:
            counts = self._cameras.setdefault(camera, CameraCounts())
            if counts.restored:
                return
            counts.restored = True
            counts.base_verdicts, counts.base_violations = max(0, verdicts), max(0, violations)
        if self.announce and counts.verdicts:
            self._publish_counts(camera)  # verdicts came before the totals
        logger.debug("restored the totals of %s: %d verdicts, %d violations",
                     camera, verdicts, violations)

    def _on_homeassistant(self, msg: mqtt.MQTTMessage) -> None:
        # Home Assistant's birth message: it may have lost what it knew, so tell it again.
        if self.announce and bytes(msg.payload).strip() == b"online":
            logger.info("Home Assistant came online; publishing the discovery configs again")
            self.announce_all()


# -- command ----------------------------------------------------------------------------


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="maskmesh homeassistant",
        description="Announce a district's cameras to Home Assistant (MQTT discovery).",
    )
    parser.add_argument("--config", type=Path, help="YAML settings file (or MASKMESH_CONFIG)")
    parser.add_argument("--district", help="district name")
    parser.add_argument("--camera", action="append", help="announce this camera too (repeatable)")
    parser.add_argument("--prefix", help="discovery prefix (homeassistant.discovery_prefix)")
    once = parser.add_mutually_exclusive_group()
    once.add_argument("--once", action="store_true", help="publish the configs, then exit")
    once.add_argument("--remove", action="store_true",
                      help="clear the configs (removes the entities), then exit")
    return parser.parse_args(list(argv))


def _load(args: argparse.Namespace) -> HomeAssistantSettings:
    section: dict[str, Any] = {}
    if args.prefix is not None:
        section["discovery_prefix"] = args.prefix
    if args.camera:
        section["cameras"] = args.camera
    settings = load_settings(
        HomeAssistantSettings, args.config, district=args.district,
        homeassistant=section or None,
    )
    if settings.broker.username is None:
        broker = settings.broker.model_copy(update={"username": HOMEASSISTANT_USER})
        settings = settings.model_copy(update={"broker": broker})
    return settings


def main(argv: Sequence[str]) -> int:
    """``maskmesh homeassistant``: 0 after a clean end, 1 without a broker, 2 for bad settings."""
    args = _parse(argv)
    try:
        settings = _load(args)
        settings.broker.resolved_password()
    except SettingsError as exc:
        print(f"maskmesh homeassistant: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)

    one_off = args.once or args.remove
    bridge = DiscoveryPublisher(settings, announce=not args.remove, one_off=one_off)
    if not bridge.start():
        logger.error(
            "could not connect to %s:%s and subscribe as %s",
            settings.broker.host, settings.broker.port, settings.broker.username,
        )
        bridge.stop()
        return 1
    if one_off:
        # Retained statuses name the cameras and services; give them a moment.
        bridge.wait_settled()
        done = len(bridge.remove_all() if args.remove else bridge.configs())
        if not bridge.flush():
            logger.error("the broker did not confirm every publish; run it again")
            bridge.stop()
            return 1
        if args.remove:
            logger.info("cleared %d retained topics under %s/", done, bridge.prefix)
        else:
            logger.info("published %d discovery configs for cameras %s", done,
                        ", ".join(bridge.cameras) or "(none yet)")
        bridge.stop()
        return 0

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("got %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info("keeping Home Assistant up to date for %s under %s/", bridge.district,
                bridge.prefix)
    while not stop.wait(settings.status_interval_s):
        bridge.bus.publish_status()
    bridge.stop()
    return 0
