"""The fault-injection run: faces in while the district is knocked about; then count.

``python -m tests.faults.run_suite --faces 40`` starts a broker, a mail sink, two
inference workers with the shipped model and the notifier, sends that many real face
crops (both classes of the chandrikadeb7 set) as camera ``cam1``, and meanwhile

1. restarts the broker (down for a few seconds),
2. SIGKILLs inference worker w1 and starts it again with the same worker id,
3. stops the mail server,
4. SIGKILLs the notifier and starts it again (the mail server still down),
5. starts the mail server again.

Then it waits for the district to drain and counts, from an auditor subscriber and
the ``.eml`` files, whether every face got a verdict and every violation exactly one
mail. The counts are printed as one JSON object; the exit status is 0 when nothing was
lost or duplicated. ``MASKMESH_FAULT_FACES`` sets the size when ``--faces`` is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from maskmesh.settings import REPO_ROOT
from tests.faults.stack import (
    MODEL,
    Auditor,
    FacePublisher,
    Stack,
    dataset_crops,
    face_message,
    read_mailbox,
    wait_until,
)

DEFAULT_FACES = 40
MAIL_DOWN_S = 5.0
SHARED = Path(os.environ.get("MASKMESH_SHARED", REPO_ROOT.parent / "shared"))


def _outbox_counts(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT state, mode, COUNT(*) FROM alerts GROUP BY state, mode")
        return {f"{state}_{mode}": int(count) for state, mode, count in rows}
    finally:
        db.close()


class Run:
    """One fault run: the stack, the observers and the event log."""

    def __init__(self, workdir: Path, shared: Path, faces: int, workers: int,
                 rate_hz: float, say: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.shared = shared
        self.count = faces
        self.workers = [f"w{n}" for n in range(1, workers + 1)]
        self.rate_hz = rate_hz
        self.say = say
        self.stack = Stack(workdir)
        self.events: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.sent_ids: list[str] = []
        self.auditor: Auditor | None = None
        self.publisher: FacePublisher | None = None
        self.mail_stopped_at = 0.0

    def event(self, what: str, **detail: Any) -> None:
        at = round(time.monotonic() - self.started, 2)
        self.events.append({"at_s": at, "event": what, **detail})
        self.say(f"[{at:7.2f} s] {what} {detail if detail else ''}")

    # -- set-up -----------------------------------------------------------------------

    def start(self) -> None:
        stack = self.stack
        stack.start_broker()
        stack.start_sink()
        self.auditor = Auditor(stack.broker)
        for worker in self.workers:
            config = stack.inference_config(worker)
            stack.spawn(f"inference-{worker}", ["inference", "--config", str(config)])
        stack.spawn("notifier", ["notifier", "--config", str(stack.notifier_config())])
        # A status "online" is published right after the SUBSCRIBEs on the same connection,
        # so once the auditor has it the broker routes faces and violations to them.
        for worker in self.workers:
            self._wait_online("inference", worker, 1, 120)
        self._wait_online("notifier", "n1", 1, 60)
        self.publisher = FacePublisher(stack.broker, self.workdir / "spool" / "cam1.sqlite3")
        self.event("stack up", workers=self.workers)

    def _wait_online(self, service: str, instance: str, times: int, timeout_s: float) -> None:
        assert self.auditor is not None
        auditor = self.auditor
        if not wait_until(lambda: auditor.status_count(service, instance) >= times, timeout_s):
            name = f"inference-{instance}" if service == "inference" else service
            log = self.stack.services[name].output()[-3000:]
            raise RuntimeError(f"{service} {instance} did not come online:\n{log}")

    # -- faults -----------------------------------------------------------------------

    def restart_broker(self) -> None:
        self.event("broker stopping")
        self.stack.broker.restart(down_s=3.0)
        self.event("broker back")

    def kill_worker(self, worker: str) -> None:
        service = self.stack.services[f"inference-{worker}"]
        service.kill()
        self.event("inference SIGKILLed", worker=worker)
        time.sleep(1.0)
        service.start()
        self.event("inference restarted", worker=worker)

    def stop_mail(self) -> None:
        self.stack.stop_sink()
        self.mail_stopped_at = time.monotonic()
        self.event("mail server stopped")

    def start_mail(self) -> None:
        # Down long enough for the sender to back off a few times.
        time.sleep(max(0.0, self.mail_stopped_at + MAIL_DOWN_S - time.monotonic()))
        self.stack.start_sink()
        self.event("mail server back")

    def kill_notifier(self) -> None:
        service = self.stack.services["notifier"]
        service.kill()
        self.event("notifier SIGKILLed")
        time.sleep(1.0)
        service.start()
        self.event("notifier restarted")

    # -- the run ----------------------------------------------------------------------

    def send(self) -> None:
        """Send the faces; each fault strikes right after a burst, with work in flight.

        The mail server is down from 55 % to 85 % of the faces and the notifier is
        killed at 75 %, so its outbox holds undelivered alerts and the broker holds
        violations it has not acknowledged when it dies.
        """
        assert self.publisher is not None
        crops = dataset_crops(self.shared, self.count)
        n = self.count
        faults: dict[int, Callable[[], None]] = {
            max(1, n * 20 // 100): self.restart_broker,
            max(2, n * 40 // 100): lambda: self.kill_worker(self.workers[0]),
            max(3, n * 55 // 100): self.stop_mail,
            max(4, n * 75 // 100): self.kill_notifier,
            max(5, n * 85 // 100): self.start_mail,
        }
        burst = max(3, n // 10)
        bursts = {i for at in faults for i in range(at - burst, at)}
        self.event("sending faces", faces=n)
        for index, (_, jpeg) in enumerate(crops):
            fault = faults.get(index)
            if fault is not None:
                fault()
            face = face_message(self.stack.broker.district, jpeg, frame=index, track=index)
            self.publisher.submit(face)
            self.sent_ids.append(face.face_id)
            if index not in bursts:
                time.sleep(1.0 / self.rate_hz)
        self.event("all faces submitted")
        if not self.stack.sink.running:
            self.start_mail()

    def drain(self, timeout_s: float) -> bool:
        assert self.auditor is not None and self.publisher is not None
        auditor, publisher, sink_dir = self.auditor, self.publisher, self.stack.mail_dir
        wanted = set(self.sent_ids)

        def done() -> bool:
            if len(publisher.spool) > 0:
                return False
            verdicts = auditor.verdicts()
            if not wanted <= {v.face_id for v in verdicts}:
                return False
            violations = {v.face_id for v in verdicts if v.violation}
            mailbox = read_mailbox(sink_dir)
            mailed = set(mailbox.singles) | {i for d in mailbox.digests for i in d}
            return violations <= mailed

        drained = wait_until(done, timeout_s, step_s=0.5)
        self.event("drained" if drained else "drain timed out")
        # Late redeliveries (a duplicate verdict, a second mail) would show up now.
        time.sleep(3.0)
        return drained

    def stop(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        if self.publisher is not None:
            self.publisher.close()
        for name in [n for n in self.stack.services if n.startswith("inference")] + ["notifier"]:
            codes[name] = self.stack.services[name].terminate()
        if self.auditor is not None:
            self.auditor.close()
        self.stack.close()
        return codes

    # -- counting ---------------------------------------------------------------------

    def counts(self, drained: bool, exit_codes: dict[str, int | None]) -> dict[str, Any]:
        assert self.auditor is not None and self.publisher is not None
        sent = set(self.sent_ids)
        verdicts = self.auditor.verdicts()
        verdict_ids = Counter(v.face_id for v in verdicts)
        violation_ids = {v.face_id for v in verdicts if v.violation}
        clean_ids = {v.face_id for v in verdicts if not v.violation}
        violation_msgs = Counter(v.face_id for v in self.auditor.violations())
        mailbox = read_mailbox(self.stack.mail_dir)
        single_ids = Counter(mailbox.singles)
        digest_ids = Counter(i for d in mailbox.digests for i in d)
        mailed = single_ids + digest_ids
        # Message-IDs per alert: a mail sent again keeps its Message-ID (see the
        # Limitation in services/notifier/channels.py); a second Message-ID would be a
        # second, different alert mail for one violation.
        message_ids: dict[str, set[str]] = defaultdict(set)
        for alert_id, message_id in zip(mailbox.singles, mailbox.single_message_ids,
                                        strict=True):
            message_ids[alert_id].add(message_id)
        dead = self.auditor.dead_letters()
        result: dict[str, Any] = {
            "faces_sent": len(self.sent_ids),
            "faces_acknowledged_by_broker": self.publisher.acknowledged,
            "verdicts": {
                "messages": sum(verdict_ids.values()),
                "distinct_faces": len(verdict_ids),
                "faces_without_verdict": len(sent - set(verdict_ids)),
                "unknown_faces": len(set(verdict_ids) - sent),
                "republished": sum(n - 1 for n in verdict_ids.values()),
            },
            "violations": {
                "distinct": len(violation_ids),
                "non_violations": len(clean_ids),
                "messages": sum(violation_msgs.values()),
                "distinct_messages": len(violation_msgs),
                "verdicts_without_violation_message": len(violation_ids - set(violation_msgs)),
            },
            "mails": {
                "files": len(mailbox.message_ids),
                "single_alerts": sum(single_ids.values()),
                "digests": len(mailbox.digests),
                "digest_entries": sum(digest_ids.values()),
                "distinct_alerts": len(mailed),
                "violations_without_mail": len(violation_ids - set(mailed)),
                "violations_with_more_than_one_mail": sum(1 for n in mailed.values() if n > 1),
                "violations_with_more_than_one_message_id": sum(
                    1 for ids in message_ids.values() if len(ids) > 1
                ),
                "resent_with_the_same_message_id": sum(
                    single_ids[a] - len(ids) for a, ids in message_ids.items()
                ),
                "mails_for_non_violations": len(set(mailed) - violation_ids),
                "distinct_message_ids": len(set(mailbox.message_ids)),
            },
            "dead_letters": len(dead),
            "dead_letter_reasons": sorted({d.reason for d in dead}),
            "outbox": _outbox_counts(self.workdir / "outbox.sqlite3"),
            "exit_codes": exit_codes,
            "drained": drained,
            "faults": [e for e in self.events if e["event"] not in ("sending faces",)],
            "elapsed_s": round(time.monotonic() - self.started, 1),
        }
        result["ok"] = (
            drained
            and result["verdicts"]["faces_without_verdict"] == 0
            and result["verdicts"]["unknown_faces"] == 0
            and result["violations"]["verdicts_without_violation_message"] == 0
            and result["mails"]["violations_without_mail"] == 0
            and result["mails"]["violations_with_more_than_one_message_id"] == 0
            and sum(1 for n in digest_ids.values() if n > 1) == 0
            and not set(digest_ids) & set(single_ids)
            and result["mails"]["mails_for_non_violations"] == 0
            and result["dead_letters"] == 0
            and all(code == 0 for code in exit_codes.values())
        )
        return result


def run_suite(
    faces: int,
    workdir: Path,
    shared: Path = SHARED,
    workers: int = 2,
    rate_hz: float = 4.0,
    drain_timeout_s: float = 90.0,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Run the faults once with ``faces`` faces; returns the counts (see the module doc)."""
    if not MODEL.is_file():
        raise FileNotFoundError(f"the shipped model {MODEL} is missing")
    run = Run(workdir, shared, faces, workers, rate_hz, say)
    drained = False
    exit_codes: dict[str, int | None] = {}
    try:
        run.start()
        run.send()
        drained = run.drain(drain_timeout_s)
    finally:
        exit_codes = run.stop()
    return run.counts(drained, exit_codes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.faults.run_suite",
        description="Send faces through a district while injecting faults; print the counts.",
    )
    parser.add_argument(
        "--faces", type=int, default=int(os.environ.get("MASKMESH_FAULT_FACES", DEFAULT_FACES)),
        help="faces to send (default: $MASKMESH_FAULT_FACES or %(default)s)",
    )
    parser.add_argument("--workers", type=int, default=2, help="inference workers")
    parser.add_argument("--rate-hz", type=float, default=4.0, help="faces sent per second")
    parser.add_argument("--drain-timeout-s", type=float, default=90.0)
    parser.add_argument("--workdir", type=Path, help="keep configs, logs, mail and outbox here")
    args = parser.parse_args(argv)
    if args.faces < 5:
        parser.error("--faces must be at least 5 (one per fault and some)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="maskmesh-faults-"))
    counts = run_suite(args.faces, workdir.resolve(), workers=args.workers,
                       rate_hz=args.rate_hz, drain_timeout_s=args.drain_timeout_s)
    counts["workdir"] = str(workdir)
    print(json.dumps(counts, indent=2))
    return 0 if counts["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
