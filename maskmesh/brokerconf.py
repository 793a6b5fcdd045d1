"""Mosquitto configuration for one district: listener, password file and ACLs.

The ACL is generated from the district's camera list, one user per service role:

- ``capture-{camera}``: publish that camera's faces and its own status, nothing else;
- ``inference``: read every camera's faces, publish verdicts, violations, its status;
- ``notifier``: read violations, publish its status;
- ``integrator``: read verdicts and status; never faces or violations (they hold photos);
- ``operator``: read status and dead letters (``maskmesh status``, ``maskmesh up``);
- ``auditor`` (only when asked): read everything in the district, publish nothing;
- ``homeassistant`` (only when asked): read verdicts and status, publish Home Assistant
  discovery configs under its prefix (``maskmesh homeassistant``), and its own status.

Every role may publish to the dead-letter topic. ``maskmesh broker`` writes the files;
``render`` is the same thing as a function for tests and ``maskmesh up``.

A district may bridge to a city broker (``Bridge``): MQTT 5 over TLS, out only, and only
the district's violations and status; faces and verdicts never leave the district.
``render_city`` writes the city broker's side: a TLS-only listener and one
``bridge-{district}`` user per district that may write only its own district's topics.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from maskmesh import topics
from maskmesh.ids import check_camera, check_identifier
from maskmesh.settings import SettingsError, read_secret

ROLES = ("inference", "notifier", "integrator", "operator")
HOMEASSISTANT_USER = "homeassistant"
_PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes for sha512-pbkdf2
# The broker's password file as a secret, next to the broker-{user} password files.
PASSWD_SECRET = "mosquitto-passwd"


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
class Bridge:
    """An MQTT 5 bridge from a district broker to the city broker, over TLS.

    host: the city broker's name as its certificate states it (verified, never skipped).
    ca_file: the CA that signed the city broker's certificate.
    port: the city broker's TLS port.
    cert_file, key_file: a client certificate, for a city broker that asks for one.
    username: the district's user on the city broker; defaults to ``bridge-{district}``.
    password: that user's password; it has to stand in mosquitto.conf, so ``render``
        then writes mosquitto.conf with mode 0600.
    name: the connection's name in mosquitto.conf and its log lines.
    """

    host: str
    ca_file: Path
    port: int = 8883
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    name: str = "city"


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
    homeassistant_prefix: add the ``homeassistant`` user, which writes Home Assistant's
        MQTT discovery topics under this prefix (usually "homeassistant"); None: no user.
    passwords: user -> password; missing ones are generated.
    bridge: an optional bridge that forwards violations and status to the city broker.
    """

    district: str
    cameras: tuple[str, ...]
    port: int = 1883
    bind: str = "127.0.0.1"
    data_dir: Path | None = None
    log_file: Path | None = None
    tls: TLSListener | None = None
    auditor: bool = False
    homeassistant_prefix: str | None = None
    passwords: dict[str, str] = field(default_factory=dict)
    max_packet_bytes: int = 8 * 1024 * 1024
    max_queued_messages: int = 100000
    # Mosquitto started as root drops to the "mosquitto" user unless told otherwise; a
    # local run names the current user so the broker can read its 0600 password file.
    run_as: str | None = None
    bridge: Bridge | None = None


@dataclass(frozen=True)
class CityPlan:
    """The city broker that district bridges deliver to.

    districts: the districts whose bridges it accepts; each gets a ``bridge-{district}``
        user that may write only that district's violations and status.
    tls: its only listener; the city broker has no plain listener at all.
    auditor: add a ``auditor`` user that reads everything the city receives.
    The other fields mean what they mean in BrokerPlan.
    """

    districts: tuple[str, ...]
    tls: TLSListener
    data_dir: Path | None = None
    log_file: Path | None = None
    auditor: bool = True
    passwords: dict[str, str] = field(default_factory=dict)
    max_packet_bytes: int = 8 * 1024 * 1024
    max_queued_messages: int = 100000
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


def bridge_user(district: str) -> str:
    """The user a district's bridge logs in as on the city broker."""
    return f"bridge-{check_identifier(district, 'district')}"


def bridged_topics(district: str) -> tuple[str, ...]:
    """What a district forwards to the city: violations and status, nothing else."""
    return (topics.all_violations(district), topics.all_status(district))


