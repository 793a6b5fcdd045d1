"""The SMTP channel against the real sink with STARTTLS, implicit TLS and a login."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.notifier.channels import SmtpChannel
from services.notifier.mailsink import MailSink, TlsMode
from services.notifier.outbox import Alert, Outbox
from services.notifier.settings import NotifierSection

from .conftest import free_port
from .test_notifier import make_violation, read_mail
from .test_tls import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _alert(tmp_path: Path, section: NotifierSection) -> Alert:
    outbox = Outbox(tmp_path / "outbox.sqlite3", section, ["email"])
    violation = make_violation(captured_at=datetime(2026, 7, 1, 12, 0, tzinfo=UTC))
    outbox.accept(violation, 0.0)
    alert = outbox.get(violation.face_id, "email")
    assert alert is not None
    return alert


def _section(tmp_path: Path, port: int, **smtp: Any) -> NotifierSection:
    return NotifierSection(
        smtp={"host": "127.0.0.1", "port": port, "timeout_s": 5.0, **smtp},
        recipients=["operator@district.test"],
        outbox_path=tmp_path / "outbox.sqlite3",
    )


# aiosmtpd cannot tell that implicit TLS already protects the login, and warns.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
@pytest.mark.parametrize("mode", ["starttls", "ssl"])
def test_mail_goes_over_tls_with_a_login_from_a_password_file(
    tmp_path: Path, pki: Pki, mode: TlsMode
) -> None:
    secret = tmp_path / "smtp-password"
    secret.write_text("s3cret-pass\n", encoding="utf-8")
    sink = MailSink(
        tmp_path / "mail", port=free_port(), tls=mode, cert_file=pki.cert, key_file=pki.key,
        username="alerts", password="s3cret-pass",
    )
    section = _section(
        tmp_path, sink.port, tls=mode, ca_file=pki.ca, username="alerts", password_file=secret
    )
    alert = _alert(tmp_path, section)
    with sink:
        outcome = SmtpChannel(section).send_alert(alert)
        assert outcome.status == "sent", outcome.detail
        assert read_mail(sink.messages()[0])["X-Maskmesh-Alert-Id"] == alert.face_id


def test_a_certificate_from_another_ca_is_not_trusted(tmp_path: Path, pki: Pki) -> None:
    sink = MailSink(
        tmp_path / "mail", port=free_port(), tls="ssl", cert_file=pki.cert, key_file=pki.key
    )
    section = _section(tmp_path, sink.port, tls="ssl", ca_file=pki.rogue_ca)
    with sink:
        outcome = SmtpChannel(section).send_alert(_alert(tmp_path, section))
        assert outcome.status == "temporary" and outcome.unreachable
        assert "CERTIFICATE_VERIFY_FAILED" in outcome.detail
        assert sink.messages() == []


def test_a_wrong_password_keeps_the_alert_and_never_shows_the_secret(
    tmp_path: Path, pki: Pki
) -> None:
    sink = MailSink(
        tmp_path / "mail", port=free_port(), tls="starttls", cert_file=pki.cert,
        key_file=pki.key, username="alerts", password="right",
    )
    section = _section(
        tmp_path, sink.port, tls="starttls", ca_file=pki.ca, username="alerts",
        password="wrong-and-secret",
    )
    with sink:
        outcome = SmtpChannel(section).send_alert(_alert(tmp_path, section))
    assert outcome.status == "temporary" and outcome.unreachable
    assert "535" in outcome.detail and "wrong-and-secret" not in outcome.detail


def test_a_server_demanding_starttls_is_a_setup_problem_not_a_refusal(
    tmp_path: Path, pki: Pki
) -> None:
    sink = MailSink(
        tmp_path / "mail", port=free_port(), tls="starttls", cert_file=pki.cert,
        key_file=pki.key,
    )
    section = _section(tmp_path, sink.port)
    with sink:
        outcome = SmtpChannel(section).send_alert(_alert(tmp_path, section))
    assert outcome.status == "temporary" and outcome.unreachable
    assert "530" in outcome.detail
