"""The notifier's settings: the ``notifier:`` section on top of ``ServiceSettings``.

Everything that decides who is told, how and how often lives here, validated once at
start-up: the SMTP server (loopback by default, so a fresh install never mails anyone),
recipients, the district's time zone and quiet hours, cool-downs and rate limits, the
outbox file, retry back-off, photo retention and the optional Twilio SMS channel.
"""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from maskmesh.settings import ServiceSettings, read_secret

_QUIET_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
# Deliberately narrow: an address ends up in an envelope and a To header.
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+$")
_PHONE_RE = re.compile(r"^\+[1-9]\d{6,14}$")



class QuietHours(BaseModel):
    """A daily window in local time, ``start`` inclusive, ``end`` exclusive; may wrap midnight."""

    model_config = ConfigDict(frozen=True)

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> QuietHours:
        match = _QUIET_RE.fullmatch(text.strip())
        if not match:
            raise ValueError(f"quiet hours {text!r} must look like '22:00-07:00'")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if (h1, m1) == (h2, m2):
            raise ValueError("quiet hours must not start and end at the same minute")
        return cls(start=time(h1, m1), end=time(h2, m2))

    def contains(self, local: datetime) -> bool:
        now = local.time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end

    def end_after(self, local: datetime) -> datetime:
        """The first end of quiet hours after ``local`` (an aware datetime)."""
        candidate = local.replace(
            hour=self.end.hour, minute=self.end.minute, second=0, microsecond=0
        )
        if candidate <= local:
            candidate += timedelta(days=1)
        # Recomputing from the wall clock keeps the end right across a DST change.
        return candidate.replace(tzinfo=None).replace(tzinfo=local.tzinfo)


class SmtpSettings(BaseModel):
    """The mail server the notifier hands its alerts to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8025, ge=1, le=65535)
    tls: Literal["none", "starttls", "ssl"] = "none"
    # CA bundle that verifies the server's certificate; the system store when None.
    ca_file: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    # Connect, and every later read, gives up after this long.
    timeout_s: float = Field(default=15.0, gt=0, le=600)

    @model_validator(mode="after")
    def _one_password_source(self) -> SmtpSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        return self

    def resolved_password(self) -> str | None:
        return read_secret(self.password, self.password_file, "notifier.smtp.password_file")


class TwilioSettings(BaseModel):
    """The optional SMS channel through Twilio's REST API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    account_sid: str | None = None
    auth_token: SecretStr | None = None
    auth_token_file: Path | None = None
    from_number: str | None = None
    to_numbers: list[str] = Field(default_factory=list)
    # Only for tests and proxies: requests go here instead of Twilio's own hosts.
    base_url: str | None = None
    timeout_s: float = Field(default=15.0, gt=0, le=600)

    @field_validator("to_numbers")
    @classmethod
    def _phone_numbers(cls, values: list[str]) -> list[str]:
        for value in values:
            if not _PHONE_RE.fullmatch(value):
                raise ValueError(f"{value!r} is not an E.164 number like +15551234567")
        return values

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> TwilioSettings:
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError("give auth_token or auth_token_file, not both")
        if self.base_url is not None and not re.match(r"^https?://[^/]+/?$", self.base_url):
            raise ValueError(
                "twilio.base_url must be a scheme and host, like http://127.0.0.1:8080"
            )
        if not self.enabled:
            return self
        missing = [
            name
            for name, value in (
                ("account_sid", self.account_sid),
                ("from_number", self.from_number),
                ("auth_token", self.auth_token or self.auth_token_file),
            )
            if not value
        ]
        if not self.to_numbers:
            missing.append("to_numbers")
        if missing:
            raise ValueError(f"twilio is enabled but lacks {', '.join(missing)}")
        return self

    def resolved_auth_token(self) -> str | None:
        return read_secret(
            self.auth_token, self.auth_token_file, "notifier.twilio.auth_token_file"
        )


class NotifierSection(BaseModel):
    """The ``notifier:`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    # The default suits the local mail sink of ``maskmesh up``; a district sets its own.
    recipients: list[str] = Field(default_factory=lambda: ["operator@localhost"])
    mail_from: str = "maskmesh@localhost"
    timezone: str = "UTC"
    # Stable MQTT client id, so the broker keeps the session across restarts.
    client_id: str | None = None

    # One mail per event: frames of one (camera, track) within this are the same event.
    track_cooldown_s: float = Field(default=300.0, ge=0)
    # A camera mails at most once in this window; later alerts go to the next digest.
    camera_cooldown_s: float = Field(default=60.0, ge=0)
    # District-wide cap on single alert mails per rolling hour; the rest go to a digest.
    max_mails_per_hour: int = Field(default=30, ge=1)
    quiet_hours: str | None = None
    # A digest of held alerts goes out at most this long after its oldest alert.
    digest_interval_s: float = Field(default=900.0, gt=0)

    outbox_path: Path = Path("notifier-outbox.sqlite3")
    # Photos of a person are personal data: cleared from the outbox after this long.
    retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    retention_sweep_s: float = Field(default=600.0, gt=0)

    retry_base_s: float = Field(default=5.0, gt=0)
    retry_max_s: float = Field(default=600.0, gt=0)
    # Each delay is scaled by a random factor in [1 - jitter, 1 + jitter].
    retry_jitter: float = Field(default=0.2, ge=0, le=1)

    twilio: TwilioSettings = Field(default_factory=TwilioSettings)

    @field_validator("recipients")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        for value in values:
            if not _ADDRESS_RE.fullmatch(value):
                raise ValueError(f"{value!r} is not a plain e-mail address")
        return values

    @field_validator("mail_from")
    @classmethod
    def _from_address(cls, value: str) -> str:
        if not _ADDRESS_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a plain e-mail address")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name)") from None
        return value

    @field_validator("quiet_hours")
    @classmethod
    def _quiet_window(cls, value: str | None) -> str | None:
        if value is not None:
            QuietHours.parse(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> NotifierSection:
        if self.retry_max_s < self.retry_base_s:
            raise ValueError("retry_max_s must be at least retry_base_s")
        if not self.recipients and not self.twilio.enabled:
            raise ValueError("nobody would be told: give recipients or enable twilio")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def quiet(self) -> QuietHours | None:
        return QuietHours.parse(self.quiet_hours) if self.quiet_hours else None


class NotifierSettings(ServiceSettings):
    """Settings of ``maskmesh notifier``."""

    notifier: NotifierSection = Field(default_factory=NotifierSection)
