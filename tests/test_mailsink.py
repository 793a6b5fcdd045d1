"""The local mail sink: stores what it accepts as .eml, refuses and stalls on request."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from services.notifier.mailsink import MailSink, RefuseStage

from .conftest import free_port, wait_for_port


def _mail(message_id: str = "<one/two@example.test>") -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = "hello"
    msg["From"] = "maskmesh@district.test"
    msg["To"] = "operator@district.test"
    msg["Message-ID"] = message_id
    msg.set_content("body\n")
    return msg


def _send(port: int, msg: EmailMessage) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
        return smtp.send_message(msg)


def test_each_mail_is_one_eml_named_by_time_and_message_id(tmp_path: Path) -> None:
    with MailSink(tmp_path / "mail", port=0) as sink:
        assert _send(sink.port, _mail()) == {}
        assert _send(sink.port, _mail()) == {}
        paths = sink.messages()
    assert len(paths) == 2
    assert all(p.name.endswith("-one_two_example.test.eml") for p in paths)
    assert b"Subject: hello" in paths[0].read_bytes()
    # Written through a temporary file: nothing half-written is left behind.
    assert [p.name for p in (tmp_path / "mail").iterdir() if not p.name.endswith(".eml")] == []


@pytest.mark.parametrize(("code", "stage", "error"), [
    (550, "rcpt", smtplib.SMTPRecipientsRefused),
    (451, "rcpt", smtplib.SMTPRecipientsRefused),
    (554, "data", smtplib.SMTPDataError),
])
def test_refusals_for_fault_tests(
    tmp_path: Path, code: int, stage: RefuseStage, error: type[Exception]
) -> None:
    with MailSink(tmp_path / "mail", port=0, refuse_code=code, refuse_stage=stage) as sink:
        with pytest.raises(error) as info:
            _send(sink.port, _mail())
        assert str(code) in str(info.value)
        assert sink.messages() == []


def test_delay_makes_a_slow_server(tmp_path: Path) -> None:
    with MailSink(tmp_path / "mail", port=0, delay_s=0.5) as sink:
        started = time.monotonic()
        _send(sink.port, _mail())
        assert time.monotonic() - started >= 0.5
        assert len(sink.messages()) == 1


def test_the_mailsink_command_runs_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    folder = tmp_path / "mail"
    process = subprocess.Popen(
        [sys.executable, "-m", "maskmesh.cli", "mailsink", "--dir", str(folder),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout_s=20)
        _send(port, _mail("<cli@example.test>"))
        assert len(list(folder.glob("*-cli_example.test.eml"))) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    assert process.returncode == 0, output.decode()


def test_the_mailsink_command_refuses_a_bad_code(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "maskmesh.cli", "mailsink", "--dir", str(tmp_path),
         "--refuse-code", "250"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and "refuse-code" in result.stderr
