"""The durable outbox: one SQLite row per (violation, channel), and the alerting policy.

A violation is acknowledged on the bus only after ``Outbox.accept`` has committed its
rows, so a crash never loses one. ``UNIQUE(face_id, channel)`` turns an at-least-once
redelivery into a counted duplicate instead of a second mail. Each row is in one state:

- ``pending``: waiting to be sent (``mode='single'``) or held for a digest
  (``mode='digest'``, with the reason: quiet hours, camera cool-down, hourly cap);
- ``sent``: the server accepted it (alone, or inside the digest named by ``digest_key``);
- ``failed_permanent``: the server refused it for good; ``last_error`` holds its answer;
- ``suppressed``: another frame of the same (camera, track) already alerted.

All times are epoch seconds, passed in by the caller so that tests can steer the clock.
One connection serves every thread behind a lock; each call is a short transaction and
nothing slow (no network) ever runs while the lock is held.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from maskmesh.messages import Violation
from services.notifier.settings import NotifierSection

logger = logging.getLogger(__name__)

State = Literal["pending", "sent", "failed_permanent", "suppressed"]
Mode = Literal["single", "digest"]
STATES: tuple[State, ...] = ("pending", "sent", "failed_permanent", "suppressed")
# A digest mail lists at most this many alerts; the rest wait for the next one.
MAX_DIGEST_ALERTS = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    face_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    state TEXT NOT NULL
        CHECK (state IN ('pending', 'sent', 'failed_permanent', 'suppressed')),
    mode TEXT NOT NULL CHECK (mode IN ('single', 'digest')),
    reason TEXT,
    district TEXT NOT NULL,
    camera TEXT NOT NULL,
    track INTEGER NOT NULL,
    place TEXT,
    label TEXT NOT NULL,
    p_mask REAL NOT NULL,
    captured_at REAL NOT NULL,
    received_at REAL NOT NULL,
    details TEXT NOT NULL,
    crop_jpeg BLOB,
    context_jpeg BLOB,
    photos_cleared_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    sent_at REAL,
    delivered_to TEXT NOT NULL DEFAULT '[]',
    digest_key TEXT,
    UNIQUE (face_id, channel)
);
CREATE INDEX IF NOT EXISTS alerts_due ON alerts (state, channel, mode, next_attempt_at);
CREATE INDEX IF NOT EXISTS alerts_track ON alerts (channel, camera, track, captured_at);
CREATE INDEX IF NOT EXISTS alerts_received ON alerts (channel, received_at);
"""

# Columns read back for sending; the photos are fetched only for the rows being sent.
_COLUMNS = (
    "id, face_id, channel, state, mode, reason, district, camera, track, place, label, "
    "p_mask, captured_at, received_at, details, crop_jpeg, context_jpeg, attempts, "
    "delivered_to, digest_key, last_error"
)


@dataclass(frozen=True)
class Alert:
    """One outbox row as the sender and the mail composer see it."""

    id: int
    face_id: str
    channel: str
    state: State
    mode: Mode
    reason: str | None
    district: str
    camera: str
    track: int
    place: str | None
    label: str
    p_mask: float
    captured_at: float
    received_at: float
    details: dict[str, Any]
    crop_jpeg: bytes | None
    context_jpeg: bytes | None
    attempts: int
    delivered_to: frozenset[str] = field(default_factory=frozenset)
    digest_key: str | None = None
    last_error: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Alert:
        return cls(
            id=row["id"],
            face_id=row["face_id"],
            channel=row["channel"],
            state=row["state"],
            mode=row["mode"],
            reason=row["reason"],
            district=row["district"],
            camera=row["camera"],
            track=row["track"],
            place=row["place"],
            label=row["label"],
            p_mask=row["p_mask"],
            captured_at=row["captured_at"],
            received_at=row["received_at"],
            details=json.loads(row["details"]),
            crop_jpeg=row["crop_jpeg"],
            context_jpeg=row["context_jpeg"],
            attempts=row["attempts"],
            delivered_to=frozenset(json.loads(row["delivered_to"])),
            digest_key=row["digest_key"],
            last_error=row["last_error"],
        )


@dataclass(frozen=True)
class Accepted:
    """What ``Outbox.accept`` did with one violation (per channel it was filed for)."""

    duplicate: bool
    decisions: dict[str, tuple[State, Mode, str | None]]

    @property
    def suppressed(self) -> bool:
        return bool(self.decisions) and all(
            state == "suppressed" for state, _, _ in self.decisions.values()
        )


