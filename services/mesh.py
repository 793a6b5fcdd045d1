"""``maskmesh up``: the whole mesh on one machine, with no other set-up.

It generates a district broker configuration with the same code that writes ``broker/``
(users, passwords, ACLs), starts Mosquitto on a free loopback port, a local SMTP server
that stores each alert as a ``.eml`` file, then the inference worker(s), the notifier
and one capture node, each as its own process with its own broker user. With no
``--source`` the capture node plays bundled sample scenes made from a public-domain
photo. A finite source ends the run once every face has its verdict and every
violation has been handled by the notifier; the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
import yaml

from maskmesh import topics
from maskmesh.brokerconf import BrokerFiles, BrokerPlan, capture_user, render
from maskmesh.bus import Bus
from maskmesh.ids import InvalidIdentifier, check_camera, check_identifier
from maskmesh.logs import configure_logging
from maskmesh.messages import MessageError, ServiceStatus, decode
from maskmesh.settings import BrokerSettings, ServiceSettings
from services.inference.settings import MODEL_ENV, default_model_path

logger = logging.getLogger("maskmesh.up")

class UpError(RuntimeError):
    """The mesh could not be started; the message says what is missing."""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UpError(f"mosquitto exited with status {process.returncode} at start")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise UpError(f"mosquitto did not listen on 127.0.0.1:{port} within {timeout_s} s")


@dataclass
class Tally:
    """The latest status counters of every service instance, and dead letters seen."""

    statuses: dict[tuple[str, str], ServiceStatus] = field(default_factory=dict)
    dead_letters: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_status(self, msg: mqtt.MQTTMessage) -> None:
        try:
            status = decode(ServiceStatus, msg.payload)
        except MessageError:
            return
        with self.lock:
            key = (status.service, status.instance)
            current = self.statuses.get(key)
            if current is None or status.updated_at >= current.updated_at:
                self.statuses[key] = status
            else:
                return
        # A camera that sends no frames (a dead stream, no webcam) would otherwise only
        # show in the capture log, which a temporary run folder takes with it.
        was = current.state if current is not None else None
        if status.state == "stalled" and was != "stalled":
            logger.warning("%s %s stalled: %s", status.service, status.instance,
                           status.detail or "no detail")
        elif was == "stalled" and status.state == "online":
            logger.info("%s %s sends frames again", status.service, status.instance)

    def on_dead_letter(self, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.dead_letters += 1

    def total(self, service: str, counter: str) -> int:
        with self.lock:
            return sum(
                status.counters.get(counter, 0)
                for (name, _), status in self.statuses.items()
                if name == service
            )

    def online(self, service: str) -> int:
        with self.lock:
            return sum(
                1
                for (name, _), status in self.statuses.items()
                if name == service and status.state == "online"
            )

    def summary(self) -> dict[str, int]:
        return {
            "frames": self.total("capture", "frames"),
            "faces": self.total("capture", "faces"),
            "verdicts": self.total("inference", "verdicts"),
            "violations": self.total("inference", "violations"),
            "mails": self.total("notifier", "mails_sent"),
            "dead_letters": self.dead_letters,
        }

    def drained(self) -> bool:
        """Every published face has a verdict (or a dead letter), every violation is handled."""
        faces = self.total("capture", "faces")
        # A redelivered face is answered again; its second verdict answers no other face.
        # Limitation: a worker counts only the repeats it noticed (see its Limitation).
        answered = (
            self.total("inference", "verdicts")
            - self.total("inference", "duplicates")
            + self.total("inference", "dead_letters")
        )
        violations = self.total("inference", "violations")
        received = self.total("notifier", "violations_received")
        return (
            answered >= faces
            and self.total("inference", "pending") == 0
            and received >= violations
            and self.total("notifier", "outbox_pending") == 0
        )


@dataclass
class Mesh:
    """The processes of one local district; ``close`` stops them in a safe order."""

    run_dir: Path
    mail_dir: Path
    district: str
    camera: str
    log_format: str = "text"
    keep: bool = True  # the run folder outlives the run (--run-dir)
    broker_files: BrokerFiles | None = None
    broker_port: int = 0
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    sink: Any = None
    monitor: Bus | None = None
    tally: Tally = field(default_factory=Tally)

    @property
    def spool_file(self) -> Path:
        """The capture node's spool (``capture.spool_dir`` is ``run_dir/spool``)."""
        return self.run_dir / "spool" / f"{self.camera}.sqlite3"

    def broker_settings(self, user: str) -> dict[str, Any]:
        assert self.broker_files is not None
        secret = self.run_dir / "secrets" / user
        secret.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self.broker_files.passwords[user] + "\n")
        return {
            "host": "127.0.0.1",
            "port": self.broker_port,
            "username": user,
            "password_file": str(secret),
            "reconnect_min_delay_s": 0.5,
            "reconnect_max_delay_s": 5.0,
        }

    def write_config(self, name: str, user: str, section: dict[str, Any]) -> Path:
        config = {
            "district": self.district,
            "broker": self.broker_settings(user),
            "status_interval_s": 1.0,
            "log_format": self.log_format,
            **section,
        }
        path = self.run_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    def start_broker(self) -> None:
        mosquitto = shutil.which("mosquitto")
        if mosquitto is None:
            raise UpError(
                "mosquitto is not installed: run scripts/setup, or `apt-get install mosquitto`"
            )
        self.broker_port = _free_port()
        plan = BrokerPlan(
            district=self.district,
            cameras=(self.camera,),
            port=self.broker_port,
            data_dir=self.run_dir / "broker",
            log_file=self.run_dir / "logs" / "mosquitto.log",
            run_as=getpass.getuser(),
        )
        self.broker_files = render(plan, self.run_dir / "broker")
        # A kept run directory must not bring back the last run's retained statuses.
        (self.run_dir / "broker" / "mosquitto.db").unlink(missing_ok=True)
        process = subprocess.Popen(
            [mosquitto, "-c", str(self.broker_files.conf)],
            stdout=subprocess.DEVNULL,
            stderr=(self.run_dir / "logs" / "mosquitto.stderr").open("wb"),
            start_new_session=True,  # see spawn
        )
        self.processes["broker"] = process
        _wait_for_port(self.broker_port, process, timeout_s=10)
        logger.info("broker listening on 127.0.0.1:%s", self.broker_port)

    def start_monitor(self) -> None:
        operator = self.broker_settings("operator")
        # The same read-only view, for `maskmesh status --config RUN/operator.yaml`.
        view = {"district": self.district, "broker": operator, "status_interval_s": 1.0}
        (self.run_dir / "operator.yaml").write_text(
            yaml.safe_dump(view, sort_keys=False), encoding="utf-8"
        )
        settings = ServiceSettings(
            district=self.district,
            instance="up",
            broker=BrokerSettings(**operator),
        )
        self.monitor = Bus(settings, "up", announce=False)
        self.monitor.subscribe(topics.all_status(self.district), self.tally.on_status)
        self.monitor.subscribe(topics.deadletter(self.district), self.tally.on_dead_letter)
        if not self.monitor.start(wait_s=10):
            raise UpError("the monitor could not connect to the local broker")

    def start_sink(self) -> int:
        from services.notifier.mailsink import MailSink

        port = _free_port()
        self.sink = MailSink(self.mail_dir, host="127.0.0.1", port=port)
        self.sink.start()
        logger.info("alert mail is stored under %s", self.mail_dir)
        return port

    def spawn(self, name: str, argv: list[str]) -> None:
        log = (self.run_dir / "logs" / f"{name}.log").open("wb")
        command = [sys.executable, "-m", "maskmesh.cli", *argv]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Settings come from each service's YAML file alone, not from this shell.
        env = {k: v for k, v in env.items() if not k.startswith("MASKMESH_")}
        # Out of the terminal's process group: a Ctrl-C reaches up alone, which stops
        # capture first and the broker last. Signalled together, the broker went at
        # once and the last faces and final statuses had nowhere to go.
        self.processes[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.run_dir,
            start_new_session=True,
        )

    def failed(self) -> str | None:
        """The name of a service that exited with an error, if any, and its last words."""
        for name, process in self.processes.items():
            code = process.poll()
            if code not in (None, 0):
                # A temporary run folder, logs included, is gone once up ends.
                why = _last_error(self.run_dir / "logs" / f"{name}.log")
                where = f" (log: {self.run_dir / 'logs'})" if self.keep else ""
                return f"{name} exited with status {code}{why}{where}"
        return None

    def close(self) -> None:
        # Capture first (it flushes its spool), then inference, notifier, broker last.
        order = [n for n in self.processes if n.startswith("capture")]
        order += [n for n in self.processes if n.startswith("inference")]
        order += [n for n in self.processes if n == "notifier"]
        for name in order:
            _terminate(self.processes[name])
        if self.monitor is not None:
            self.monitor.stop()
        if "broker" in self.processes:
            _terminate(self.processes["broker"])
        if self.sink is not None:
            self.sink.stop()


