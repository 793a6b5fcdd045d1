"""Mosquitto configuration for one district: listener, password file and ACLs.

The ACL is generated from the district's camera list, one user per service role:

- ``capture-{camera}``: publish that camera's faces and its own status, nothing else;
- ``inference``: read every camera's faces, publish verdicts, violations, its status;
- ``notifier``: read violations, publish its status;
- ``integrator``: read verdicts and status; never faces or violations (they hold photos);
- ``operator``: read status and dead letters (``maskmesh status``, ``maskmesh up``);
- ``auditor`` (only when asked): read everything in the district, publish nothing.

Every role may publish to the dead-letter topic. ``maskmesh broker`` writes the files;
``render`` is the same thing as a function for tests and ``maskmesh up``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from maskmesh import topics
from maskmesh.ids import check_camera, check_identifier

ROLES = ("inference", "notifier", "integrator", "operator")
_PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes for sha512-pbkdf2


@dataclass(frozen=True)
class TLSListener:
    """A TLS listener: the broker's certificate, key, and the CA that signed it."""

    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    bind: str = "0.0.0.0"
    require_client_cert: bool = False


@dataclass(frozen=True)
class BrokerPlan:
    """What to generate.

    district: the district name, the second level of every topic.
    cameras: camera names; each gets its own capture user.
    port: plain MQTT port; bound to ``bind`` (loopback by default: plain TCP stays on
        the host, anything that leaves it goes through ``tls``).
    data_dir: persistence directory; None keeps the broker's default.
    tls: an optional TLS listener for clients off the host.
    auditor: add the read-everything ``auditor`` user.
    passwords: user -> password; missing ones are generated.
    """

    district: str
    cameras: tuple[str, ...]
    port: int = 1883
    bind: str = "127.0.0.1"
    data_dir: Path | None = None
    log_file: Path | None = None
    tls: TLSListener | None = None
    auditor: bool = False
    passwords: dict[str, str] = field(default_factory=dict)
    max_packet_bytes: int = 8 * 1024 * 1024
    max_queued_messages: int = 100000
    # Mosquitto started as root drops to the "mosquitto" user unless told otherwise; a
    # local run names the current user so the broker can read its 0600 password file.
    run_as: str | None = None


@dataclass(frozen=True)
class BrokerFiles:
    conf: Path
    passwd: Path
    acl: Path
    credentials: Path
    passwords: dict[str, str]


def capture_user(camera: str) -> str:
    return f"capture-{check_camera(camera)}"


def users(plan: BrokerPlan) -> list[str]:
    names = [capture_user(camera) for camera in plan.cameras] + list(ROLES)
    if plan.auditor:
        names.append("auditor")
    return names


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A Mosquitto 2.0 ``$7$`` (PBKDF2-SHA512) password hash."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, _PBKDF2_ITERATIONS)
    b64 = base64.b64encode
    return f"$7${_PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def acl_text(plan: BrokerPlan) -> str:
    """The ACL file: a block per user, each granting only that role's topics."""
    d = check_identifier(plan.district, "district")
    root = topics.district_root(d)
    dead = topics.deadletter(d)
    blocks: list[tuple[str, list[str]]] = []
    for camera in plan.cameras:
        blocks.append(
            (
                capture_user(camera),
                [
                    f"topic write {topics.faces(d, camera)}",
                    f"topic write {root}/status/capture/{camera}",
                    f"topic write {dead}",
                ],
            )
        )
    blocks += [
        (
            "inference",
            [
                f"topic read {topics.all_faces(d)}",
                f"topic write {topics.all_verdicts(d)}",
                f"topic write {topics.all_violations(d)}",
                f"topic write {root}/status/inference/+",
                f"topic write {dead}",
            ],
        ),
        (
            "notifier",
            [
                f"topic read {topics.all_violations(d)}",
                f"topic write {root}/status/notifier/+",
                f"topic write {dead}",
            ],
        ),
        (
            "integrator",
            [
                f"topic read {topics.all_verdicts(d)}",
                f"topic read {root}/status/#",
                f"topic write {dead}",
            ],
        ),
        (
            "operator",
            [f"topic read {root}/status/#", f"topic read {dead}", f"topic write {dead}"],
        ),
    ]
    if plan.auditor:
        blocks.append(("auditor", [f"topic read {root}/#"]))
    lines = ["# Generated by `maskmesh broker`; regenerate rather than edit.", ""]
    for user, rules in blocks:
        lines.append(f"user {user}")
        lines += rules
        lines.append("")
    return "\n".join(lines)