def users(plan: BrokerPlan) -> list[str]:
    names = [capture_user(camera) for camera in plan.cameras] + list(ROLES)
    if plan.auditor:
        names.append("auditor")
    if plan.homeassistant_prefix is not None:
        names.append(HOMEASSISTANT_USER)
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
    if plan.homeassistant_prefix is not None:
        prefix = check_identifier(plan.homeassistant_prefix, "Home Assistant discovery prefix")
        blocks.append(
            (
                HOMEASSISTANT_USER,
                [
                    # Verdicts and status only: faces and violations carry photos.
                    f"topic read {topics.all_verdicts(d)}",
                    f"topic read {root}/status/#",
                    f"topic write {root}/status/{HOMEASSISTANT_USER}/+",
                    f"topic readwrite {prefix}/#",
                    f"topic write {dead}",
                ],
            )
        )
    lines = ["# Generated by `maskmesh broker`; regenerate rather than edit.", ""]
    for user, rules in blocks:
        lines.append(f"user {user}")
        lines += rules
        lines.append("")
    return "\n".join(lines)


def _general_lines(plan: BrokerPlan | CityPlan, passwd: Path, acl: Path) -> list[str]:
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
        # Limitation: Mosquitto writes its queues to disk only every autosave_interval and
        # at a clean stop; a broker killed outright loses what it queued since the last
        # save (a SIGTERM restart, as in tests/faults/, loses nothing).
        "autosave_interval 30",
    ]
    if plan.run_as is not None:
        lines.append(f"user {plan.run_as}")
    if plan.data_dir is not None:
        lines.append(f"persistence_location {plan.data_dir}/")
    if plan.log_file is not None:
        lines.append(f"log_dest file {plan.log_file}")
    lines += ["log_type error", "log_type warning", "log_type notice", "log_type information"]
    return lines


def _tls_lines(tls: TLSListener) -> list[str]:
    return [
        "",
        f"listener {tls.port} {tls.bind}",
        "protocol mqtt",
        f"cafile {tls.ca_file}",
        f"certfile {tls.cert_file}",
        f"keyfile {tls.key_file}",
        # Mosquitto 2.0 reads this as the lowest version it accepts.
        "tls_version tlsv1.2",
        f"require_certificate {'true' if tls.require_client_cert else 'false'}",
    ]


def bridge_text(district: str, bridge: Bridge) -> str:
    """The ``connection`` section that bridges a district to the city broker."""
    d = check_identifier(district, "district")
    user = bridge.username or bridge_user(d)
    lines = [
        f"connection {check_identifier(bridge.name, 'bridge name')}-{d}",
        f"address {bridge.host}:{bridge.port}",
        "bridge_protocol_version mqttv50",
        f"remote_clientid {user}",
        f"local_clientid {user}-local",
        f"remote_username {user}",
    ]
    if bridge.password is not None:
        # Limitation: Mosquitto 2.0 takes the bridge password only inline, so it stands in
        # mosquitto.conf (written 0600); a client certificate avoids it altogether.
        lines.append(f"remote_password {bridge.password}")
    lines += [
        # A persistent session on both sides: violations queued while the city link is
        # down are delivered when it is back (up to max_queued_messages).
        "cleansession false",
        "local_cleansession false",
        # Connection notices would land on a status topic as a bare "0"/"1", which is not
        # a ServiceStatus; the bridge state shows in the broker log instead.
        "notifications false",
        "try_private false",
        "restart_timeout 2 30",
        f"bridge_cafile {bridge.ca_file}",
        "bridge_insecure false",
        "bridge_tls_version tlsv1.2",
    ]
    if bridge.cert_file is not None and bridge.key_file is not None:
        lines += [f"bridge_certfile {bridge.cert_file}", f"bridge_keyfile {bridge.key_file}"]
    # Out only: nothing the city publishes flows back into the district.
    lines += [f"topic {pattern} out 1" for pattern in bridged_topics(d)]
    return "\n".join(lines) + "\n"


def conf_text(plan: BrokerPlan, passwd: Path, acl: Path) -> str:
    """mosquitto.conf for the plan, pointing at the given password and ACL files."""
    lines = _general_lines(plan, passwd, acl)
    lines += ["", f"listener {plan.port} {plan.bind}", "protocol mqtt"]
    if plan.tls is not None:
        lines += _tls_lines(plan.tls)
    text = "\n".join(lines) + "\n"
    if plan.bridge is not None:
        text += "\n" + bridge_text(plan.district, plan.bridge)
    return text


def city_users(plan: CityPlan) -> list[str]:
    names = [bridge_user(district) for district in plan.districts]
    if plan.auditor:
        names.append("auditor")
    return names


def city_acl_text(plan: CityPlan) -> str:
    """The city ACL: each bridge writes only its own district's violations and status."""
    lines = ["# Generated by `maskmesh broker --city`; regenerate rather than edit.", ""]
    for district in plan.districts:
        lines.append(f"user {bridge_user(district)}")
        lines += [f"topic write {pattern}" for pattern in bridged_topics(district)]
        lines.append("")
    if plan.auditor:
        lines += ["user auditor", f"topic read {topics.ROOT}/#", ""]
    return "\n".join(lines)


