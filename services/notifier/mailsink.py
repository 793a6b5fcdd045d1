"""``maskmesh mailsink``: a local SMTP server that files each mail as a ``.eml``.

For ``maskmesh up``, demos and tests: nothing leaves the machine, and every mail the
notifier sends can be opened in a mail client or parsed. Each mail is written atomically
(a temporary file, fsync, rename) as ``DIR/<UTC timestamp>-<Message-ID>.eml``, so a reader
never sees half a file. For fault tests it can answer slowly (``--delay-s``) or refuse
(``--refuse-code 550`` for a permanent, ``451`` for a temporary refusal).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import ssl
import sys
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from maskmesh.logs import configure_logging

logger = logging.getLogger(__name__)

RefuseStage = Literal["rcpt", "data"]
TlsMode = Literal["none", "starttls", "ssl"]
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")
_REFUSALS = {
    4: "4.3.0 mail sink refuses for now (fault test)",
    5: "5.1.1 mail sink refuses this recipient (fault test)",
}


def safe_name(message_id: str | None, limit: int = 80) -> str:
    """A file-name part from a Message-ID: only letters, digits, '.', '_' and '-'."""
    cleaned = _UNSAFE_RE.sub("_", (message_id or "").strip("<> \t")).strip("._")
    return cleaned[:limit] or uuid.uuid4().hex


class _Handler:
    """aiosmtpd handler: store what arrives, or stall and refuse as configured."""

    def __init__(self, sink: MailSink) -> None:
        self.sink = sink

    def _refusal(self, stage: RefuseStage) -> str | None:
        code = self.sink.refuse_code
        if code is None or self.sink.refuse_stage != stage:
            return None
        return f"{code} {_REFUSALS.get(code // 100, 'refused (fault test)')}"

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        refusal = self._refusal("rcpt")
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any
    ) -> str:
        if self.sink.delay_s > 0:
            await asyncio.sleep(self.sink.delay_s)
        refusal = self._refusal("data")
        if refusal is not None:
            return refusal
        content = envelope.original_content or envelope.content
        path = await asyncio.get_running_loop().run_in_executor(None, self.sink.store, content)
        logger.info(
            "stored a mail from %s to %s as %s",
            envelope.mail_from, ", ".join(envelope.rcpt_tos), path.name,
        )
        return "250 OK stored"


class MailSink:
    """An SMTP server on host:port that stores every accepted mail under ``directory``.

    directory: where .eml files go (created if missing).
    host, port: where to listen; loopback unless you mean otherwise (port 0: any free one).
    delay_s: wait this long before answering each DATA (a slow server).
    refuse_code: answer this SMTP code instead of accepting (550, 451, ...).
    refuse_stage: refuse at RCPT (a bad recipient) or at the end of DATA.
    tls: "starttls" or "ssl" (implicit TLS) with cert_file/key_file; "none" by default.
    username, password: when given, clients must log in (AUTH PLAIN/LOGIN) to send.
    """

    def __init__(
        self,
        directory: Path | str,
        host: str = "127.0.0.1",
        port: int = 8025,
        delay_s: float = 0.0,
        refuse_code: int | None = None,
        refuse_stage: RefuseStage = "rcpt",
        tls: TlsMode = "none",
        cert_file: Path | None = None,
        key_file: Path | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.host = host
        self.port = port
        self.delay_s = delay_s
        self.refuse_code = refuse_code
        self.refuse_stage: RefuseStage = refuse_stage
        self.tls: TlsMode = tls
        self.cert_file = cert_file
        self.key_file = key_file
        self.username = username
        self.password = password
        self._controller: Controller | None = None
        self._lock = threading.Lock()

    def _controller_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.tls != "none":
            if self.cert_file is None or self.key_file is None:
                raise ValueError("a TLS mail sink needs cert_file and key_file")
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
            if self.tls == "ssl":
                options["ssl_context"] = context
            else:
                options["tls_context"] = context
                options["require_starttls"] = True
        if self.username is not None:
            options["authenticator"] = self._authenticate
            options["auth_required"] = True
            # Without TLS only for tests on loopback; a STARTTLS sink demands it first.
            options["auth_require_tls"] = self.tls == "starttls"
        return options

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode("utf-8", "replace") == self.username
            and auth_data.password.decode("utf-8", "replace") == (self.password or "")
        )
        return AuthResult(success=ok, handled=False)

    def start(self) -> None:
        """Listen; returns once the server answers."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = _free_port(self.host)
        controller = Controller(
            _Handler(self), hostname=self.host, port=self.port, **self._controller_options()
        )
        controller.start()
        self._controller = controller
        logger.info("mail sink on %s:%s storing into %s", self.host, self.port, self.directory)

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def __enter__(self) -> MailSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def store(self, content: bytes) -> Path:
        """Write one mail atomically; return its final path."""
        headers = BytesHeaderParser(policy=default_policy).parsebytes(content)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{stamp}-{safe_name(headers.get('Message-ID'))}"
        with self._lock:
            final = self.directory / f"{name}.eml"
            counter = 1
            while final.exists():
                final = self.directory / f"{name}-{counter}.eml"
                counter += 1
            tmp = self.directory / f".{final.name}.tmp"
            with tmp.open("wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        return final

    def messages(self) -> list[Path]:
        """The stored .eml files, oldest first."""
        return sorted(self.directory.glob("*.eml"))


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskmesh mailsink", description="Local SMTP server that stores mails as .eml."
    )
    parser.add_argument("--dir", type=Path, required=True, help="folder for the .eml files")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (loopback)")
    parser.add_argument("--port", type=int, default=8025, help="listen port")
    parser.add_argument("--delay-s", type=float, default=0.0, help="stall each DATA this long")
    parser.add_argument("--refuse-code", type=int, help="refuse with this code (550, 451)")
    parser.add_argument(
        "--refuse-stage", choices=("rcpt", "data"), default="rcpt",
        help="refuse at RCPT TO or after DATA",
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sink until SIGTERM or SIGINT."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    configure_logging(args.log_level)
    if args.refuse_code is not None and not 400 <= args.refuse_code < 600:
        print("maskmesh mailsink: --refuse-code must be a 4xx or 5xx code", file=sys.stderr)
        return 2
    if args.delay_s < 0:
        print("maskmesh mailsink: --delay-s must not be negative", file=sys.stderr)
        return 2
    sink = MailSink(
        args.dir, args.host, args.port, args.delay_s, args.refuse_code, args.refuse_stage
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        sink.start()
    except OSError as exc:
        print(f"maskmesh mailsink: cannot listen on {args.host}:{args.port}: {exc}",
              file=sys.stderr)
        return 1
    stop.wait()
    sink.stop()
    return 0
