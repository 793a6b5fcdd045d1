"""Delivery channels: SMTP mail, and SMS through Twilio.

A channel turns one alert (or one digest of alerts) into a delivery attempt and says how
it went as an ``Outcome``: ``sent`` once the server accepted it, ``temporary`` when it is
worth trying again later (4xx, connection refused, time-out), ``permanent`` when the
server refused it for good (5xx). ``delivered`` lists the recipients already done, so a
retry never sends twice to someone who already has it. A channel never raises for a
delivery problem; it runs on the sender thread, never on the MQTT thread.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

from services.notifier import compose
from services.notifier.outbox import Alert
from services.notifier.settings import NotifierSection, SmtpSettings, TwilioSettings

logger = logging.getLogger(__name__)

Status = Literal["sent", "temporary", "permanent"]


@dataclass(frozen=True)
class Outcome:
    """How one delivery attempt went.

    status: sent, temporary (try again later) or permanent (give up, report).
    detail: the server's answer or the error, for the outbox and the log.
    delivered: recipients done so far, including any refused for good.
    unreachable: the server itself failed (down, time-out, bad login), not this alert,
        so the sender pauses the whole channel instead of trying the next alert at once.
    """

    status: Status
    detail: str = ""
    delivered: frozenset[str] = field(default_factory=frozenset)
    unreachable: bool = False


class Channel(Protocol):
    name: str

    def send_alert(self, alert: Alert) -> Outcome: ...

    def send_digest(self, alerts: Sequence[Alert]) -> Outcome: ...


# 5xx answers about the connection's authentication or encryption (RFC 4954, 3207).
_SERVER_SETUP_CODES = frozenset({530, 534, 535, 538})


def _is_permanent(code: int) -> bool:
    return 500 <= code < 600


def _answer(code: int, message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    return f"{code} {text}".strip()


SmtpFactory = Callable[[SmtpSettings], smtplib.SMTP]


def open_smtp(settings: SmtpSettings) -> smtplib.SMTP:
    """Connect (with the configured time-out), secure and log in to the mail server."""
    context = ssl.create_default_context(
        cafile=str(settings.ca_file) if settings.ca_file else None
    )
    smtp: smtplib.SMTP
    if settings.tls == "ssl":
        smtp = smtplib.SMTP_SSL(
            settings.host, settings.port, timeout=settings.timeout_s, context=context
        )
    else:
        smtp = smtplib.SMTP(settings.host, settings.port, timeout=settings.timeout_s)
    try:
        if settings.tls == "starttls":
            smtp.starttls(context=context)
        if settings.username:
            smtp.login(settings.username, settings.resolved_password() or "")
    except BaseException:
        smtp.close()
        raise
    return smtp


class SmtpChannel:
    """Mail over SMTP to the district's recipients (Twilio SendGrid too, via its SMTP relay).

    section: the notifier settings (smtp, recipients, mail_from, timezone).
    connect: opens a logged-in connection; replaceable in tests.
    """

    name = "email"

    def __init__(self, section: NotifierSection, connect: SmtpFactory = open_smtp) -> None:
        self.section = section
        self.recipients = list(section.recipients)
        self.zone = section.zone
        self._connect = connect

    def send_alert(self, alert: Alert) -> Outcome:
        todo = [r for r in self.recipients if r not in alert.delivered_to]
        msg = compose.alert_mail(alert, self.section.mail_from, self.recipients, self.zone)
        return self._deliver(msg, todo, alert.delivered_to)

    def send_digest(self, alerts: Sequence[Alert]) -> Outcome:
        done = alerts[0].delivered_to
        todo = [r for r in self.recipients if r not in done]
        msg = compose.digest_mail(alerts, self.section.mail_from, self.recipients, self.zone)
        return self._deliver(msg, todo, done)

    def _deliver(
        self, msg: EmailMessage, todo: list[str], done: frozenset[str]
    ) -> Outcome:
        if not todo:
            return Outcome("sent", "every recipient already has it", done)
        try:
            smtp = self._connect(self.section.smtp)
        except smtplib.SMTPAuthenticationError as exc:
            # Bad credentials are the server's set-up, not this alert's fault: keep it.
            return Outcome("temporary", "login refused: " + _answer(exc.smtp_code, exc.smtp_error),
                           done, unreachable=True)
        except (smtplib.SMTPException, OSError) as exc:
            return Outcome("temporary", _describe_error(exc), done, unreachable=True)

        # Limitation: a crash after the server accepted a mail but before the outbox marked
        # it sent resends it on restart. So does a connection lost after the server stored
        # the mail but before its "250" reached us (the fault suite sees this when the mail
        # server stops mid-delivery): SMTP cannot tell "not stored" from "answer lost", and
        # a resend beats a lost alert. It keeps its Message-ID, so that mail clients and
        # archives that de-duplicate by Message-ID show it once.
        try:
            refused = smtp.send_message(msg, from_addr=self.section.mail_from, to_addrs=todo)
        except smtplib.SMTPRecipientsRefused as exc:
            refused = exc.recipients
            accepted: list[str] = []
        except smtplib.SMTPResponseException as exc:
            answer = _answer(exc.smtp_code, exc.smtp_error)
            if exc.smtp_code in _SERVER_SETUP_CODES:
                # "Log in first" or "STARTTLS first": our set-up, not this alert, is wrong.
                return Outcome("temporary", answer, done, unreachable=True)
            status: Status = "permanent" if _is_permanent(exc.smtp_code) else "temporary"
            return Outcome(status, answer, done)
        except (smtplib.SMTPException, OSError) as exc:
            # Cut off mid-transaction: the server has not accepted, so trying again is safe.
            return Outcome("temporary", _describe_error(exc), done, unreachable=True)
        else:
            accepted = [r for r in todo if r not in refused]
        finally:
            _close_quietly(smtp)
        return _recipient_outcome(done, accepted, refused)


def _recipient_outcome(
    done: frozenset[str], accepted: list[str], refused: dict[str, tuple[int, bytes]]
) -> Outcome:
    """Sort per-recipient answers: keep the 4xx ones for a retry, give up on 5xx ones."""
    gave_up = {r for r, (code, _) in refused.items() if _is_permanent(code)}
    later = {r for r in refused if r not in gave_up}
    now_done = done | frozenset(accepted) | frozenset(gave_up)
    detail = "; ".join(f"{r}: {_answer(code, text)}" for r, (code, text) in refused.items())
    if later:
        return Outcome("temporary", detail, now_done)
    if accepted or (done - frozenset(gave_up)):
        return Outcome("sent", detail, now_done)
    return Outcome("permanent", detail or "every recipient was refused", now_done)


def _close_quietly(smtp: smtplib.SMTP) -> None:
    # After the server accepted the mail nothing here may turn it into a failure.
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        return _answer(exc.smtp_code, exc.smtp_error)
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"


# -- Twilio ---------------------------------------------------------------------------


def _twilio_http_client(settings: TwilioSettings) -> object:
    """Twilio's HTTP client, pointed at ``base_url`` when one is set (a local fake)."""
    from twilio.http.http_client import TwilioHttpClient

    class RebasedHttpClient(TwilioHttpClient):
        """Sends every request to ``base`` (scheme and host), keeping path and query."""

        def __init__(self, base: str | None, timeout: float) -> None:
            super().__init__(timeout=timeout, logger=logging.getLogger("twilio.http_client"))
            self.base = urlsplit(base) if base else None

        def request(  # type: ignore[no-untyped-def]
            self, method: str, url: str, *args: object, **kwargs: object
        ):
            if self.base is not None:
                parts = urlsplit(url)
                url = urlunsplit(
                    (self.base.scheme, self.base.netloc, parts.path, parts.query, "")
                )
            return super().request(method, url, *args, **kwargs)  # type: ignore[arg-type]

    return RebasedHttpClient(settings.base_url, settings.timeout_s)