def _last_error(log: Path) -> str:
    """``": <line>"`` for the last ERROR (else last) line of a service log, or ``""``."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()[-50:]
    except OSError:
        return ""
    lines = [line.strip() for line in lines if line.strip()]
    if not lines:
        return ""
    errors = [line for line in lines if " ERROR " in line or '"level": "ERROR"' in line]
    return f": {(errors or lines)[-1][:500]}"


def _terminate(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="maskmesh up",
        description="Run the whole mesh locally: broker, capture, inference, notifier, mail.",
    )
    parser.add_argument("--source", help="folder of images, video file, stream URL or webcam")
    parser.add_argument("--mail-dir", type=Path, default=Path("mail"), help="where .eml go")
    parser.add_argument("--model", type=Path, default=default_model_path(),
                        help=f"ONNX classifier (default ${MODEL_ENV}, else the shipped "
                             "EfficientNet-Lite0)")
    parser.add_argument("--district", default="demo")
    parser.add_argument("--camera", default="cam1")
    parser.add_argument("--place", default="Sample street", help="camera location text")
    parser.add_argument("--workers", type=int, default=1, help="inference workers")
    parser.add_argument("--max-fps", type=float, help="frame-rate cap of the capture node")
    parser.add_argument("--detector", choices=["res10", "yunet"], help="face detector")
    parser.add_argument("--detector-model", type=Path, help="detector model file (yunet)")
    parser.add_argument("--recipient", action="append", help="alert recipient (repeatable)")
    parser.add_argument("--run-dir", type=Path, help="keep configs and logs here")
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="services' log format"
    )
    parser.add_argument(
        "--digest-interval-s",
        type=float,
        default=3.0,
        help="send alerts held by the cool-down as a digest after this long",
    )
    parser.add_argument(
        "--drain-timeout-s",
        type=float,
        default=120.0,
        help="after a finite source ends, wait at most this long for verdicts and mail",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        check_identifier(args.district, "district")
        check_camera(args.camera)
    except InvalidIdentifier as exc:
        parser.error(str(exc))
    if not args.model.exists():
        parser.error(f"model file {args.model} does not exist")
    if not args.model.is_file():
        parser.error(f"model file {args.model} is not a file")
    args.model_id = _model_id(parser, args.model)
    return args


def _model_id(parser: argparse.ArgumentParser, path: Path) -> str:
    """The classifier's model id, read as a worker reads it; a bad file stops the run here.

    The summary names it, so a run with ``--model`` shows which model gave its verdicts.
    """
    from services.inference.classifier import MaskClassifier, ModelLoadError

    try:
        return MaskClassifier(path, intra_op_threads=1).model_id
    except ModelLoadError as exc:
        parser.error(str(exc))
        raise  # parser.error exits; this keeps type checkers informed


def _start_services(
    mesh: Mesh, args: argparse.Namespace, smtp_port: int, stop: threading.Event
) -> None:
    model = str(args.model.resolve())
    for n in range(1, args.workers + 1):
        config = mesh.write_config(
            f"inference-{n}",
            "inference",
            {"instance": f"worker{n}", "inference": {"model_path": model, "worker_id": f"w{n}"}},
        )
        mesh.spawn(f"inference-{n}", ["inference", "--config", str(config)])

    notifier: dict[str, Any] = {
        "smtp": {"host": "127.0.0.1", "port": smtp_port},
        "outbox_path": str(mesh.run_dir / "outbox.sqlite3"),
        # Alerts held back by the camera cool-down go out as a digest; a local run
        # ends within seconds, so its digest must not wait the production 15 minutes.
        "digest_interval_s": args.digest_interval_s,
    }
    if args.recipient:
        notifier["recipients"] = args.recipient
    config = mesh.write_config("notifier", "notifier", {"instance": "n1", "notifier": notifier})
    mesh.spawn("notifier", ["notifier", "--config", str(config)])
    _wait_online(mesh, {"inference": args.workers, "notifier": 1}, 60.0, stop)
    if stop.is_set():
        return

    capture: dict[str, Any] = {
        "camera": args.camera,
        "place": args.place,
        "spool_dir": str(mesh.spool_file.parent),
        # The spool waits for the broker as long as this run waits for the results.
        "drain_timeout_s": args.drain_timeout_s,
    }
    if args.source is not None:
        capture["source"] = args.source if "://" in args.source or args.source.isdigit() \
            else str(Path(args.source).resolve())
    else:
        from services.capture.sample import write_sample_images

        sample = mesh.run_dir / "sample"
        write_sample_images(sample)
        capture["source"] = str(sample)
    for key in ("max_fps", "detector"):
        if getattr(args, key) is not None:
            capture[key] = getattr(args, key)
    if args.detector_model is not None:
        capture["detector_model"] = str(args.detector_model.resolve())
    config = mesh.write_config(
        "capture", capture_user(args.camera), {"instance": args.camera, "capture": capture}
    )
    mesh.spawn("capture", ["capture", "--config", str(config)])


def _wait_online(
    mesh: Mesh, wanted: dict[str, int], timeout_s: float, stop: threading.Event
) -> None:
    """Wait until the consumers are subscribed, so the first faces are not dropped.

    A service announces itself online right after sending its SUBSCRIBE on the same
    connection, and the broker handles one client's packets in order: once the status
    is seen, the subscription stands. Faces published to a shared subscription that no
    session holds yet are dropped by the broker, hence this wait before capture starts.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        problem = mesh.failed()
        if problem is not None:
            raise UpError(problem)
        if all(mesh.tally.online(service) >= count for service, count in wanted.items()):
            return
        stop.wait(0.1)
    if stop.is_set():
        return
    raise UpError(f"services did not come online within {timeout_s} s: wanted {wanted}")


