"""The capture node's outbox: faces wait on disk until the broker acknowledges them.

Every face is written to a SQLite file before it is handed to paho, and its row is
removed only after its PUBACK, so faces survive a broker outage and a restart of the
node itself, and go out in the order they were taken. A face the broker acknowledges with
no subscriber for it (no inference worker, as after a broker restart) stays too, and goes
again later; it may then arrive after faces taken just after it. The file is bounded by
item count and size (oldest dropped first), and rows older than the retention time are
deleted, because the photos are personal data.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from maskmesh.bus import Bus, Counters

logger = logging.getLogger(__name__)

# How long faces wait in the spool after the broker said nobody was subscribed to them:
# the first wait, doubled on each unheard send up to the longest, reset by a delivery.
UNHEARD_RETRY_S = 1.0
UNHEARD_RETRY_MAX_S = 16.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS faces (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    face_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    stored_at REAL NOT NULL
)
"""


@dataclass(frozen=True)
class SpoolLimits:
    """Bounds of the spool.

    max_items: most faces kept; the oldest goes when one more arrives.
    max_mb: most payload megabytes kept, likewise.
    retention_s: a stored face older than this is deleted unsent.
    """

    max_items: int = 10000
    max_mb: float = 500.0
    retention_s: float = 86400.0


@dataclass(frozen=True)
class SpooledFace:
    seq: int
    face_id: str
    topic: str
    payload: bytes


