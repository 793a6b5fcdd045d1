"""The sender thread: delivers what the outbox holds, with back-off, off the MQTT thread.

Each round it clears expired photos (on its own schedule), sends the due digest and the
due single alerts of every channel, refreshes the ``outbox_pending`` level and sleeps
until the next row falls due or ``wake`` is called. A temporary failure schedules that
row again after an exponential, jittered delay; a server that cannot be reached pauses
its whole channel for the same delay, so a dead server costs one connection attempt per
back-off step rather than one per alert. A row is marked sent only after the server
accepted it; stopping lets the delivery in progress finish.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence

from maskmesh.bus import Counters
from services.notifier.channels import Channel, Outcome
from services.notifier.outbox import Alert, Outbox
from services.notifier.settings import NotifierSection

logger = logging.getLogger(__name__)

# Counter names per channel: (sent, retried, failed).
_COUNTERS = {
    "email": ("mails_sent", "mails_retried", "mails_failed"),
    "sms": ("sms_sent", "sms_retried", "sms_failed"),
}
# The longest the sender sleeps with nothing due, so a changed clock is noticed.
_MAX_SLEEP_S = 30.0
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")

Report = Callable[[str | None], None]


def backoff_s(attempt: int, section: NotifierSection, rand: Callable[[], float]) -> float:
    """Delay before retry number ``attempt`` (1 = after the first failure)."""
    delay = min(section.retry_max_s, section.retry_base_s * 2.0 ** max(0, attempt - 1))
    return delay * (1.0 + section.retry_jitter * (2.0 * rand() - 1.0))


def one_line(text: str, limit: int = 200) -> str:
    """A server's answer made fit for a log line and the status detail."""
    return _CONTROL_RE.sub(" ", text).strip()[:limit]