def _unsent_faces(mesh: Mesh) -> int:
    """Faces still in the capture node's spool file once it has exited."""
    if not mesh.spool_file.is_file():
        return 0
    try:
        with closing(sqlite3.connect(f"{mesh.spool_file.as_uri()}?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT COUNT(*) FROM faces").fetchone()[0])
    except sqlite3.Error as exc:
        logger.warning("cannot read the capture spool %s: %s", mesh.spool_file, exc)
        return 0


def _wait(mesh: Mesh, drain_timeout_s: float, stop: threading.Event) -> bool:
    """Block until the finite source is done and drained; False on timeout or failure."""
    capture = mesh.processes["capture"]
    while not stop.is_set():
        problem = mesh.failed()
        if problem is not None:
            logger.error("%s", problem)
            return False
        if capture.poll() == 0:
            break
        stop.wait(0.5)
    if stop.is_set():
        return True
    logger.info("the source is done; waiting for the last verdicts and mail")
    # The counters know only faces that reached the broker; a broker away longer than
    # capture's drain leaves the rest in the spool, which a temporary run folder loses.
    unsent = _unsent_faces(mesh)
    if unsent:
        logger.error(
            "%d faces were never sent: the broker did not take them before capture "
            "stopped; they stay in %s", unsent, mesh.spool_file,
        )
    deadline = time.monotonic() + drain_timeout_s
    steady_since: float | None = None
    while time.monotonic() < deadline and not stop.is_set():
        problem = mesh.failed()
        if problem is not None:
            logger.error("%s", problem)
            return False
        if mesh.tally.drained():
            # Statuses refresh every second; two quiet seconds mean nothing is in flight.
            steady_since = steady_since or time.monotonic()
            if time.monotonic() - steady_since >= 2.5:
                return not unsent
        else:
            steady_since = None
        stop.wait(0.25)
    logger.error("not everything was processed within %s s", drain_timeout_s)
    return stop.is_set()