class Spool:
    """A bounded, ordered store of outgoing faces in one SQLite file.

    path: the SQLite file (its folder is created).
    limits: item, size and age bounds.
    counters: where ``spool_dropped`` is counted.
    """

    def __init__(self, path: Path, limits: SpoolLimits, counters: Counters) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.limits = limits
        self.counters = counters
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A power cut may lose the last few faces; a sync per face would cost more.
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Deleted faces are overwritten, not just unlinked (not every SQLite build does
        # this by default): the photos are personal data.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute(_SCHEMA)
        self._full_warned = False

    def put(self, face_id: str, topic: str, payload: bytes) -> int:
        """Store one face; drops the oldest ones when a bound is passed. Returns its seq."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO faces (face_id, topic, payload, size, stored_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (face_id, topic, payload, len(payload), time.time()),
            )
            seq = int(cursor.lastrowid or 0)
            self._enforce_bounds()
            return seq

    def pending(self, after_seq: int, limit: int) -> list[SpooledFace]:
        """Up to ``limit`` stored faces with seq above ``after_seq``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, face_id, topic, payload FROM faces WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [SpooledFace(int(r[0]), r[1], r[2], bytes(r[3])) for r in rows]

    def remove(self, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM faces WHERE seq = ?", (seq,))

    def contains(self, seq: int) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM faces WHERE seq = ?", (seq,)).fetchone()
        return row is not None

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM faces").fetchone()[0])

    def expire(self, now: float | None = None) -> int:
        """Delete faces stored longer than the retention time; returns how many."""
        cutoff = (time.time() if now is None else now) - self.limits.retention_s
        with self._lock:
            cursor = self._db.execute("DELETE FROM faces WHERE stored_at < ?", (cutoff,))
            # The write-ahead log still holds copies of sent and expired faces; folding it
            # into the database and truncating it removes them (this runs every minute).
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        expired = max(cursor.rowcount, 0)
        if expired:
            self.counters.add("spool_dropped", expired)
            logger.warning(
                "deleted %d unsent faces older than the %.0f s retention time",
                expired,
                self.limits.retention_s,
            )
        return expired

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _enforce_bounds(self) -> None:
        count, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM faces"
        ).fetchone()
        max_bytes = self.limits.max_mb * 1024 * 1024
        dropped = 0
        while count > self.limits.max_items or (size > max_bytes and count > 1):
            seq, item_size = self._db.execute(
                "SELECT seq, size FROM faces ORDER BY seq LIMIT 1"
            ).fetchone()
            self._db.execute("DELETE FROM faces WHERE seq = ?", (seq,))
            count, size, dropped = count - 1, size - item_size, dropped + 1
        if dropped:
            self.counters.add("spool_dropped", dropped)
            if not self._full_warned:
                # Said once per episode; spool_dropped keeps the count.
                logger.warning(
                    "face spool %s is full (%d faces, %.0f MB); dropping the oldest",
                    self.path,
                    self.limits.max_items,
                    self.limits.max_mb,
                )
                self._full_warned = True
        elif count <= self.limits.max_items // 2:
            self._full_warned = False


@dataclass
class _InFlight:
    info: mqtt.MQTTMessageInfo
    handed_at: float


class SpoolSender:
    """Hands spooled faces to the bus in order and removes each one after its PUBACK.

    bus: the connected-or-reconnecting Bus (paho reconnects on its own).
    spool: where faces wait.
    window: most faces handed to paho and not yet acknowledged.
    ack_timeout_s: a face unacknowledged this long on a live connection is sent again.
    on_sent: called with the face id of each acknowledged face.
    """

    def __init__(
        self,
        bus: Bus,
        spool: Spool,
        window: int = 10,
        ack_timeout_s: float = 30.0,
        on_sent: Callable[[str], None] | None = None,
    ) -> None:
        self.bus = bus
        self.spool = spool
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.on_sent = on_sent
        self._inflight: dict[int, _InFlight] = {}
        self._face_ids: dict[int, str] = {}
        self._cursor = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-sender", daemon=True)
        self._last_expire = 0.0
        self._write_failing = False
        # While no inference worker is subscribed, faces stay spooled until this time.
        self._hold_until = 0.0
        self._hold_s = UNHEARD_RETRY_S
        self._holding = False

    def start(self) -> None:
        self.spool.expire()
        self._thread.start()

    def submit(self, face_id: str, topic: str, payload: bytes) -> bool:
        """Store a face and wake the sender; counts ``spooled`` if the broker is away.

        False when the spool could not be written (a full or broken disk): the face is
        lost, counted in ``spool_dropped`` and ``spool_write_errors``, and the status
        detail says so until a write succeeds again.
        """
        if not self.bus.connected:
            self.bus.counters.add("spooled")
        try:
            self.spool.put(face_id, topic, payload)
        except (sqlite3.Error, OSError) as exc:
            # A full or broken disk: this face is lost, and the operator must know.
            self.bus.counters.add("spool_dropped")
            self.bus.counters.add("spool_write_errors")
            logger.error("face %s lost: cannot write the spool %s (%s)",
                         face_id, self.spool.path, exc)
            detail = f"cannot write the spool {self.spool.path} ({exc}); faces are lost"
            if detail != self.bus.detail:
                self._write_failing = True
                self.bus.publish_status(detail=detail)
            return False
        if self._write_failing:
            self._write_failing = False
            logger.info("the spool %s takes faces again", self.spool.path)
            self.bus.detail = None
            self.bus.publish_status()
        self._wake.set()
        return True

    def drain(self, timeout_s: float) -> bool:
        """Wait until the spool is empty (True) or ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while len(self.spool) > 0:
            if time.monotonic() >= deadline:
                return False
            self._wake.set()
            self._stop.wait(0.05)
        return True

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except sqlite3.Error:
                logger.exception("face spool %s failed; retrying", self.spool.path)
                self._stop.wait(1.0)
            # PUBACKs arrive on paho's thread; a short wait keeps the window moving
            # without a callback into this thread.
            # Limitation: acknowledgements are polled every 50 ms while faces are in
            # flight, which caps one node near window/0.05 s = 200 faces a second; a
            # per-message on_publish hook on the Bus would lift it.
            self._wake.wait(0.05 if self._inflight else 0.5)
            self._wake.clear()

    def _step(self) -> None:
        now = time.monotonic()
        if now - self._last_expire > 60.0:
            self._last_expire = now
            self.spool.expire()
        self._collect_acks(now)
        if not self.bus.connected or now < self._hold_until:
            return
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        for face in self.spool.pending(self._cursor, room):
            if face.seq in self._inflight:
                self._cursor = face.seq
                continue
            info = self.bus.publish(face.topic, face.payload, qos=1)
            self._cursor = face.seq
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                # Lost the connection between the check and the hand-over: start again
                # from this face once the Bus is back.
                self._cursor = face.seq - 1
                return
            self._inflight[face.seq] = _InFlight(info, now)
            self._face_ids[face.seq] = face.face_id

    def _collect_acks(self, now: float) -> None:
        for seq, flight in list(self._inflight.items()):
            try:
                done = flight.info.is_published()
            except (RuntimeError, ValueError):
                done = False
                flight.handed_at = 0.0  # paho will not finish it; send it again
            if done and self.bus.unheard(flight.info.mid):
                # The broker had no subscriber for it (no worker connected yet, say after
                # a broker restart): the face stays spooled and goes again shortly.
                del self._inflight[seq]
                self._face_ids.pop(seq, None)
                self._cursor = min(self._cursor, seq - 1)
                if now >= self._hold_until:
                    self._hold_until = now + self._hold_s
                    self._hold_s = min(2 * self._hold_s, UNHEARD_RETRY_MAX_S)
                self.bus.counters.add("faces_unheard")
                if not self._holding:
                    self._holding = True
                    logger.warning("no inference worker is subscribed to this camera's faces; "
                                   "holding them in the spool and trying again, every %g s "
                                   "at most", UNHEARD_RETRY_MAX_S)
            elif done:
                self._hold_s = UNHEARD_RETRY_S
                if self._holding:
                    self._holding = False
                    logger.info("inference workers take faces again")
                del self._inflight[seq]
                self.spool.remove(seq)
                self.bus.counters.add("faces")
                face_id = self._face_ids.pop(seq, "")
                if self.on_sent is not None:
                    self.on_sent(face_id)
            elif self.bus.connected and now - flight.handed_at > self.ack_timeout_s:
                del self._inflight[seq]
                self._face_ids.pop(seq, None)
                if self.spool.contains(seq):
                    self._cursor = min(self._cursor, seq - 1)