def conf_text(plan: BrokerPlan, passwd: Path, acl: Path) -> str:
    """mosquitto.conf for the plan, pointing at the given password and ACL files."""
    lines = [
        "# Generated by `maskmesh broker`; regenerate rather than edit.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {passwd}",
        f"acl_file {acl}",
        f"max_packet_size {plan.max_packet_bytes}",
        f"max_queued_messages {plan.max_queued_messages}",
        "max_inflight_messages 100",
        "persistent_client_expiration 7d",
        "persistence true",
        "autosave_interval 30",
    ]
    if plan.run_as is not None:
        lines.append(f"user {plan.run_as}")
    if plan.data_dir is not None:
        lines.append(f"persistence_location {plan.data_dir}/")
    if plan.log_file is not None:
        lines.append(f"log_dest file {plan.log_file}")
    lines += ["log_type error", "log_type warning", "log_type notice", "log_type information"]
    lines += ["", f"listener {plan.port} {plan.bind}", "protocol mqtt"]
    if plan.tls is not None:
        tls = plan.tls
        lines += [
            "",
            f"listener {tls.port} {tls.bind}",
            "protocol mqtt",
            f"cafile {tls.ca_file}",
            f"certfile {tls.cert_file}",
            f"keyfile {tls.key_file}",
            "tls_version tlsv1.2",
            f"require_certificate {'true' if tls.require_client_cert else 'false'}",
        ]
    return "\n".join(lines) + "\n"


def render(plan: BrokerPlan, out_dir: Path) -> BrokerFiles:
    """Write mosquitto.conf, passwd, acl and credentials.json (mode 0600) to out_dir."""
    for camera in plan.cameras:
        check_camera(camera)
    out_dir.mkdir(parents=True, exist_ok=True)
    passwords = {u: plan.passwords.get(u) or secrets.token_urlsafe(18) for u in users(plan)}
    passwd = out_dir / "passwd"
    acl = out_dir / "acl"
    conf = out_dir / "mosquitto.conf"
    credentials = out_dir / "credentials.json"

    _write_private(passwd, "".join(f"{u}:{hash_password(p)}\n" for u, p in passwords.items()))
    acl.write_text(acl_text(plan), encoding="utf-8")
    conf.write_text(conf_text(plan, passwd, acl), encoding="utf-8")
    _write_private(credentials, json.dumps(passwords, indent=2) + "\n")
    return BrokerFiles(conf, passwd, acl, credentials, passwords)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _split_cameras(values: Iterable[str]) -> tuple[str, ...]:
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return tuple(dict.fromkeys(names))


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="maskmesh broker",
        description="Write a district's mosquitto.conf, password file, ACL and credentials.",
    )
    parser.add_argument("--district", required=True)
    parser.add_argument("--camera", action="append", default=[], help="camera name(s), repeatable")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--auditor", action="store_true", help="add a read-only auditor user")
    parser.add_argument("--run-as", help="user the broker runs as (when started as root)")
    parser.add_argument("--tls-port", type=int)
    parser.add_argument("--tls-ca", type=Path)
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    args = parser.parse_args(argv)

    cameras = _split_cameras(args.camera)
    if not cameras:
        parser.error("give at least one --camera")
    tls = None
    if args.tls_port is not None:
        if not (args.tls_ca and args.tls_cert and args.tls_key):
            parser.error("--tls-port needs --tls-ca, --tls-cert and --tls-key")
        tls = TLSListener(args.tls_port, args.tls_ca, args.tls_cert, args.tls_key)
    try:
        plan = BrokerPlan(
            district=check_identifier(args.district, "district"),
            cameras=cameras,
            port=args.port,
            bind=args.bind,
            data_dir=args.data_dir,
            tls=tls,
            auditor=args.auditor,
            run_as=args.run_as,
        )
        files = render(plan, args.out)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {files.conf}, {files.passwd}, {files.acl} and {files.credentials} (0600)")
    return 0