def city_conf_text(plan: CityPlan, passwd: Path, acl: Path) -> str:
    """mosquitto.conf for the city broker: TLS listener only."""
    return "\n".join(_general_lines(plan, passwd, acl) + _tls_lines(plan.tls)) + "\n"


def render(
    plan: BrokerPlan,
    out_dir: Path,
    passwd_path: Path | None = None,
    acl_path: Path | None = None,
) -> BrokerFiles:
    """Write mosquitto.conf, passwd, acl and credentials.json (mode 0600) to out_dir.

    passwd_path, acl_path: where the broker will find those files, when that is not
        out_dir (inside a container, or a password file handed over as a secret).
    """
    for camera in plan.cameras:
        check_camera(camera)
    passwords = {u: plan.passwords.get(u) or secrets.token_urlsafe(18) for u in users(plan)}
    return _write_files(
        out_dir,
        passwords,
        acl_text(plan),
        lambda passwd, acl: conf_text(plan, passwd_path or passwd, acl_path or acl),
        # The bridge password stands in mosquitto.conf.
        private_conf=plan.bridge is not None and plan.bridge.password is not None,
    )


def render_city(
    plan: CityPlan,
    out_dir: Path,
    passwd_path: Path | None = None,
    acl_path: Path | None = None,
) -> BrokerFiles:
    """Write the city broker's mosquitto.conf, passwd, acl and credentials.json."""
    passwords = {u: plan.passwords.get(u) or secrets.token_urlsafe(18) for u in city_users(plan)}
    return _write_files(
        out_dir,
        passwords,
        city_acl_text(plan),
        lambda passwd, acl: city_conf_text(plan, passwd_path or passwd, acl_path or acl),
        private_conf=False,
    )


def _write_files(
    out_dir: Path,
    passwords: dict[str, str],
    acl_body: str,
    conf_body: Callable[[Path, Path], str],
    private_conf: bool,
) -> BrokerFiles:
    out_dir.mkdir(parents=True, exist_ok=True)
    passwd = out_dir / "passwd"
    acl = out_dir / "acl"
    conf = out_dir / "mosquitto.conf"
    credentials = out_dir / "credentials.json"

    _write_private(passwd, "".join(f"{u}:{hash_password(p)}\n" for u, p in passwords.items()))
    acl.write_text(acl_body, encoding="utf-8")
    if private_conf:
        _write_private(conf, conf_body(passwd, acl))
    else:
        conf.write_text(conf_body(passwd, acl), encoding="utf-8")
    _write_private(credentials, json.dumps(passwords, indent=2) + "\n")
    return BrokerFiles(conf, passwd, acl, credentials, passwords)


def write_secrets(passwords: dict[str, str], secrets_dir: Path) -> list[Path]:
    """One ``broker-{user}`` file per user holding its password, for compose/k8s secrets.

    The folder is made 0700 and the files inside 0644: containers run as their own
    non-root user and must read a bind-mounted secret, while the folder keeps every
    other user of the host out.
    """
    secrets_dir.mkdir(parents=True, exist_ok=True)
    secrets_dir.chmod(0o700)
    written = []
    for user, password in passwords.items():
        path = secrets_dir / f"broker-{user}"
        path.write_text(password + "\n", encoding="utf-8")
        path.chmod(0o644)
        written.append(path)
    return written


def read_secrets(secrets_dir: Path) -> dict[str, str]:
    """Passwords already in a secrets folder, so that regenerating keeps them."""
    found: dict[str, str] = {}
    if not secrets_dir.is_dir():
        return found
    for path in sorted(secrets_dir.glob("broker-*")):
        lines = path.read_text(encoding="utf-8").splitlines()
        if lines and lines[0]:
            found[path.name.removeprefix("broker-")] = lines[0]
    return found


