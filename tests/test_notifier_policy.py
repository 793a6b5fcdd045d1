"""The notifier's policy and sender without a broker: a steered clock, a recording channel.

Quiet hours, cool-downs, the hourly cap and digests, back-off, retention, settings
validation, and the mail composer against the real mail sink.
"""

from __future__ import annotations

import email
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import cv2
import numpy as np
import pytest

from maskmesh.bus import Counters
from maskmesh.settings import SettingsError, load_settings
from services.notifier import compose
from services.notifier.channels import Outcome, SmtpChannel, _recipient_outcome
from services.notifier.mailsink import MailSink, safe_name
from services.notifier.outbox import Alert, Outbox
from services.notifier.sender import Sender, backoff_s
from services.notifier.settings import NotifierSection, NotifierSettings, QuietHours

from .conftest import free_port
from .test_notifier import CROP_JPEG, jpeg_parts, make_violation

BERLIN = ZoneInfo("Europe/Berlin")


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingChannel:
    """A channel that answers from a script of outcomes (then "sent") and records calls."""

    def __init__(self, outcomes: Sequence[Outcome] = (), name: str = "email") -> None:
        self.name = name
        self.outcomes = list(outcomes)
        self.alerts: list[Alert] = []
        self.digests: list[list[Alert]] = []

    def send_alert(self, alert: Alert) -> Outcome:
        self.alerts.append(alert)
        return self.outcomes.pop(0) if self.outcomes else Outcome("sent")

    def send_digest(self, alerts: Sequence[Alert]) -> Outcome:
        self.digests.append(list(alerts))
        return self.outcomes.pop(0) if self.outcomes else Outcome("sent")


def section(tmp_path: Path, **values: Any) -> NotifierSection:
    base: dict[str, Any] = {
        "recipients": ["operator@district.test"],
        "timezone": "Europe/Berlin",
        "outbox_path": tmp_path / "outbox.sqlite3",
        "camera_cooldown_s": 0.0,
        "retry_base_s": 1.0,
        "retry_max_s": 8.0,
        "retry_jitter": 0.0,
    }
    base.update(values)
    return NotifierSection(**base)


def rig(
    tmp_path: Path, clock: Clock, outcomes: Sequence[Outcome] = (), **values: Any
) -> tuple[Outbox, Sender, RecordingChannel, Counters]:
    sec = section(tmp_path, **values)
    channel = RecordingChannel(outcomes)
    outbox = Outbox(sec.outbox_path, sec, [channel.name])
    counters = Counters()
    sender = Sender(outbox, [channel], sec, counters, clock=clock, rand=lambda: 0.5)
    return outbox, sender, channel, counters


def accept(outbox: Outbox, clock: Clock, **violation: Any) -> tuple[str, str, str | None]:
    at = datetime.fromtimestamp(clock(), UTC)
    v = make_violation(captured_at=at, **violation)
    result = outbox.accept(v, clock())
    state, mode, reason = result.decisions["email"]
    return state, mode, reason


# -- quiet hours ----------------------------------------------------------------------


def test_quiet_hours_wrap_midnight_and_end_at_the_right_local_time() -> None:
    quiet = QuietHours.parse("22:00-07:00")
    day = datetime(2026, 3, 28, tzinfo=BERLIN)
    assert quiet.contains(day.replace(hour=23))
    assert quiet.contains(day.replace(hour=3))
    assert not quiet.contains(day.replace(hour=7))
    assert not quiet.contains(day.replace(hour=12))
    # The night summer time starts: 23:00 CET to 07:00 CEST is seven hours, not eight.
    start = day.replace(hour=23)
    end = quiet.end_after(start)
    assert end.hour == 7 and end.day == 29
    assert end.utcoffset() == timedelta(hours=2)
    assert end.timestamp() - start.timestamp() == 7 * 3600
    assert quiet.end_after(day.replace(hour=3)).day == 28

    lunch = QuietHours.parse("12:00-13:30")
    assert lunch.contains(day.replace(hour=13, minute=29))
    assert not lunch.contains(day.replace(hour=13, minute=30))
    for bad in ("25:00-01:00", "22:00", "07:00-07:00"):
        with pytest.raises(ValueError):
            QuietHours.parse(bad)


