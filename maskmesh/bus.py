"""The MQTT 5 client every service uses, over paho-mqtt.

``Bus`` owns one paho client: it connects in the background with paho's own reconnect
back-off, keeps a retained status message for its service instance (with a last will
that says "offline"), re-subscribes after every reconnect, and offers ``dead_letter``
so a handler never has to drop a message silently.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from maskmesh import __version__, topics
from maskmesh.messages import (
    DeadLetter,
    ServiceState,
    ServiceStatus,
    encode,
    excerpt,
    face_id_of,
    utc_now,
)
from maskmesh.settings import ServiceSettings

# PUBACK reason code: the broker took the message but no subscription matched it.
NO_MATCHING_SUBSCRIBERS = 0x10

logger = logging.getLogger(__name__)

# A connection the broker drops within this many seconds is a "short" one; a run of
# them (two clients taking one client id from each other) is named once, not warned
# about at every take-over.
_SHORT_CONNECTION_S = 10.0
_SHORT_LOSSES_NAMED = 3
_DETAIL_BREAK_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

Handler = Callable[[mqtt.MQTTMessage], None]


class Counters:
    """Named counts shared between threads.

    ``add`` grows a monotonic counter (faces, mails); ``set`` records a current level
    (queue depth). Both appear in the status message; metrics export the first kind as
    Prometheus counters and the second as gauges.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = {}
        self._levels: dict[str, int] = {}

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + amount

    def set(self, name: str, value: int) -> None:
        with self._lock:
            self._levels[name] = max(0, int(value))

    def get(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, self._levels.get(name, 0))

    def totals(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def levels(self) -> dict[str, int]:
        with self._lock:
            return dict(self._levels)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {**self._values, **self._levels}


@dataclass
class Subscription:
    topic_filter: str
    handler: Handler
    qos: int = 1
    # False after ``unsubscribe``: no longer renewed on reconnect, but messages that the
    # broker still delivers from a persistent session keep reaching the handler.
    active: bool = True


class Bus:
    """One service instance's connection to the district broker.

    settings: the service's settings (district, instance, broker section).
    service: the service name used in the status topic ("capture", "inference", ...).
    client_id: MQTT client id; stable ids plus ``persistent=True`` keep a session.
    persistent: keep the broker session (and its queued messages) across disconnects.
    manual_ack: acknowledge QoS 1 messages only when the handler calls ``ack``.
    announce: keep a retained status with a last will; off for viewers and probes.
    receive_maximum: MQTT 5 Receive Maximum sent in CONNECT (QoS 1 messages the broker
        may have in flight to us un-acked); None leaves the broker's default.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        service: str,
        *,
        client_id: str | None = None,
        persistent: bool = False,
        manual_ack: bool = False,
        announce: bool = True,
        receive_maximum: int | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.district = settings.district
        self.instance = settings.instance
        self.client_id = client_id or f"{service}-{settings.district}-{settings.instance}"
        self.persistent = persistent
        self.announce = announce
        self.receive_maximum = receive_maximum
        # Successful CONNACKs so far; a message received under an older value came on a
        # connection that is gone, so its packet id must not be acknowledged any more.
        self.connects = 0
        self.counters = Counters()
        self.started_at = utc_now()
        self.detail: str | None = None
        self.state: ServiceState = "online"
        self.status_topic = topics.status(self.district, service, self.instance)

        self._subscriptions: list[Subscription] = []
        self._handlers: dict[str, Handler] = {}
        self._connected = threading.Event()
        # Set once every active subscription of the current connection is SUBACKed.
        self._subscribed = threading.Event()
        self._suback_waiting: set[int] = set()
        self._lost_logged = False
        self._connected_at = 0.0
        self._short_losses = 0  # connections in a row lost within _SHORT_CONNECTION_S
        self._lock = threading.Lock()
        # Message ids whose latest PUBACK said "no matching subscribers" (see unheard()).
        # Its own lock: paho holds its message lock while it calls _on_publish.
        self._unheard: set[int] = set()
        self._unheard_lock = threading.Lock()
        self._client = self._make_client(manual_ack)

    # -- set-up -----------------------------------------------------------------------

    def _make_client(self, manual_ack: bool) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=manual_ack,
        )
        broker = self.settings.broker
        if broker.username:
            client.username_pw_set(broker.username, broker.resolved_password())
        if broker.tls is not None:
            client.tls_set(
                ca_certs=str(broker.tls.ca_file),
                certfile=str(broker.tls.cert_file) if broker.tls.cert_file else None,
                keyfile=str(broker.tls.key_file) if broker.tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            client.tls_insecure_set(broker.tls.insecure_skip_hostname_check)
        # paho's hints say int, but its back-off arithmetic takes fractions of a second.
        low, high = broker.reconnect_min_delay_s, broker.reconnect_max_delay_s
        client.reconnect_delay_set(low, high)  # type: ignore[arg-type]
        if self.announce:
            client.will_set(
                self.status_topic, self._status_payload("offline"), qos=1, retain=True
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        return client

    def _status_payload(self, state: ServiceState) -> bytes:
        return encode(
            ServiceStatus(
                district=self.district,
                service=self.service,
                instance=self.instance,
                state=state,
                started_at=self.started_at,
                updated_at=utc_now(),
                counters=self.counters.snapshot(),
                detail=_fit_detail(self.detail),
                version=__version__,
            )
        )

    # -- life cycle -------------------------------------------------------------------

    def start(self, wait_s: float | None = None) -> bool:
        """Connect in the background; with wait_s, wait that long for the first CONNACK."""
        broker = self.settings.broker
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = broker.session_expiry_s if self.persistent else 0
        if self.receive_maximum is not None:
            props.ReceiveMaximum = self.receive_maximum
        self._client.connect_async(
            broker.host,
            broker.port,
            keepalive=broker.keepalive_s,
            clean_start=not self.persistent,
            properties=props,
        )
        self._client.loop_start()
        if wait_s is None:
            return True
        return self._connected.wait(wait_s)

    def stop(self, state: ServiceState = "offline") -> None:
        """Publish the final status, disconnect cleanly and stop the network thread."""
        if self._connected.is_set() and self.announce:
            info = self._client.publish(
                self.status_topic, self._status_payload(state), qos=1, retain=True
            )
            try:
                info.wait_for_publish(timeout=5)
            except (RuntimeError, ValueError):
                logger.warning("could not publish the final status of %s", self.client_id)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Wait until connected and every subscription so far is SUBACKed."""
        deadline = time.monotonic() + timeout_s
        if not self._connected.wait(timeout_s):
            return False
        return self._subscribed.wait(max(0.0, deadline - time.monotonic()))

    # -- callbacks --------------------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            # Wrong credentials do not heal by retrying fast; paho backs off for us.
            logger.error(
                "broker %s:%s refused %s: %s",
                self.settings.broker.host,
                self.settings.broker.port,
                self.client_id,
                reason_code,
            )
            return
        self.connects += 1
        with self._lock:
            subscriptions = [sub for sub in self._subscriptions if sub.active]
            self._subscribed.clear()
            self._suback_waiting.clear()
            for sub in subscriptions:
                _, mid = client.subscribe(sub.topic_filter, qos=sub.qos)
                if mid is not None:
                    self._suback_waiting.add(mid)
            if not self._suback_waiting:
                self._subscribed.set()
        if self.announce:
            client.publish(
                self.status_topic, self._status_payload(self.state), qos=1, retain=True
            )
        self._connected_at = time.monotonic()
        if self._lost_logged:
            level = logging.DEBUG if self._short_losses >= 2 else logging.INFO
            logger.log(level, "reconnected to the broker as %s", self.client_id)
            self.counters.add("reconnects")
        else:
            logger.info(
                "connected to %s:%s as %s (session present: %s)",
                self.settings.broker.host,
                self.settings.broker.port,
                self.client_id,
                flags.session_present,
            )
        self._lost_logged = False
        self._connected.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if not was_connected or reason_code.value == 0:
            return
        if time.monotonic() - self._connected_at < _SHORT_CONNECTION_S:
            self._short_losses += 1
        else:
            self._short_losses = 0
        if self._short_losses >= 2:
            # Limitation: Mosquitto closes a taken-over connection without a reason code,
            # so the cause is a guess; it is said once per run of short connections.
            if self._short_losses == _SHORT_LOSSES_NAMED:
                logger.error(
                    "the broker dropped %s %d times within seconds of accepting it; is "
                    "another client running with the same client id?",
                    self.client_id, self._short_losses,
                )
            else:
                logger.debug("lost the broker again (%s)", reason_code)
            self._lost_logged = True
            return
        if not self._lost_logged:
            # Said once; paho keeps retrying with back-off and we say when it worked.
            logger.warning("lost the broker (%s); reconnecting with back-off", reason_code)
            self._lost_logged = True

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        handler = self._handler_for(msg.topic)
        if handler is None:
            return
        try:
            handler(msg)
        except Exception as exc:
            # A handler bug must not kill the network thread or lose the message.
            logger.exception("handler for %s failed", msg.topic)
            self.dead_letter(msg.topic, msg.payload, f"internal error: {exc.__class__.__name__}")
            self.ack(msg)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        for code in reason_codes:
            if code.is_failure:
                logger.error("broker refused a subscription of %s: %s", self.client_id, code)
        with self._lock:
            self._suback_waiting.discard(mid)
            if not self._suback_waiting:
                self._subscribed.set()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        # paho calls this before the message's info reads as published, so a sender that
        # sees is_published() can already ask unheard(). Ids are reused, so each PUBACK
        # replaces what an earlier message with the same id left.
        with self._unheard_lock:
            if reason_code.value == NO_MATCHING_SUBSCRIBERS:
                self._unheard.add(mid)
            else:
                self._unheard.discard(mid)

    def unheard(self, mid: int) -> bool:
        """Whether the broker acknowledged message ``mid`` with no subscriber to give it to.

        MQTT 5 says so in the PUBACK (reason 0x10); the message is then gone. A broker that
        restarts keeps plain subscriptions of persistent sessions but, in Mosquitto 2.0,
        not shared ones, so faces published before the workers are back would be dropped.
        Asking clears the mark.

        Limitation: the broker says so only when no subscription at all matched; a plain
        (not shared) subscriber to a faces topic, such as a recorder, hides an absent
        inference worker.
        """
        with self._unheard_lock:
            if mid in self._unheard:
                self._unheard.discard(mid)
                return True
            return False

    def _handler_for(self, topic: str) -> Handler | None:
        with self._lock:
            subscriptions = list(self._subscriptions)
        for sub in subscriptions:
            if mqtt.topic_matches_sub(_strip_share(sub.topic_filter), topic):
                return sub.handler
        return None

    # -- operations -------------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Route messages matching topic_filter to handler, now and after reconnects."""
        with self._lock:
            self._subscriptions.append(Subscription(topic_filter, handler, qos))
            if self._connected.is_set():
                self._subscribed.clear()
                _, mid = self._client.subscribe(topic_filter, qos=qos)
                if mid is not None:
                    self._suback_waiting.add(mid)

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop subscribing to topic_filter, now and after reconnects.

        Its handler keeps receiving what the broker still delivers (a persistent
        session's queued messages arrive after an UNSUBSCRIBE), so none goes un-acked.
        """
        with self._lock:
            for sub in self._subscriptions:
                if sub.topic_filter == topic_filter:
                    sub.active = False
        if self._connected.is_set():
            self._client.unsubscribe(topic_filter)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def ack(self, msg: mqtt.MQTTMessage) -> None:
        """Acknowledge a message received with manual_ack (no-op otherwise)."""
        if self._client._manual_ack and msg.qos > 0:  # noqa: SLF001 - paho has no getter
            self._client.ack(msg.mid, msg.qos)

    def dead_letter(
        self, source_topic: str, payload: bytes | bytearray, reason: str,
        face_id: str | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """Publish what could not be processed to the district's dead-letter topic.

        Returns the publish handle, so a caller can wait for the PUBACK before it
        acknowledges the message that was dead-lettered.
        """
        self.counters.add("dead_letters")
        logger.warning("dead-lettered a message from %s: %s", source_topic, reason)
        letter = DeadLetter(
            district=self.district,
            service=self.service,
            instance=self.instance,
            source_topic=source_topic[:512],
            reason=reason[:2000],
            received_at=utc_now(),
            payload_bytes=len(payload),
            payload_excerpt=excerpt(payload),
            face_id=face_id or face_id_of(payload),
        )
        return self.publish(topics.deadletter(self.district), encode(letter), qos=1)

    def publish_status(self, state: ServiceState | None = None, detail: str | None = None) -> None:
        """Refresh the retained status message (counters, state, detail)."""
        if not self.announce:
            return
        if state is not None:
            self.state = state
        if detail is not None:
            self.detail = detail
        self.publish(self.status_topic, self._status_payload(self.state), qos=1, retain=True)


def _strip_share(topic_filter: str) -> str:
    """``$share/group/a/b`` -> ``a/b``: messages arrive on the plain topic."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def _fit_detail(detail: str | None, limit: int = 200) -> str | None:
    """A detail the status message accepts: one line of at most ``limit`` characters.

    A service may put an error text with a long path in it; refusing that would lose
    the whole status message (and end the thread that publishes it).
    """
    if detail is None:
        return None
    line = " ".join(_DETAIL_BREAK_RE.sub(" ", detail).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