class Sender:
    """Delivers pending alerts from ``outbox`` through ``channels``.

    outbox: the durable outbox.
    channels: the delivery channels, each with a ``name`` the outbox rows carry.
    section: the notifier settings (retry back-off, retention sweep period).
    counters: where sent/retried/failed counts and ``outbox_pending`` go.
    report: called with a short problem description for the service status, or None
        once a channel works again.
    clock: epoch seconds; rand: uniform [0, 1) for the jitter (both injectable in tests).
    """

    def __init__(
        self,
        outbox: Outbox,
        channels: Sequence[Channel],
        section: NotifierSection,
        counters: Counters,
        report: Report = lambda detail: None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.outbox = outbox
        self.channels = list(channels)
        self.section = section
        self.counters = counters
        self.report = report
        self.clock = clock
        self.rand = rand
        self._failures = {c.name: 0 for c in self.channels}
        self._blocked_until = {c.name: 0.0 for c in self.channels}
        self._next_sweep = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="notifier-sender", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look at the outbox now (a new alert was filed)."""
        self._wake.set()

    def stop(self, timeout_s: float) -> bool:
        """Stop after the delivery in progress; True if the thread ended in time."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            # Cleared before the round, so a wake during it starts the next one at once.
            self._wake.clear()
            try:
                delay = self.run_once()
            except Exception:
                # The outbox keeps everything; a bug in one round must not end delivery.
                logger.exception("sender round failed; trying again shortly")
                delay = 5.0
            self._wake.wait(delay)

    # -- one round ------------------------------------------------------------------

    def run_once(self) -> float:
        """Do everything due now; return the seconds until something next falls due."""
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        for channel in self.channels:
            if self._stop.is_set():
                break
            self._serve(channel, now)
        self.counters.set("outbox_pending", self.outbox.pending_count())
        return self._delay(self.clock())

    def _serve(self, channel: Channel, now: float) -> None:
        if self._blocked_until[channel.name] > now:
            return
        digest = self.outbox.due_digest(channel.name, now)
        if digest:
            self._attempt(channel, digest, digest=True)
        while not self._stop.is_set() and self._blocked_until[channel.name] <= now:
            batch = self.outbox.due_singles(channel.name, now)
            if not batch:
                return
            for alert in batch:
                if self._stop.is_set() or self._blocked_until[channel.name] > now:
                    return
                self._attempt(channel, [alert], digest=False)

    def _attempt(self, channel: Channel, alerts: list[Alert], digest: bool) -> None:
        started = time.monotonic()
        try:
            outcome = channel.send_digest(alerts) if digest else channel.send_alert(alerts[0])
        except Exception as exc:
            # A composing bug (a broken photo, say) is retried with back-off, not lost.
            logger.exception("building or sending alert %s failed", alerts[0].face_id)
            outcome = Outcome("temporary", f"internal error: {exc.__class__.__name__}")
        now = self.clock()
        ids = [a.id for a in alerts]
        what = f"digest of {len(alerts)} alerts" if digest else f"alert {alerts[0].face_id}"
        sent_name, retried_name, failed_name = _COUNTERS.get(
            channel.name, (f"{channel.name}_sent", f"{channel.name}_retried",
                           f"{channel.name}_failed")
        )
        detail = one_line(outcome.detail, 2000)

        if outcome.status == "sent":
            self.outbox.mark_sent(ids, now, detail or None)
            self.counters.add(sent_name)
            if digest:
                self.counters.add("digests_sent")
                self.counters.add("alerts_digested", len(alerts))
            _observe(f"{channel.name}_delivery", time.monotonic() - started)
            for alert in alerts:
                # From the violation reaching the notifier to the server accepting it
                # (digest waits included); clamped, as tests may steer the clock back.
                _observe(f"{channel.name}_alert_latency", max(0.0, now - alert.received_at))
            logger.info("sent %s by %s", what, channel.name, extra=log_ids(alerts))
            if detail:
                logger.warning("%s: some recipients refused it for good: %s", what, detail)
            if self._failures[channel.name]:
                self._failures[channel.name] = 0
                self.report(None)
            return

        if outcome.status == "permanent":
            self.outbox.mark_failed(ids, detail)
            self.counters.add(failed_name)
            logger.warning(
                "%s refused for good by %s, not retried: %s", what, channel.name, detail,
                extra=log_ids(alerts),
            )
            self.report(one_line(f"{what} refused by {channel.name}: {detail}"))
            return

        attempt = alerts[0].attempts + 1
        delay = backoff_s(attempt, self.section, self.rand)
        if outcome.unreachable:
            self._failures[channel.name] += 1
            delay = backoff_s(self._failures[channel.name], self.section, self.rand)
            self._blocked_until[channel.name] = now + delay
            self.report(one_line(f"{channel.name} server unreachable: {detail}"))
        self.outbox.mark_retry(ids, now + delay, detail, outcome.delivered)
        self.counters.add(retried_name)
        logger.warning(
            "%s not sent by %s (attempt %d: %s); retrying in %.1f s",
            what, channel.name, attempt, detail, delay, extra=log_ids(alerts),
        )

    def _sweep(self, now: float) -> None:
        cleared = self.outbox.clear_old_photos(now)
        if cleared:
            logger.info(
                "deleted the photos of %d alerts older than %.0f s", cleared,
                self.section.retention_s,
            )
        self._next_sweep = now + self.section.retention_sweep_s

    def _delay(self, now: float) -> float:
        delay = min(_MAX_SLEEP_S, self._next_sweep - now)
        for channel in self.channels:
            due = self.outbox.next_due(channel.name)
            if due is None:
                continue
            delay = min(delay, max(due, self._blocked_until[channel.name]) - now)
        return max(0.0, delay)


def log_ids(alerts: Sequence[Alert]) -> dict[str, object]:
    """The ids that follow a face through the logs, for ``extra=`` of a log call.

    A digest names its first alert's face, and every face in ``face_ids``.
    """
    first = alerts[0]
    ids: dict[str, object] = {
        "face_id": first.face_id, "camera": first.camera, "track": first.track,
        "district": first.district,
    }
    if len(alerts) > 1:
        ids["face_ids"] = ",".join(alert.face_id for alert in alerts)
    return ids


def _observe(name: str, seconds: float) -> None:
    try:
        from maskmesh.observability import observe
    except ImportError:  # the metrics module is optional for the sender
        return
    observe(name, seconds)
