"""``maskmesh inference``: a worker that turns face crops into verdicts and violations.

Workers of a district share one MQTT 5 shared subscription, so each face reaches one of
them. A face is acknowledged to the broker only once its verdict (and its violation, if
any) has been published and PUBACKed, or once it was dead-lettered; so a worker that
dies loses nothing. With Mosquitto a shared subscription does not hand a dead member's
faces to the others: the broker keeps queueing that member's share in its persistent
session and delivers all of it, un-acknowledged ones included, when a client with the
same id comes back. Hence the stable client id ``inference-{district}-{worker_id}``
and a persistent session; a worker that is retired for good runs ``--drain`` once.

Threads: paho's network thread only decodes each payload and queues it
(``PendingQueue``, bounded: a full queue blocks that thread, which is the
back-pressure). The worker thread takes micro-batches, decodes the JPEG crops, makes
one model call per batch, publishes, and acknowledges faces whose publishes were
PUBACKed. A small thread refreshes the retained status; the main thread waits for a
signal.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import cv2
import numpy as np
import paho.mqtt.client as mqtt

from maskmesh import topics
from maskmesh.bus import Bus
from maskmesh.logs import configure_logging
from maskmesh.messages import (
    LABELS,
    FaceCrop,
    MessageError,
    Verdict,
    Violation,
    decode,
    encode,
    utc_now,
)
from maskmesh.observability import Observability, check_metrics_port, observe, start_observability
from maskmesh.settings import SettingsError, load_settings
from services.inference.classifier import MaskClassifier, ModelLoadError, Prediction
from services.inference.pending import PendingQueue, RecentIds
from services.inference.settings import InferenceSettings

logger = logging.getLogger(__name__)

SERVICE = "inference"
_COUNTERS = (
    "faces_received", "verdicts", "violations", "batches", "duplicates", "dead_letters",
    "reconnects",
)
# How long the worker sleeps on an empty queue: short while PUBACKs are outstanding (it
# acknowledges between batches), longer when there is nothing to do at all.
_IDLE_WITH_ACKS_S = 0.02
_IDLE_S = 0.5
_CONNECT_WAIT_S = 10.0
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass
class Inbound:
    """A message from the faces topic, as the network thread queued it.

    face: the decoded face, or None when the payload was dead-lettered on arrival.
    published: publishes that must be PUBACKed before the message is acknowledged.
    """

    msg: mqtt.MQTTMessage
    connects: int
    arrived_at: float
    face: FaceCrop | None
    published: list[mqtt.MQTTMessageInfo] = field(default_factory=list)


@dataclass
class AwaitingAck:
    """A message whose outcome is published; acknowledged once all of it is PUBACKed."""

    msg: mqtt.MQTTMessage
    connects: int
    published: list[mqtt.MQTTMessageInfo]


def _publish_state(info: mqtt.MQTTMessageInfo) -> bool | None:
    """True once PUBACKed, False while waiting, None if paho could not send it.

    paho marks a publish made while disconnected as failed even though it resends it
    after reconnecting; either way the face is redelivered to this client id, so such a
    message is simply not acknowledged.
    """
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return None


def _payload(msg: mqtt.MQTTMessage) -> bytes:
    # paho hands over bytes; the bytearray case of its type hint never copies in practice.
    payload = msg.payload
    return payload if isinstance(payload, bytes) else bytes(payload)


def _short(text: str, limit: int = 200) -> str:
    """One line of at most limit characters, fit for ServiceStatus.detail."""
    line = _CONTROL_RE.sub(" ", text).strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


class InferenceWorker:
    """One inference worker: subscription, micro-batching, publishing, acknowledging.

    settings: the worker's settings.
    classifier: a loaded model; loaded from settings when None (may raise
        ModelLoadError).
    drain: retire this worker: stop taking new faces from the shared subscription and
        only finish what its broker session still holds (then ``clear_session``).
    """

    def __init__(
        self,
        settings: InferenceSettings,
        classifier: MaskClassifier | None = None,
        *,
        drain: bool = False,
    ) -> None:
        self.settings = settings
        self.section = settings.inference
        self.drain_mode = drain
        self.classifier = classifier or MaskClassifier(
            self.section.model_path, intra_op_threads=settings.intra_op_threads
        )
        unknown = set(self.classifier.info.class_names) - set(LABELS)
        if unknown:
            raise ModelLoadError(
                f"{self.section.model_path}: class names {sorted(unknown)} are not "
                f"labels of the message contract {list(LABELS)}"
            )
        self.model_id = self.classifier.model_id
        self.threshold = (
            self.section.threshold
            if self.section.threshold is not None
            else self.classifier.threshold
        )
        self.worker_id = settings.worker_id
        self.bus = Bus(
            settings.model_copy(update={"instance": self.worker_id}),
            SERVICE,
            persistent=True,
            manual_ack=True,
            # On a broker that honours it, this alone bounds what is in flight to us; Mosquitto
            # 2.0.11 lets another full window through on every PUBACK, so the blocking
            # queue below is what really holds the bound there.
            receive_maximum=self.section.max_pending,
        )
        self.client_id = self.bus.client_id
        self.counters = self.bus.counters
        self.queue: PendingQueue[Inbound] = PendingQueue(
            self.section.max_pending,
            arrived_at=lambda item: item.arrived_at,
            on_depth=lambda depth: self.counters.set("pending", depth),
        )
        self.counters.set("pending", 0)
        for name in _COUNTERS:
            self.counters.add(name, 0)  # every counter is on /metrics from the start
        self.filter = topics.shared_faces(settings.district)
        self._recent = RecentIds(self.section.duplicate_window_s)
        self._awaiting: list[AwaitingAck] = []
        self._busy = threading.Event()
        self._finished = threading.Event()
        self._last_activity = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="inference-worker", daemon=True)
        self._status_thread = threading.Thread(
            target=self._refresh_status, name="inference-status", daemon=True
        )
        self._observability: Observability | None = None

    # -- life cycle -------------------------------------------------------------------

    def start(self, wait_s: float = _CONNECT_WAIT_S) -> bool:
        """Subscribe, connect and start the worker thread; True once connected."""
        self.bus.detail = _short(
            f"model {self.model_id}, threshold {self.threshold:g}, worker {self.worker_id}"
            + (", draining" if self.drain_mode else "")
        )
        # Routing is in place before the CONNACK: a resumed session delivers its queued
        # faces right after it, before any SUBSCRIBE of ours.
        self.bus.subscribe(self.filter, self.on_face, qos=1)
        self._thread.start()
        self._status_thread.start()
        self.bus.start()
        connected = self.bus.wait_subscribed(wait_s)
        self._observability = start_observability(
            self.settings, self.bus, SERVICE, ready=self.serving
        )
        logger.info(
            "inference worker %s: model %s, threshold %g, batches of up to %d within %g ms, "
            "%d pending at most, %d ONNX Runtime threads",
            self.client_id,
            self.model_id,
            self.threshold,
            self.section.max_batch,
            self.section.max_wait_ms,
            self.section.max_pending,
            self.settings.intra_op_threads,
        )
        if self.drain_mode:
            # Limitation: the UNSUBSCRIBE goes out only if the first connection came within
            # wait_s; otherwise the session keeps its subscription and the drain ends on
            # idleness while new faces may still be queued for it. And if the last worker
            # of a district drains, the broker has no member left to give new faces to.
            if connected:
                self.bus.unsubscribe(self.filter)
                logger.info("draining %s: unsubscribed, finishing its session", self.client_id)
            else:
                logger.warning("draining %s: not connected yet, cannot unsubscribe", self.client_id)
        return connected

    def ready(self) -> bool:
        """The worker thread is alive and the queue still takes faces."""
        return self._thread.is_alive() and not self.queue.closed

    def serving(self) -> bool:
        """What /healthz reports: ready, and the faces subscription is SUBACKed.

        The model is loaded before the worker exists, so a worker is never without it.
        """
        return self.ready() and self.bus.wait_subscribed(0)

    @property
    def idle_s(self) -> float:
        """Seconds since the last face arrived or was finished (0 while busy)."""
        if self._busy.is_set() or len(self.queue) or self._awaiting:
            return 0.0
        return time.monotonic() - self._last_activity

    def stop(self) -> None:
        """Finish the batch in hand, leave the rest un-acked for redelivery, disconnect."""
        left = self.queue.close()
        if left:
            logger.info(
                "leaving %d queued faces un-acknowledged; the broker redelivers them to %s",
                len(left),
                self.client_id,
            )
        self._thread.join(self.section.stop_timeout_s + 5.0)
        if self._thread.is_alive():
            logger.error("the worker thread did not finish its batch in time")
        self._status_thread.join(2.0)
        if self._observability is not None:
            self._observability.stop()
        self.bus.stop("offline")
        logger.info("inference worker %s stopped: %s", self.client_id, self.counters.snapshot())

    def _refresh_status(self) -> None:
        # Its own thread: the worker may sit for max_wait_ms in a batch, or in a long
        # model call, and the backlog (pending) should stay visible meanwhile.
        while not self._finished.wait(self.settings.status_interval_s):
            self.bus.publish_status()

    # -- network thread ---------------------------------------------------------------

    def on_face(self, msg: mqtt.MQTTMessage) -> None:
        """Decode and queue one faces message (runs on paho's network thread)."""
        connects = self.bus.connects
        if self.queue.closed:
            # Stopping: not acknowledged, so the broker redelivers it to this client id.
            return
        self.counters.add("faces_received")
        self._last_activity = time.monotonic()
        item = Inbound(msg=msg, connects=connects, arrived_at=time.monotonic(), face=None)
        try:
            item.face = self._decode(msg)
        except MessageError as exc:
            item.published.append(self.bus.dead_letter(msg.topic, _payload(msg), exc.reason))
        # Blocks while the queue is full (back-pressure, see pending.py).
        # Limitation: paho sends no PINGREQ while this thread waits; a single batch that
        # takes longer than 1.5 x broker.keepalive_s gets the connection dropped (the
        # session survives and its faces come again). A dead-lettered
        # message goes through the queue too, so that it is acknowledged only after the
        # dead letter's PUBACK, by the one thread that acknowledges.
        self.queue.put(item)

    def _decode(self, msg: mqtt.MQTTMessage) -> FaceCrop:
        face = decode(FaceCrop, _payload(msg))
        camera = topics.camera_of(msg.topic)
        # The broker's ACL ties a camera's user to its own topic; the payload must agree,
        # or one camera could have verdicts published under another's name.
        if camera != face.camera:
            raise MessageError(
                f"camera {face.camera!r} in the payload does not match topic camera {camera!r}"
            )
        if face.district != self.settings.district:
            raise MessageError(
                f"district {face.district!r} in the payload is not {self.settings.district!r}"
            )
        return face

    # -- worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        max_wait_s = self.section.max_wait_ms / 1000.0
        try:
            while not self.queue.closed:
                idle_s = _IDLE_WITH_ACKS_S if self._awaiting else _IDLE_S
                batch = self.queue.take_batch(self.section.max_batch, max_wait_s, idle_s)
                if batch:
                    self._busy.set()
                    try:
                        self._process(batch)
                    finally:
                        self._busy.clear()
                        self._last_activity = time.monotonic()
                self._acknowledge()
            self._finish_acks()
        except Exception:
            logger.exception("the inference worker thread failed")
            raise
        finally:
            self._finished.set()

    def _process(self, batch: list[Inbound]) -> None:
        faces: list[Inbound] = []
        images: list[np.ndarray] = []
        for item in batch:
            if item.connects != self.bus.connects:
                # Came on a connection that is gone: the broker redelivers it on this one,
                # so classifying it now would only publish its verdict twice.
                continue
            if item.face is None:
                self._awaiting.append(AwaitingAck(item.msg, item.connects, item.published))
                continue
            image = self._decode_crop(item)
            if image is not None:
                faces.append(item)
                images.append(image)
        if not faces:
            return

        try:
            started = time.perf_counter()
            tensor = self.classifier.preprocess(images)
            model_started = time.perf_counter()
            predictions = self.classifier.predict(tensor)
            model_s = time.perf_counter() - model_started
        except Exception as exc:
            # Not expected for decoded crops; dead-lettered so that no face stalls the rest.
            logger.exception("the classifier failed on a batch of %d faces", len(faces))
            for item in faces:
                self._dead_letter(item, f"classifier failed: {exc.__class__.__name__}: {exc}")
            return
        observe("inference_preprocess", model_started - started)
        observe("inference_batch", model_s)
        self.counters.add("batches")
        # inference_ms is each face's share of the batch's model call (predict only,
        # without JPEG decoding and preprocessing), so that summing it over faces gives
        # the model time spent.
        per_face_ms = model_s * 1000.0 / len(faces)
        for item, prediction in zip(faces, predictions, strict=True):
            self._publish(item, prediction, per_face_ms)

    def _decode_crop(self, item: Inbound) -> np.ndarray | None:
        assert item.face is not None
        # frombuffer is a view on the payload's bytes: no copy before the JPEG decoder.
        # decode() already refused a crop whose frame header claims more than
        # MAX_IMAGE_PIXELS, so what the decoder allocates is bounded.
        data = np.frombuffer(item.face.crop_jpeg, dtype=np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if image is None:
            self._dead_letter(item, "crop_jpeg could not be decoded as a JPEG image")
            return None
        if image.size == 0 or image.shape[0] == 0 or image.shape[1] == 0:
            self._dead_letter(item, "crop_jpeg decodes to a zero-size image")
            return None
        return image

    def _publish(self, item: Inbound, prediction: Prediction, inference_ms: float) -> None:
        face = item.face
        assert face is not None
        decided_at = utc_now()
        # Clamped at 0: a camera whose clock runs ahead would otherwise give a negative
        # latency, which the contract refuses.
        latency_ms = max(0.0, (decided_at - face.captured_at).total_seconds() * 1000.0)
        try:
            probs = {label: _probability(p) for label, p in prediction.probs.items()}
            p_mask = _probability(prediction.p_mask)
            violation = p_mask < self.threshold
            verdict = Verdict(
                face_id=face.face_id,
                district=face.district,
                camera=face.camera,
                frame=face.frame,
                track=face.track,
                captured_at=face.captured_at,
                decided_at=decided_at,
                label=prediction.label,  # type: ignore[arg-type]
                p_mask=p_mask,
                probs=probs,  # type: ignore[arg-type]
                threshold=self.threshold,
                violation=violation,
                model_id=self.model_id,
                worker=self.worker_id,
                latency_ms=latency_ms,
                inference_ms=inference_ms,
            )
        except ValueError as exc:  # pydantic's ValidationError and NaN probabilities
            self._dead_letter(item, f"could not build a verdict: {exc}")
            return

        # Limitation: the window lives in memory, so a face redelivered to a restarted
        # worker is republished without being counted as a duplicate.
        if self._recent.seen_before(face.face_id):
            # A redelivery (after a restart or a lost connection): published again, which
            # downstream treats as the same verdict, and counted.
            self.counters.add("duplicates")
        published = [self.bus.publish(topics.verdicts(face.district, face.camera), encode(verdict))]
        self.counters.add("verdicts")
        if violation:
            record = Violation(
                **verdict.model_dump(),
                place=face.place,
                box=face.box,
                frame_width=face.frame_width,
                frame_height=face.frame_height,
                detector_score=face.detector_score,
                crop_jpeg=face.crop_jpeg,
                context_jpeg=face.context_jpeg,
                context_box=face.context_box,
            )
            topic = topics.violations(face.district, face.camera)
            published.append(self.bus.publish(topic, encode(record)))
            self.counters.add("violations")
        observe("inference_latency", latency_ms / 1000.0)
        ids = {
            "face_id": face.face_id, "camera": face.camera, "track": face.track,
            "district": face.district, "label": verdict.label, "p_mask": p_mask,
        }
        if violation:
            logger.info(
                "violation: face %s on %s is %s (p_mask %.3f)",
                face.face_id, face.camera, verdict.label, p_mask, extra=ids,
            )
        else:
            logger.debug(
                "verdict: face %s on %s is %s (p_mask %.3f)",
                face.face_id, face.camera, verdict.label, p_mask, extra=ids,
            )
        self._awaiting.append(AwaitingAck(item.msg, item.connects, published))

    def _dead_letter(self, item: Inbound, reason: str) -> None:
        face_id = item.face.face_id if item.face is not None else None
        info = self.bus.dead_letter(
            item.msg.topic, _payload(item.msg), reason, face_id=face_id
        )
        self._awaiting.append(AwaitingAck(item.msg, item.connects, [info]))

    def _acknowledge(self) -> None:
        """Acknowledge every message whose publishes are all PUBACKed; drop stale ones.

        Limitation: what waits here is not bounded by max_pending; it only grows while
        the broker goes on sending faces but stops PUBACKing our verdicts.
        """
        if not self.bus.connected:
            # Between connections: wait to see whether the session resumes or not.
            return
        still: list[AwaitingAck] = []
        for entry in self._awaiting:
            states = [_publish_state(info) for info in entry.published]
            if entry.connects != self.bus.connects or None in states:
                # Received on a connection that is gone: its packet id means nothing now
                # (and may name another message); the broker redelivers it instead.
                continue
            if all(states):
                self.bus.ack(entry.msg)
            else:
                still.append(entry)
        self._awaiting = still

    def _finish_acks(self) -> None:
        """On stop: wait (bounded) for the PUBACKs of what was already published."""
        deadline = time.monotonic() + self.section.stop_timeout_s
        while self._awaiting and time.monotonic() < deadline:
            if not self.bus.connected:
                break
            time.sleep(_IDLE_WITH_ACKS_S)
            self._acknowledge()
        if self._awaiting:
            logger.warning(
                "%d published faces were not acknowledged before stopping; the broker "
                "redelivers them (their verdicts will come twice)",
                len(self._awaiting),
            )


def _probability(value: float) -> float:
    """A model output as a contract probability: float32 rounding can pass 1.0."""
    if not np.isfinite(value):
        raise ValueError(f"the model returned a non-finite probability ({value})")
    return min(1.0, max(0.0, float(value)))


# -- retiring a worker ----------------------------------------------------------------


def clear_session(settings: InferenceSettings, client_id: str) -> bool:
    """Delete the broker session of a retired worker.

    Connecting once with clean_start True and session expiry 0 under the worker's client
    id makes the broker discard its session: its shared-subscription membership and
    whatever it still queued for it. Run only after ``--drain`` emptied that session
    (``main`` does), or those queued faces are lost.
    """
    bus = Bus(settings, SERVICE, client_id=client_id, persistent=False, announce=False)
    connected = bus.start(wait_s=_CONNECT_WAIT_S)
    bus.stop()
    if connected:
        logger.info("cleared the broker session of %s", client_id)
    else:
        logger.error("could not reach the broker to clear the session of %s", client_id)
    return connected


# -- command line ---------------------------------------------------------------------


def _report_failure(settings: InferenceSettings, detail: str) -> None:
    """Publish status offline with a detail, from a throw-away connection.

    Another client id than the worker's, with a clean session: the worker's own session,
    and the faces queued in it, stay untouched for the next start.
    """
    bus = Bus(
        settings.model_copy(update={"instance": settings.worker_id}),
        SERVICE,
        client_id=f"{SERVICE}-{settings.district}-{settings.worker_id}-failed",
    )
    bus.detail = _short(detail)
    bus.state = "offline"
    if bus.start(wait_s=5.0):
        bus.stop("offline")
    else:
        bus.stop()


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="maskmesh inference",
        description="Run an inference worker: face crops in, verdicts and violations out.",
    )
    parser.add_argument("--config", type=Path, help="YAML settings file")
    parser.add_argument("--model", type=Path, help="ONNX model file (inference.model_path)")
    parser.add_argument("--worker-id", help="stable worker id (inference.worker_id)")
    parser.add_argument(
        "--drain",
        action="store_true",
        help="retire this worker: finish what its broker session holds, then delete it",
    )
    return parser.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    """``maskmesh inference``: 0 after a clean stop, 1 when it cannot run, 2 for bad settings."""
    args = _parse(argv)
    section = {"model_path": args.model, "worker_id": args.worker_id}
    section = {key: value for key, value in section.items() if value is not None}
    try:
        settings = load_settings(
            InferenceSettings, args.config, inference=section if section else None
        )
        # An unreadable password file is a settings error, not a traceback at connect.
        settings.broker.resolved_password()
        check_metrics_port(settings)
    except SettingsError as exc:
        print(f"maskmesh inference: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    # Limitation: the default id (host name and pid) changes on every start; such a
    # worker's queued share is stranded until the session expires. Deployments set
    # instance or inference.worker_id (a StatefulSet ordinal, a compose service name).
    if not settings.worker_id_is_stable:
        logger.warning(
            "no worker_id or instance configured; %r holds only for this process, so faces "
            "queued for it are stranded if it restarts",
            settings.worker_id,
        )

    try:
        worker = InferenceWorker(settings, drain=args.drain)
    except ModelLoadError as exc:
        logger.error("cannot load the model: %s", exc)
        _report_failure(settings, f"model failed to load: {exc}")
        return 1

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s; finishing the batch in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if not worker.start():
        logger.warning("broker not reachable yet; retrying with back-off")
    return _supervise(worker, settings, stop, drain=args.drain)


def _supervise(
    worker: InferenceWorker, settings: InferenceSettings, stop: threading.Event, drain: bool
) -> int:
    """Wait until told to stop, the drain is done, or the worker thread died."""
    status = 0
    while not stop.wait(0.2):
        if not worker.ready():
            logger.error("the worker thread has stopped; exiting")
            worker.bus.detail = "worker thread stopped"
            status = 1
            break
        if drain and worker.bus.connected and worker.idle_s >= settings.inference.drain_idle_s:
            logger.info("drained: nothing arrived for %g s", settings.inference.drain_idle_s)
            break
    worker.stop()
    if drain and status == 0:
        return 0 if clear_session(settings, worker.client_id) else 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