def test_quiet_hours_collect_violations_into_one_digest_at_their_end(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 7, 1, 23, 0, tzinfo=BERLIN))
    outbox, sender, channel, counters = rig(
        tmp_path, clock, quiet_hours="22:00-07:00", digest_interval_s=24 * 3600
    )
    for camera, track in (("cam1", 1), ("cam2", 1), ("cam1", 2)):
        assert accept(outbox, clock, camera=camera, track=track) == (
            "pending", "digest", "quiet_hours"
        )
        clock.advance(600)

    sender.run_once()
    assert channel.alerts == [] and channel.digests == []
    assert counters.get("outbox_pending") == 3
    # The sender sleeps until quiet hours end (capped), not in a busy loop.
    assert sender._delay(clock()) > 0

    clock.now = datetime(2026, 7, 2, 7, 0, 1, tzinfo=BERLIN).timestamp()
    sender.run_once()
    assert len(channel.digests) == 1 and len(channel.digests[0]) == 3
    assert counters.get("mails_sent") == 1 and counters.get("alerts_digested") == 3
    assert outbox.counts("email")["sent"] == 3

    # Daytime again: a violation is its own mail.
    assert accept(outbox, clock, camera="cam3", track=9) == ("pending", "single", None)
    sender.run_once()
    assert len(channel.alerts) == 1


def test_digest_interval_sends_during_long_quiet_hours(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 7, 1, 22, 30, tzinfo=BERLIN))
    outbox, sender, channel, _ = rig(
        tmp_path, clock, quiet_hours="22:00-07:00", digest_interval_s=3600
    )
    accept(outbox, clock, camera="cam1", track=1)
    clock.advance(3601)
    sender.run_once()
    assert len(channel.digests) == 1


# -- cool-downs and caps --------------------------------------------------------------


def test_one_track_alerts_once_per_cooldown_by_capture_time(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 7, 1, 12, 0, tzinfo=UTC))
    outbox, _, _, _ = rig(tmp_path, clock, track_cooldown_s=300)
    assert accept(outbox, clock, track=3) == ("pending", "single", None)
    clock.advance(100)
    assert accept(outbox, clock, track=3) == ("suppressed", "single", "track_cooldown")
    clock.advance(250)  # 350 s after the alert, though only 250 s after a suppressed frame
    assert accept(outbox, clock, track=3)[0] == "pending"
    # Suppressed rows keep no photo: nothing is sent for them.
    suppressed = [a for a in outbox.due_singles("email", clock()) if a.state == "suppressed"]
    assert suppressed == []


def test_camera_cooldown_and_hourly_cap_hold_alerts_for_a_digest(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 7, 1, 12, 0, tzinfo=UTC))
    outbox, sender, channel, _ = rig(
        tmp_path, clock, camera_cooldown_s=60, max_mails_per_hour=2, digest_interval_s=900
    )
    assert accept(outbox, clock, camera="cam1", track=1) == ("pending", "single", None)
    clock.advance(10)
    assert accept(outbox, clock, camera="cam1", track=2) == (
        "pending", "digest", "camera_cooldown"
    )
    assert accept(outbox, clock, camera="cam2", track=1) == ("pending", "single", None)
    assert accept(outbox, clock, camera="cam3", track=1) == ("pending", "digest", "hourly_cap")

    sender.run_once()
    assert len(channel.alerts) == 2 and channel.digests == []
    clock.advance(900)
    sender.run_once()
    assert [len(d) for d in channel.digests] == [2]
    # Nothing was dropped: every violation is in one state or another.
    assert sum(outbox.counts().values()) == 4 and outbox.counts()["sent"] == 4


# -- retries --------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_with_bounded_jitter(tmp_path: Path) -> None:
    sec = section(tmp_path, retry_base_s=2, retry_max_s=30, retry_jitter=0.25)
    assert [backoff_s(n, sec, lambda: 0.5) for n in (1, 2, 3, 4, 5, 9)] == [2, 4, 8, 16, 30, 30]
    assert backoff_s(1, sec, lambda: 0.0) == pytest.approx(1.5)
    assert backoff_s(1, sec, lambda: 0.999999) == pytest.approx(2.5, abs=1e-4)