class Outbox:
    """The SQLite outbox at ``path`` (WAL, synchronous=FULL).

    path: the database file; its folder is created if missing.
    section: the notifier settings (cool-downs, caps, quiet hours, digest interval).
    channels: the delivery channels each violation gets a row for, e.g. ("email", "sms").
    """

    def __init__(self, path: Path, section: NotifierSection, channels: Sequence[str]) -> None:
        self.path = path
        self.section = section
        self.channels = tuple(channels)
        self._quiet = section.quiet
        self._zone = section.zone
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a row must survive a power cut once the violation has been acknowledged.
        self._db.execute("PRAGMA synchronous=FULL")
        # Cleared photos are overwritten on disk, not just unlinked from the b-tree.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- receiving ----------------------------------------------------------------------

    def accept(self, violation: Violation, now: float) -> Accepted:
        """File a violation for every channel in one transaction; idempotent per face_id."""
        captured = violation.captured_at.timestamp()
        details = violation.model_dump(
            mode="json",
            include={
                "box", "context_box", "frame_width", "frame_height", "model_id", "threshold",
                "detector_score", "probs", "worker", "frame",
            },
        )
        decisions: dict[str, tuple[State, Mode, str | None]] = {}
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                known = self._db.execute(
                    "SELECT 1 FROM alerts WHERE face_id = ? LIMIT 1", (violation.face_id,)
                ).fetchone()
                if known is not None:
                    self._db.execute("ROLLBACK")
                    return Accepted(duplicate=True, decisions={})
                for channel in self.channels:
                    state, mode, reason, due = self._decide(channel, violation, captured, now)
                    keep_photos = state != "suppressed"
                    self._db.execute(
                        "INSERT INTO alerts (face_id, channel, state, mode, reason, district, "
                        "camera, track, place, label, p_mask, captured_at, received_at, details, "
                        "crop_jpeg, context_jpeg, next_attempt_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            violation.face_id, channel, state, mode, reason, violation.district,
                            violation.camera, violation.track, violation.place, violation.label,
                            violation.p_mask, captured, now, json.dumps(details),
                            violation.crop_jpeg if keep_photos else None,
                            violation.context_jpeg if keep_photos else None,
                            due,
                        ),
                    )
                    decisions[channel] = (state, mode, reason)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return Accepted(duplicate=False, decisions=decisions)

    def _decide(
        self, channel: str, violation: Violation, captured: float, now: float
    ) -> tuple[State, Mode, str | None, float]:
        """State, mode, reason and due time of a new row; runs inside accept's transaction."""
        section = self.section
        if section.track_cooldown_s > 0:
            # Capture time, not arrival: a backlog replayed after an outage is still
            # recognised as the frames of one event.
            same_track = self._db.execute(
                "SELECT 1 FROM alerts WHERE channel = ? AND camera = ? AND track = ? "
                "AND state != 'suppressed' AND captured_at > ? AND captured_at < ? LIMIT 1",
                (
                    channel, violation.camera, violation.track,
                    captured - section.track_cooldown_s, captured + section.track_cooldown_s,
                ),
            ).fetchone()
            if same_track is not None:
                return "suppressed", "single", "track_cooldown", now

        digest_due = now + section.digest_interval_s
        if self._quiet is not None:
            local = datetime.fromtimestamp(now, self._zone)
            if self._quiet.contains(local):
                quiet_end = self._quiet.end_after(local).timestamp()
                return "pending", "digest", "quiet_hours", min(quiet_end, digest_due)

        if section.camera_cooldown_s > 0:
            recent = self._db.execute(
                "SELECT 1 FROM alerts WHERE channel = ? AND camera = ? AND mode = 'single' "
                "AND state IN ('pending', 'sent') AND received_at > ? LIMIT 1",
                (channel, violation.camera, now - section.camera_cooldown_s),
            ).fetchone()
            if recent is not None:
                return "pending", "digest", "camera_cooldown", digest_due

        (in_hour,) = self._db.execute(
            "SELECT COUNT(*) FROM alerts WHERE channel = ? AND mode = 'single' "
            "AND state IN ('pending', 'sent') AND received_at > ?",
            (channel, now - 3600.0),
        ).fetchone()
        if in_hour >= section.max_mails_per_hour:
            return "pending", "digest", "hourly_cap", digest_due
        return "pending", "single", None, now

    # -- sending ------------------------------------------------------------------------

    def due_singles(self, channel: str, now: float, limit: int = 20) -> list[Alert]:
        """Single alerts of a channel whose (next) attempt is due, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM alerts WHERE state = 'pending' AND channel = ? "
                "AND mode = 'single' AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at, id LIMIT ?",
                (channel, now, limit),
            ).fetchall()
        return [Alert.from_row(row) for row in rows]

    def due_digest(self, channel: str, now: float) -> list[Alert]:
        """The next digest batch of a channel if one is due, else an empty list.

        A batch is frozen when first tried (its rows get one ``digest_key``), so that a
        retry sends the very same digest under the same Message-ID; alerts held later
        wait for the next batch.
        """
        with self._lock:
            key_row = self._db.execute(
                "SELECT digest_key FROM alerts WHERE state = 'pending' AND channel = ? "
                "AND mode = 'digest' AND digest_key IS NOT NULL AND next_attempt_at <= ? "
                "LIMIT 1",
                (channel, now),
            ).fetchone()
            if key_row is not None:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM alerts WHERE state = 'pending' AND channel = ? "
                    "AND digest_key = ? ORDER BY captured_at, id",
                    (channel, key_row["digest_key"]),
                ).fetchall()
                return [Alert.from_row(row) for row in rows]

            oldest = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM alerts WHERE state = 'pending' "
                "AND channel = ? AND mode = 'digest' AND digest_key IS NULL",
                (channel,),
            ).fetchone()[0]
            if oldest is None or oldest > now:
                return []
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT id, face_id FROM alerts WHERE state = 'pending' AND channel = ? "
                    "AND mode = 'digest' AND digest_key IS NULL ORDER BY captured_at, id "
                    "LIMIT ?",
                    (channel, MAX_DIGEST_ALERTS),
                ).fetchall()
                ids = [row[0] for row in rows]
                # Keyed by the members' random face ids, not the row ids: a new outbox
                # (a fresh volume) starts its row ids again, and a repeated Message-ID
                # could make a mail system drop a real digest as a duplicate.
                key = hashlib.sha256(
                    (channel + ":" + ",".join(row[1] for row in rows)).encode("ascii")
                ).hexdigest()[:24]
                self._db.executemany(
                    "UPDATE alerts SET digest_key = ?, next_attempt_at = ? WHERE id = ?",
                    [(key, now, row_id) for row_id in ids],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM alerts WHERE digest_key = ? ORDER BY captured_at, id",
                (key,),
            ).fetchall()
        return [Alert.from_row(row) for row in rows]

    def next_due(self, channel: str) -> float | None:
        """When the channel's earliest pending row falls due (may be past), or None."""
        with self._lock:
            (value,) = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM alerts WHERE state = 'pending' AND channel = ?",
                (channel,),
            ).fetchone()
        return None if value is None else float(value)

    def mark_sent(self, ids: Iterable[int], now: float, detail: str | None = None) -> None:
        self._update(
            ids, "UPDATE alerts SET state = 'sent', sent_at = ?, last_error = ? WHERE id = ?",
            lambda row_id: (now, detail, row_id),
        )

    def mark_failed(self, ids: Iterable[int], detail: str) -> None:
        self._update(
            ids,
            "UPDATE alerts SET state = 'failed_permanent', attempts = attempts + 1, "
            "last_error = ? WHERE id = ?",
            lambda row_id: (detail[:2000], row_id),
        )

    def mark_retry(
        self, ids: Iterable[int], next_attempt_at: float, detail: str, delivered: frozenset[str]
    ) -> None:
        done = json.dumps(sorted(delivered))
        self._update(
            ids,
            "UPDATE alerts SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?, "
            "delivered_to = ? WHERE id = ?",
            lambda row_id: (next_attempt_at, detail[:2000], done, row_id),
        )

    def _update(self, ids: Iterable[int], sql: str, params: Any) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(sql, [params(row_id) for row_id in ids])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- housekeeping and accounting -----------------------------------------------------

    def clear_old_photos(self, now: float) -> int:
        """Delete photos of rows received before the retention window; rows stay."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE alerts SET crop_jpeg = NULL, context_jpeg = NULL, photos_cleared_at = ? "
                "WHERE received_at < ? AND (crop_jpeg IS NOT NULL OR context_jpeg IS NOT NULL)",
                (now, now - self.section.retention_s),
            )
            if cursor.rowcount > 0:
                # The write-ahead log still holds the photos' old pages until it is
                # folded into the database and truncated.
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return cursor.rowcount

    def pending_count(self) -> int:
        with self._lock:
            (count,) = self._db.execute(
                "SELECT COUNT(*) FROM alerts WHERE state = 'pending'"
            ).fetchone()
        return int(count)

    def pending_by_channel(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT channel, COUNT(*) FROM alerts WHERE state = 'pending' GROUP BY channel"
            ).fetchall()
        return {row[0]: int(row[1]) for row in rows}

    def counts(self, channel: str | None = None) -> dict[str, int]:
        """Rows per state (all channels unless one is named)."""
        sql = "SELECT state, COUNT(*) FROM alerts"
        args: tuple[str, ...] = ()
        if channel is not None:
            sql += " WHERE channel = ?"
            args = (channel,)
        with self._lock:
            rows = self._db.execute(sql + " GROUP BY state", args).fetchall()
        found: dict[str, int] = {state: 0 for state in STATES}
        found.update({row[0]: int(row[1]) for row in rows})
        return found

    def get(self, face_id: str, channel: str) -> Alert | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM alerts WHERE face_id = ? AND channel = ?",
                (face_id, channel),
            ).fetchone()
        return None if row is None else Alert.from_row(row)