def up_main(argv: Sequence[str]) -> int:
    args = _parse(argv)
    configure_logging("INFO")
    # aiosmtpd logs every SMTP command at INFO; the sink's own line per mail is enough.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    keep = args.run_dir is not None
    mail_dir = args.mail_dir.resolve()
    for option, folder in (("--run-dir", args.run_dir), ("--mail-dir", mail_dir)):
        try:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                if not os.access(folder, os.W_OK | os.X_OK):
                    raise PermissionError(f"{folder} is not writable")
        except OSError as exc:
            print(f"maskmesh up: {option} {folder} cannot be used as a folder: {exc}",
                  file=sys.stderr)
            return 2
    run_dir = (args.run_dir or Path(tempfile.mkdtemp(prefix="maskmesh-up-"))).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    mesh = Mesh(run_dir, mail_dir, args.district, args.camera, args.log_format, keep)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("stopping the mesh")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # A closed terminal or dropped ssh link hangs up the whole job: Python would die at
    # once and leave Mosquitto (which takes SIGHUP as "reload") running, and the run
    # folder with its passwords behind.
    signal.signal(signal.SIGHUP, on_signal)
    # Limitation: a SIGKILL of this process leaves its children running; they are
    # stopped only by the signals above.

    ok = False
    try:
        mesh.start_broker()
        mesh.start_monitor()
        if keep:
            logger.info(
                "watch it live: maskmesh status --config %s --watch 2", run_dir / "operator.yaml"
            )
        smtp_port = mesh.start_sink()
        _start_services(mesh, args, smtp_port, stop)
        ok = _wait(mesh, args.drain_timeout_s, stop)
    except UpError as exc:
        logger.error("%s", exc)
    finally:
        mesh.close()
        # The final statuses arrive as the services stop; the monitor has them by now.
        summary = {**mesh.tally.summary(), "model": args.model_id}
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            logger.info("configs and logs kept under %s", run_dir)
    print(json.dumps(summary), flush=True)
    return 0 if ok else 1