def test_temporary_failures_retry_with_backoff_permanent_ones_stop(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 7, 1, 12, 0, tzinfo=UTC))
    outcomes = [
        Outcome("temporary", "451 try later"),
        Outcome("temporary", "451 try later"),
        Outcome("sent"),
        Outcome("permanent", "550 5.1.1 no such user"),
    ]
    outbox, sender, channel, counters = rig(tmp_path, clock, outcomes)
    first = make_violation(track=1)
    outbox.accept(first, clock())
    sender.run_once()
    row = outbox.get(first.face_id, "email")
    assert row is not None and row.attempts == 1 and row.last_error == "451 try later"
    sender.run_once()
    assert len(channel.alerts) == 1  # not due again yet
    clock.advance(1.0)
    sender.run_once()
    clock.advance(1.9)
    sender.run_once()
    assert len(channel.alerts) == 2  # the second back-off step is 2 s
    clock.advance(0.2)
    sender.run_once()
    assert len(channel.alerts) == 3
    assert counters.get("mails_retried") == 2 and counters.get("mails_sent") == 1

    second = make_violation(track=2)
    outbox.accept(second, clock())
    sender.run_once()
    clock.advance(100)
    sender.run_once()
    row = outbox.get(second.face_id, "email")
    assert row is not None and row.state == "failed_permanent" and "550" in (row.last_error or "")
    assert counters.get("mails_failed") == 1 and len(channel.alerts) == 4


def test_an_unreachable_server_pauses_the_channel_not_just_the_alert(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 7, 1, 12, 0, tzinfo=UTC))
    down = Outcome("temporary", "ConnectionRefusedError", unreachable=True)
    outbox, sender, channel, counters = rig(tmp_path, clock, [down, down])
    for track in range(3):
        outbox.accept(make_violation(track=track), clock())
    sender.run_once()
    assert len(channel.alerts) == 1  # one connection attempt, not three
    assert sender._delay(clock()) == pytest.approx(1.0)
    clock.advance(1.0)
    sender.run_once()
    assert len(channel.alerts) == 2
    clock.advance(2.0)
    sender.run_once()
    assert len(channel.alerts) == 2 + 3  # up again: the failed one and the two others
    assert counters.get("mails_sent") == 3


def test_sms_recipients_already_done_are_not_sent_again(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 7, 1, 12, 0, tzinfo=UTC))
    partly = Outcome("temporary", "HTTP 503", delivered=frozenset({"+15550000001"}))
    outbox, sender, channel, _ = rig(tmp_path, clock, [partly])
    v = make_violation()
    outbox.accept(v, clock())
    sender.run_once()
    clock.advance(5)
    sender.run_once()
    assert channel.alerts[1].delivered_to == frozenset({"+15550000001"})


def test_recipient_answers_are_sorted_into_retry_and_give_up() -> None:
    code_550 = (550, b"5.1.1 no such user")
    code_451 = (451, b"4.2.0 mailbox busy")
    ok = _recipient_outcome(frozenset(), ["a@x.test"], {"b@x.test": code_550})
    assert ok.status == "sent" and "550" in ok.detail
    later = _recipient_outcome(frozenset(), ["a@x.test"], {"b@x.test": code_451})
    assert later.status == "temporary" and later.delivered == frozenset({"a@x.test"})
    dead = _recipient_outcome(frozenset(), [], {"b@x.test": code_550})
    assert dead.status == "permanent"


# -- retention ------------------------------------------------------------------------


def test_photos_are_deleted_after_the_retention_period_and_the_row_stays(
    tmp_path: Path,
) -> None:
    clock = Clock(datetime(2026, 7, 1, 12, 0, tzinfo=UTC))
    outbox, sender, channel, _ = rig(tmp_path, clock, retention_s=3600, retention_sweep_s=60)
    v = make_violation()
    outbox.accept(v, clock())
    sender.run_once()
    assert outbox.clear_old_photos(clock() + 10) == 0
    clock.advance(3601)
    sender.run_once()  # the sweep is due
    row = outbox.get(v.face_id, "email")
    assert row is not None and row.state == "sent"
    assert row.crop_jpeg is None and row.context_jpeg is None
    # A mail composed now still reads, and says why there is no photo.
    message = compose.alert_mail(row, "maskmesh@district.test", ["o@district.test"], BERLIN)
    assert "deleted after the retention period" in message.get_body(("plain",)).get_content()
    assert jpeg_parts(message) == []


# -- composing ------------------------------------------------------------------------


