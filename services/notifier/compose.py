"""What an operator reads: alert and digest mails, and their SMS counterparts.

A mail is multipart: plain text for any client, and HTML that fits a phone screen with
the annotated photo inline (the context photo with the face box and the verdict drawn
on it, or the crop when no context photo came); the crop is attached as well. Every
header is set through ``EmailMessage``, whose policy refuses line breaks in values.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from zoneinfo import ZoneInfo

import cv2
import numpy as np

from services.notifier.outbox import Alert

# The smallest width the annotated photo is shown at, so its text stays legible.
_MIN_PHOTO_WIDTH = 480
# Thumbnails a digest mail shows inline; the list itself has every alert.
_DIGEST_THUMBNAILS = 20

_HEADLINES = {
    "no_mask": "No mask",
    "incorrect": "Mask worn incorrectly",
    "mask": "Mask not confirmed",
}
# BGR: red for no mask, orange for a mask worn wrongly, yellow for an unsure "mask".
_COLOURS = {"no_mask": (40, 40, 230), "incorrect": (0, 150, 255), "mask": (0, 215, 255)}

_REASONS = {
    "quiet_hours": "held during quiet hours",
    "camera_cooldown": "held by the per-camera cool-down",
    "hourly_cap": "held by the district's hourly mail cap",
}


def headline(label: str) -> str:
    return _HEADLINES.get(label, "Mask violation")


def where(alert: Alert) -> str:
    return alert.place or alert.camera


def local_time(epoch_s: float, zone: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(epoch_s, zone)


def percent(p: float) -> str:
    return f"{p * 100:.0f}%"


# -- the photo ------------------------------------------------------------------------


def annotated_photo(alert: Alert) -> bytes | None:
    """A JPEG of the context photo (or the crop) with the box and the verdict drawn in."""
    box = alert.details.get("context_box")
    source = alert.context_jpeg if box is not None else None
    if source is None:
        source, box = alert.crop_jpeg, None
    if source is None:
        return None
    image = cv2.imdecode(np.frombuffer(source, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        # Limitation: a JPEG that OpenCV cannot decode is sent as it came, unannotated.
        return source

    scale = 1.0
    if image.shape[1] < _MIN_PHOTO_WIDTH:
        scale = _MIN_PHOTO_WIDTH / image.shape[1]
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    height, width = image.shape[:2]
    colour = _COLOURS.get(alert.label, (40, 40, 230))
    thickness = max(2, round(width / 320))
    if box is not None:
        x1, y1 = round(box["x1"] * scale), round(box["y1"] * scale)
        x2, y2 = round(box["x2"] * scale), round(box["y2"] * scale)
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, thickness)
    else:
        x1, y1 = 0, 0

    text = f"{headline(alert.label)}  p(mask) {percent(alert.p_mask)}"
    font = cv2.FONT_HERSHEY_SIMPLEX
    font_scale = max(0.6, width / 900)
    (text_w, text_h), baseline = cv2.getTextSize(text, font, font_scale, thickness)
    pad = max(4, thickness * 2)
    # Above the box when there is room, else along the top edge of the photo.
    top = y1 - text_h - baseline - 2 * pad
    if top < 0:
        top = 0 if box is None else min(y1 + thickness, height - text_h - baseline - 2 * pad)
        top = max(0, top)
    left = max(0, min(x1, width - text_w - 2 * pad))
    bottom = top + text_h + baseline + 2 * pad
    cv2.rectangle(image, (left, top), (left + text_w + 2 * pad, bottom), colour, cv2.FILLED)
    cv2.putText(
        image, text, (left + pad, bottom - baseline - pad), font, font_scale,
        (255, 255, 255), thickness, cv2.LINE_AA,
    )
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 88])
    return encoded.tobytes() if ok else source


# -- mails ----------------------------------------------------------------------------


def _base_message(
    subject: str, mail_from: str, recipients: Sequence[str], message_id: str
) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = Address(addr_spec=mail_from)
    msg["To"] = tuple(Address(addr_spec=address) for address in recipients)
    msg["Message-ID"] = message_id
    msg["Date"] = format_datetime(datetime.now().astimezone())
    # RFC 3834: machines (vacation responders) should not answer this mail.
    msg["Auto-Submitted"] = "auto-generated"
    return msg


def alert_message_id(alert: Alert) -> str:
    """Stable per alert, so that a mail resent after a crash is recognisably the same."""
    return f"<{alert.face_id}.{alert.channel}@{alert.district}.maskmesh>"


def alert_subject(alert: Alert, zone: ZoneInfo) -> str:
    when = local_time(alert.captured_at, zone).strftime("%Y-%m-%d %H:%M")
    return f"[maskmesh] {headline(alert.label)} at {where(alert)} {when}"


def alert_mail(
    alert: Alert, mail_from: str, recipients: Sequence[str], zone: ZoneInfo
) -> EmailMessage:
    """One alert: text and HTML, the annotated photo inline, the crop attached."""
    when = local_time(alert.captured_at, zone).strftime("%Y-%m-%d %H:%M:%S %Z")
    title = f"{headline(alert.label)} at {where(alert)}"
    threshold = alert.details.get("threshold")
    confidence = f"p(mask) {percent(alert.p_mask)}, label {alert.label}"
    if isinstance(threshold, (int, float)):
        confidence += f" (alerts below {percent(float(threshold))})"
    camera_line = f"camera {alert.camera}, track {alert.track}, district {alert.district}"
    photo = annotated_photo(alert)

    msg = _base_message(
        alert_subject(alert, zone), mail_from, recipients, alert_message_id(alert)
    )
    msg["X-Maskmesh-Alert-Id"] = alert.face_id
    lines = [
        title,
        "",
        f"Time:       {when}",
        f"Place:      {alert.place or '(not named)'}",
        f"Camera:     {camera_line}",
        f"Confidence: {confidence}",
        f"Alert id:   {alert.face_id}",
        "",
        "Quote the alert id when you follow this up.",
    ]
    if photo is None:
        lines.append("The photos of this alert were deleted after the retention period.")
    lines += ["", "-- ", f"maskmesh notifier, model {alert.details.get('model_id', '?')}"]
    msg.set_content("\n".join(lines) + "\n")

    cid = make_msgid(domain=f"{alert.district}.maskmesh")
    rows = [
        ("Time", when),
        ("Place", alert.place or "(not named)"),
        ("Camera", camera_line),
        ("Confidence", confidence),
        ("Alert id", alert.face_id),
    ]
    image_html = (
        f'<img src="cid:{cid[1:-1]}" alt="annotated photo" '
        'style="width:100%;max-width:600px;height:auto;display:block;border-radius:4px">'
        if photo is not None
        else "<p><em>The photos of this alert were deleted after the retention period.</em></p>"
    )
    msg.add_alternative(_html_page(title, image_html, rows), subtype="html")
    if photo is not None:
        _html_part(msg).add_related(
            photo, maintype="image", subtype="jpeg", cid=cid,
            filename=f"{alert.face_id}-annotated.jpg", disposition="inline",
        )
    if alert.crop_jpeg is not None:
        msg.add_attachment(
            alert.crop_jpeg, maintype="image", subtype="jpeg",
            filename=f"{alert.face_id}-crop.jpg",
        )
    return msg


def _html_part(msg: EmailMessage) -> EmailMessage:
    part = msg.get_body(preferencelist=("html",))
    assert isinstance(part, EmailMessage), "the HTML alternative was just added"
    return part


def _html_page(title: str, image_html: str, rows: Sequence[tuple[str, str]]) -> str:
    table = "".join(
        '<tr><td style="padding:4px 8px 4px 0;color:#666;vertical-align:top">'
        f"{html.escape(name)}</td>"
        f'<td style="padding:4px 0;word-break:break-all">{html.escape(value)}</td></tr>'
        for name, value in rows
    )
    return (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width,initial-scale=1"></head>'
        '<body style="margin:0;padding:12px;font-family:sans-serif;font-size:16px">'
        '<div style="max-width:600px;margin:0 auto">'
        f'<h2 style="margin:0 0 12px 0;color:#c0392b">{html.escape(title)}</h2>'
        f"{image_html}"
        f'<table style="margin-top:12px;border-collapse:collapse">{table}</table>'
        '<p style="color:#666;font-size:14px">Quote the alert id when you follow this up.</p>'
        "</div></body></html>"
    )


def digest_message_id(alerts: Sequence[Alert]) -> str:
    first = alerts[0]
    return f"<digest-{first.digest_key or first.face_id}.{first.channel}@{first.district}.maskmesh>"


def _span(alerts: Sequence[Alert], zone: ZoneInfo) -> str:
    start = local_time(min(a.captured_at for a in alerts), zone)
    end = local_time(max(a.captured_at for a in alerts), zone)
    if start.date() == end.date():
        return f"{start:%Y-%m-%d %H:%M}-{end:%H:%M}"
    return f"{start:%Y-%m-%d %H:%M} - {end:%Y-%m-%d %H:%M}"


def _why(alerts: Sequence[Alert]) -> str:
    reasons = sorted({a.reason for a in alerts if a.reason})
    return "; ".join(_REASONS.get(r, r) for r in reasons) or "held for a digest"


def _per_place(alerts: Sequence[Alert]) -> str:
    counts = Counter(where(a) for a in alerts)
    return ", ".join(f"{name} x{count}" for name, count in counts.most_common())


def digest_mail(
    alerts: Sequence[Alert], mail_from: str, recipients: Sequence[str], zone: ZoneInfo
) -> EmailMessage:
    """Many held alerts in one mail: a summary, a line each, thumbnails of the first few."""
    count = len(alerts)
    span = _span(alerts, zone)
    noun = "violation" if count == 1 else "violations"
    subject = f"[maskmesh] Digest: {count} {noun} {span}"
    msg = _base_message(subject, mail_from, recipients, digest_message_id(alerts))

    lines = [f"{count} {noun}, {span} ({_why(alerts)})", f"Where: {_per_place(alerts)}", ""]
    for alert in alerts:
        when = local_time(alert.captured_at, zone).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(
            f"{when}  {headline(alert.label)} at {where(alert)} (camera {alert.camera}), "
            f"p(mask) {percent(alert.p_mask)}, alert {alert.face_id}"
        )
    lines += ["", "-- ", "maskmesh notifier"]
    msg.set_content("\n".join(lines) + "\n")

    thumbs: list[tuple[str, bytes]] = []
    items = []
    for index, alert in enumerate(alerts):
        when = local_time(alert.captured_at, zone).strftime("%H:%M:%S")
        image = ""
        if index < _DIGEST_THUMBNAILS and alert.crop_jpeg is not None:
            cid = make_msgid(domain=f"{alert.district}.maskmesh")
            thumbs.append((cid, alert.crop_jpeg))
            image = (
                f'<img src="cid:{cid[1:-1]}" alt="face" width="64" height="64" '
                'style="float:left;margin:0 8px 4px 0;object-fit:cover;border-radius:4px">'
            )
        items.append(
            '<li style="list-style:none;margin:0 0 10px 0;overflow:hidden">'
            f"{image}<b>{html.escape(when)}</b> {html.escape(headline(alert.label))} at "
            f"{html.escape(where(alert))}<br>p(mask) {percent(alert.p_mask)} - "
            f'<span style="font-size:13px;color:#666">{alert.face_id}</span></li>'
        )
    page = (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width,initial-scale=1"></head>'
        '<body style="margin:0;padding:12px;font-family:sans-serif;font-size:16px">'
        '<div style="max-width:600px;margin:0 auto">'
        f'<h2 style="margin:0 0 8px 0">{count} {noun}</h2>'
        f'<p style="color:#666">{html.escape(span)} ({html.escape(_why(alerts))})<br>'
        f"{html.escape(_per_place(alerts))}</p>"
        f'<ul style="padding:0">{"".join(items)}</ul></div></body></html>'
    )
    msg.add_alternative(page, subtype="html")
    html_part = _html_part(msg)
    for cid, data in thumbs:
        html_part.add_related(data, maintype="image", subtype="jpeg", cid=cid)
    return msg


# -- SMS ------------------------------------------------------------------------------


def alert_sms(alert: Alert, zone: ZoneInfo) -> str:
    when = local_time(alert.captured_at, zone).strftime("%H:%M")
    return (
        f"[maskmesh] {headline(alert.label)} at {where(alert)} {when}, "
        f"p(mask) {percent(alert.p_mask)}. Alert {alert.face_id}"
    )


def digest_sms(alerts: Sequence[Alert], zone: ZoneInfo) -> str:
    count = len(alerts)
    noun = "violation" if count == 1 else "violations"
    return f"[maskmesh] {count} {noun} {_span(alerts, zone)}: {_per_place(alerts)}"