def read_credentials(path: Path) -> dict[str, str]:
    """Passwords of an earlier run's credentials.json; empty when there is none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {u: p for u, p in data.items() if isinstance(u, str) and isinstance(p, str) and p}


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _split_cameras(values: Iterable[str]) -> tuple[str, ...]:
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return tuple(dict.fromkeys(names))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskmesh broker",
        description="Write a district's mosquitto.conf, password file, ACL and credentials "
        "(or, with --city, the city broker's that district bridges deliver to).",
    )
    parser.add_argument(
        "--district", action="append", required=True, help="district name (with --city: repeatable)"
    )
    parser.add_argument("--camera", action="append", default=[], help="camera name(s), repeatable")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--log-file", type=Path, help="log to this file instead of stderr")
    parser.add_argument("--auditor", action="store_true", help="add a read-only auditor user")
    parser.add_argument(
        "--homeassistant", nargs="?", const="homeassistant", metavar="PREFIX",
        help="add the homeassistant user (Home Assistant MQTT discovery under PREFIX)",
    )
    parser.add_argument("--run-as", help="user the broker runs as (when started as root)")
    parser.add_argument("--tls-port", type=int)
    parser.add_argument("--tls-bind", default="0.0.0.0")
    parser.add_argument("--tls-ca", type=Path)
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument(
        "--tls-require-client-cert", action="store_true", help="TLS clients need a certificate"
    )
    parser.add_argument(
        "--passwd-path", type=Path, help="where the broker finds passwd (default: in --out)"
    )
    parser.add_argument(
        "--acl-path", type=Path, help="where the broker finds acl (default: in --out)"
    )
    parser.add_argument(
        "--secrets-dir",
        type=Path,
        help="also write one broker-USER password file per user here (kept when re-run)",
    )
    parser.add_argument("--city", action="store_true", help="generate the city broker instead")
    bridge = parser.add_argument_group("bridge to the city broker (district only)")
    bridge.add_argument("--bridge-host", help="city broker host, as its certificate names it")
    bridge.add_argument("--bridge-port", type=int, default=8883)
    bridge.add_argument("--bridge-ca", type=Path, help="CA of the city broker's certificate")
    bridge.add_argument("--bridge-cert", type=Path)
    bridge.add_argument("--bridge-key", type=Path)
    bridge.add_argument("--bridge-username", help="default: bridge-DISTRICT")
    bridge.add_argument("--bridge-password-file", type=Path)
    return parser


def _tls_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TLSListener | None:
    if args.tls_port is None:
        return None
    if not (args.tls_ca and args.tls_cert and args.tls_key):
        parser.error("--tls-port needs --tls-ca, --tls-cert and --tls-key")
    return TLSListener(
        args.tls_port,
        args.tls_ca,
        args.tls_cert,
        args.tls_key,
        bind=args.tls_bind,
        require_client_cert=args.tls_require_client_cert,
    )


def _bridge_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Bridge | None:
    if args.bridge_host is None:
        return None
    if args.bridge_ca is None:
        parser.error("--bridge-host needs --bridge-ca (the bridge always verifies the city)")
    try:
        password = read_secret(None, args.bridge_password_file, "--bridge-password-file")
    except SettingsError as exc:
        parser.error(str(exc))
    return Bridge(
        host=args.bridge_host,
        ca_file=args.bridge_ca,
        port=args.bridge_port,
        cert_file=args.bridge_cert,
        key_file=args.bridge_key,
        username=args.bridge_username,
        password=password,
    )


def main(argv: Sequence[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    tls = _tls_from_args(parser, args)
    # Regenerating (a camera added) must not lock out the services already running:
    # the passwords of an earlier run stay. With a secrets folder it alone decides (a
    # file deleted there rotates that password); without one, credentials.json does.
    if args.secrets_dir:
        passwords = read_secrets(args.secrets_dir)
    else:
        passwords = read_credentials(args.out / "credentials.json")
    try:
        districts = tuple(check_identifier(d, "district") for d in _split_cameras(args.district))
        if args.city:
            if tls is None:
                parser.error("--city needs --tls-port and its files (the city is TLS only)")
            city = CityPlan(
                districts=districts,
                tls=tls,
                data_dir=args.data_dir,
                log_file=args.log_file,
                auditor=True,
                passwords=passwords,
                run_as=args.run_as,
            )
            files = render_city(city, args.out, args.passwd_path, args.acl_path)
        else:
            cameras = _split_cameras(args.camera)
            if not cameras:
                parser.error("give at least one --camera")
            if len(districts) != 1:
                parser.error("give exactly one --district (several only with --city)")
            plan = BrokerPlan(
                district=districts[0],
                cameras=cameras,
                port=args.port,
                bind=args.bind,
                data_dir=args.data_dir,
                log_file=args.log_file,
                tls=tls,
                auditor=args.auditor,
                homeassistant_prefix=args.homeassistant,
                passwords=passwords,
                run_as=args.run_as,
                bridge=_bridge_from_args(parser, args),
            )
            files = render(plan, args.out, args.passwd_path, args.acl_path)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {files.conf}, {files.passwd}, {files.acl} and {files.credentials} (0600)")
    if args.secrets_dir is not None:
        written = write_secrets(files.passwords, args.secrets_dir)
        # The broker reads its password file after dropping root, so a container's
        # mosquitto user needs the same readable copy as the services' secrets.
        hashes = args.secrets_dir / PASSWD_SECRET
        hashes.write_text(files.passwd.read_text(encoding="utf-8"), encoding="utf-8")
        hashes.chmod(0o644)
        print(f"wrote {len(written)} password files and {hashes.name} to {args.secrets_dir}")
    return 0