def test_the_annotated_photo_falls_back_to_the_crop(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 7, 1, 12, 0, tzinfo=UTC))
    outbox, _, _, _ = rig(tmp_path, clock)
    v = make_violation(
        context=False, label="incorrect", p_mask=0.4, place=None,
        captured_at=datetime.fromtimestamp(clock(), UTC),
    )
    outbox.accept(v, clock())
    row = outbox.get(v.face_id, "email")
    assert row is not None
    photo = compose.annotated_photo(row)
    assert photo is not None and photo != CROP_JPEG
    image = cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[1] >= 480
    assert compose.alert_subject(row, BERLIN) == (
        "[maskmesh] Mask worn incorrectly at cam1 2026-07-01 14:00"
    )


def test_a_digest_mail_lists_every_alert_and_reaches_the_sink(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 7, 1, 23, 0, tzinfo=BERLIN))
    sink = MailSink(tmp_path / "mail", port=free_port())
    sec = section(
        tmp_path, quiet_hours="22:00-07:00",
        smtp={"host": "127.0.0.1", "port": sink.port, "timeout_s": 3.0},
    )
    outbox = Outbox(sec.outbox_path, sec, ["email"])
    counters = Counters()
    sender = Sender(outbox, [SmtpChannel(sec)], sec, counters, clock=clock)
    ids = []
    for track in range(3):
        v = make_violation(
            track=track, captured_at=datetime.fromtimestamp(clock(), UTC), place="Hall B"
        )
        outbox.accept(v, clock())
        ids.append(v.face_id)
        clock.advance(60)
    clock.now = datetime(2026, 7, 2, 7, 0, tzinfo=BERLIN).timestamp()
    with sink:
        sender.run_once()
        paths = sink.messages()
    assert len(paths) == 1
    message = email.message_from_bytes(paths[0].read_bytes(), policy=default_policy)
    assert isinstance(message, EmailMessage)
    assert message["Subject"] == (
        "[maskmesh] Digest: 3 violations 2026-07-01 23:00-23:02"
    )
    text = message.get_body(("plain",)).get_content()
    assert all(face_id in text for face_id in ids)
    assert "quiet hours" in text and "Hall B x3" in text
    assert len(jpeg_parts(message)) == 3
    assert counters.get("mails_sent") == 1 and outbox.counts()["sent"] == 3


def test_header_values_come_only_through_email_message() -> None:
    message = EmailMessage()
    with pytest.raises(ValueError):
        message["Subject"] = "[maskmesh] No mask at Hall\r\nBcc: someone@else.test"


# -- settings and the sink ------------------------------------------------------------


def _load(tmp_path: Path, text: str) -> NotifierSettings:
    config = tmp_path / "notifier.yaml"
    config.write_text(text, encoding="utf-8")
    return load_settings(NotifierSettings, config)


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("notifier:\n  quiet_hours: '22-7'\n", "notifier.quiet_hours"),
        ("notifier:\n  timezone: Mars/Olympus\n", "notifier.timezone"),
        ("notifier:\n  recipients: ['not an address']\n", "notifier.recipients"),
        ("notifier:\n  twilio: {enabled: true}\n", "notifier.twilio"),
        ("notifier:\n  smtp: {tls: sometimes}\n", "notifier.smtp.tls"),
        ("notifier:\n  recipients: []\n", "notifier"),
    ],
)
def test_bad_settings_name_the_field(tmp_path: Path, yaml_text: str, field: str) -> None:
    with pytest.raises(SettingsError) as info:
        _load(tmp_path, yaml_text)
    assert field in str(info.value)


def test_secrets_stay_out_of_reprs_and_come_from_files(tmp_path: Path) -> None:
    secret_file = tmp_path / "smtp-password"
    secret_file.write_text("hunter2-from-file\n", encoding="utf-8")
    settings = _load(
        tmp_path,
        f"notifier:\n  smtp: {{username: alerts, password_file: {secret_file}}}\n"
        "  twilio: {auth_token: tok-secret}\n",
    )
    assert settings.notifier.smtp.resolved_password() == "hunter2-from-file"
    assert "tok-secret" not in repr(settings) and "tok-secret" not in str(settings)


def test_sink_file_names_are_safe() -> None:
    assert safe_name("<abc/../def@x.maskmesh>") == "abc_.._def_x.maskmesh"
    assert len(safe_name(None)) == 32
    assert "/" not in safe_name("<../../etc/passwd>")