def make_twilio_client(settings: TwilioSettings) -> object:
    from twilio.rest import Client

    return Client(
        settings.account_sid,
        settings.resolved_auth_token(),
        http_client=_twilio_http_client(settings),  # type: ignore[arg-type]
    )


# Limitation: Twilio SendGrid's own HTTP mail API is not used (the ``sendgrid`` package is
# not a dependency); SendGrid accounts send through the SMTP channel instead, with
# smtp.host smtp.sendgrid.net, port 587, tls starttls, username "apikey" and the API key
# as password_file.
class TwilioSmsChannel:
    """SMS through Twilio's Messages API, one message per configured number.

    section: the notifier settings (twilio, timezone).
    client: a ``twilio.rest.Client`` (or anything with ``messages.create``); built from
        the settings when None.
    """

    name = "sms"

    def __init__(self, section: NotifierSection, client: object | None = None) -> None:
        self.settings = section.twilio
        self.zone = section.zone
        self.client = client if client is not None else make_twilio_client(self.settings)

    def send_alert(self, alert: Alert) -> Outcome:
        return self._deliver(compose.alert_sms(alert, self.zone), alert.delivered_to)

    def send_digest(self, alerts: Sequence[Alert]) -> Outcome:
        return self._deliver(compose.digest_sms(alerts, self.zone), alerts[0].delivered_to)

    def _deliver(self, body: str, done: frozenset[str]) -> Outcome:
        from twilio.base.exceptions import TwilioException, TwilioRestException

        delivered = set(done)
        refused: list[str] = []
        accepted = 0
        for number in self.settings.to_numbers:
            if number in delivered:
                continue
            try:
                self.client.messages.create(  # type: ignore[attr-defined]
                    to=number, from_=self.settings.from_number, body=body
                )
            except TwilioRestException as exc:
                detail = f"{number}: HTTP {exc.status} code {exc.code} {exc.msg}"
                if exc.status == 429 or exc.status >= 500:
                    return Outcome("temporary", detail, frozenset(delivered))
                if exc.status in (401, 403):
                    return Outcome("temporary", detail, frozenset(delivered), unreachable=True)
                refused.append(detail)
                delivered.add(number)
            except (TwilioException, OSError) as exc:
                # OSError covers requests' ConnectionError and Timeout.
                return Outcome(
                    "temporary", _describe_error(exc), frozenset(delivered), unreachable=True
                )
            else:
                accepted += 1
                delivered.add(number)
        if refused and not accepted and not done:
            return Outcome("permanent", "; ".join(refused), frozenset(delivered))
        return Outcome("sent", "; ".join(refused), frozenset(delivered))
