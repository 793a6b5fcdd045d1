"""The message contract on the bus: one pydantic model per topic kind.

Every message is a JSON object with ``schema_version``; images travel as base64 JPEG
strings. ``decode`` is the one door through which a payload from the bus becomes a
model: it refuses oversized payloads before parsing and turns every failure into a
``MessageError`` whose reason names what is wrong, for the dead-letter topic.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)

from maskmesh.ids import CameraId, Identifier

SCHEMA_VERSION: Final = 1

# Refused before JSON parsing: a crop and a context photo fit well within this.
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_JPEG_BYTES = 2 * 1024 * 1024
MAX_IMAGE_SIDE = 16384
# Decoded, an image takes 3 bytes a pixel whatever its JPEG size: a few kilobytes can
# claim 16000x16000 (768 MB). 40 megapixels holds an 8K frame.
MAX_IMAGE_PIXELS = 40_000_000

Label = Literal["mask", "no_mask", "incorrect"]
LABELS: tuple[str, ...] = ("mask", "no_mask", "incorrect")

_JPEG_MAGIC = b"\xff\xd8\xff"
_FACE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
# C0 and C1 controls and the Unicode line and paragraph separators: Python's str.splitlines
# and the email package treat \x85, \u2028 and \u2029 as line breaks too.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class MessageError(ValueError):
    """A payload that cannot be turned into a message; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _decode_jpeg(value: Any) -> bytes:
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        if len(value) > MAX_JPEG_BYTES * 4 // 3 + 4:
            raise ValueError("image is larger than the limit")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"not valid base64 ({exc})") from None
    else:
        raise ValueError("must be a base64 string")
    if not data:
        raise ValueError("image is empty")
    if len(data) > MAX_JPEG_BYTES:
        raise ValueError(f"image is {len(data)} bytes, above the {MAX_JPEG_BYTES} limit")
    if not data.startswith(_JPEG_MAGIC):
        raise ValueError("not a JPEG (no JPEG start-of-image marker)")
    size = jpeg_size(data)
    if size is not None:
        width, height = size
        if width == 0 or height == 0:
            raise ValueError(f"image has zero size ({width}x{height})")
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"image is {width}x{height} pixels, above the {MAX_IMAGE_PIXELS} pixel limit"
            )
    return data


# Frame header markers (SOF0-SOF15) that carry the image size; C4, C8 and CC are not.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, without decoding; None if not found.

    Lets a service refuse an image before a decoder allocates memory for it.
    """
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header came
            return None
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _SOF_MARKERS:
            if at + 9 > len(data) or length < 7:
                return None
            height = int.from_bytes(data[at + 5 : at + 7], "big")
            width = int.from_bytes(data[at + 7 : at + 9], "big")
            return width, height
        if length < 2:
            return None
        at += 2 + length
    return None


def _encode_jpeg(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


Jpeg = Annotated[
    bytes,
    BeforeValidator(_decode_jpeg),
    PlainSerializer(_encode_jpeg, return_type=str, when_used="json"),
    Field(json_schema_extra={"contentEncoding": "base64", "contentMediaType": "image/jpeg"}),
]


def _check_face_id(value: str) -> str:
    if not _FACE_ID_RE.fullmatch(value):
        raise ValueError("face_id must be 32 lower-case hex digits")
    return value


# Every time on the bus lies in this range, so that any service can convert it to any
# time zone and to epoch seconds without overflowing (year 9999 in UTC is year 10000
# in Tokyo, which Python's datetime cannot hold).
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(9000, 1, 1, tzinfo=UTC)


def _to_utc(value: datetime) -> datetime:
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        # A ValueError is what pydantic turns into a validation error with the field name.
        raise ValueError("time is out of range") from None
    if not EARLIEST_TIME <= utc < LATEST_TIME:
        raise ValueError(
            f"time must lie between {EARLIEST_TIME:%Y-%m-%d} and {LATEST_TIME:%Y-%m-%d}"
        )
    return utc


def _check_text(value: str) -> str:
    if _CONTROL_RE.search(value):
        raise ValueError("must not contain control characters")
    return value


FaceId = Annotated[
    str, AfterValidator(_check_face_id), Field(json_schema_extra={"pattern": _FACE_ID_RE.pattern})
]
UtcTime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
PlainText = Annotated[str, Field(max_length=200), AfterValidator(_check_text)]
Pixels = Annotated[int, Field(ge=0, le=MAX_IMAGE_SIDE)]


def new_face_id() -> str:
    """A fresh face id; it identifies one face event from camera to mail."""
    return uuid.uuid4().hex


def utc_now() -> datetime:
    return datetime.now(UTC)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION


class Box(BaseModel):
    """A box in pixel coordinates, x2 and y2 exclusive."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    x1: Pixels
    y1: Pixels
    x2: Pixels
    y2: Pixels

    @model_validator(mode="after")
    def _ordered(self) -> Box:
        if self.x2 <= self.x1 or self.y2 <= self.y1:
            raise ValueError("box must have x2 > x1 and y2 > y1 (a zero-size box)")
        return self

    def fits(self, width: int, height: int) -> bool:
        return self.x2 <= width and self.y2 <= height


class FaceCrop(_Message):
    """A face found by a capture node: ``maskmesh/v1/{district}/{camera}/faces``."""

    face_id: FaceId
    district: Identifier
    camera: CameraId
    place: PlainText | None = None
    frame: Annotated[int, Field(ge=0)]
    track: Annotated[int, Field(ge=0)]
    captured_at: UtcTime
    frame_width: Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)]
    frame_height: Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)]
    box: Box
    detector_score: Probability
    crop_jpeg: Jpeg
    context_jpeg: Jpeg | None = None
    # The face box in context_jpeg's pixels (the context photo may be scaled down).
    context_box: Box | None = None

    @model_validator(mode="after")
    def _box_inside_frame(self) -> FaceCrop:
        if not self.box.fits(self.frame_width, self.frame_height):
            raise ValueError(
                f"box {self.box.x1},{self.box.y1},{self.box.x2},{self.box.y2} lies outside "
                f"the {self.frame_width}x{self.frame_height} frame"
            )
        if (self.context_box is None) != (self.context_jpeg is None):
            raise ValueError("context_jpeg and context_box come together or not at all")
        return self


class Verdict(_Message):
    """The classifier's answer for one face: ``.../{camera}/verdicts``."""

    face_id: FaceId
    district: Identifier
    camera: CameraId
    frame: Annotated[int, Field(ge=0)]
    track: Annotated[int, Field(ge=0)]
    captured_at: UtcTime
    decided_at: UtcTime
    label: Label
    p_mask: Probability
    probs: dict[Label, Probability]
    threshold: Probability
    violation: bool
    model_id: PlainText
    worker: Identifier
    latency_ms: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    inference_ms: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class Violation(Verdict):
    """A verdict below the threshold with what an alert needs: ``.../violations``."""

    place: PlainText | None = None
    box: Box
    frame_width: Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)]
    frame_height: Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)]
    detector_score: Probability
    crop_jpeg: Jpeg
    context_jpeg: Jpeg | None = None
    context_box: Box | None = None


ServiceState = Literal["online", "offline", "stalled"]


class ServiceStatus(_Message):
    """Retained state of one service instance: ``.../status/{service}/{instance}``."""

    district: Identifier
    service: Identifier
    instance: Identifier
    state: ServiceState
    started_at: UtcTime
    updated_at: UtcTime
    counters: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    detail: PlainText | None = None
    version: PlainText


class DeadLetter(_Message):
    """What a service could not process, and why: ``maskmesh/v1/{district}/deadletter``."""

    district: Identifier
    service: Identifier
    instance: Identifier
    source_topic: Annotated[str, Field(max_length=512)]
    reason: Annotated[str, Field(max_length=2000)]
    received_at: UtcTime
    payload_bytes: Annotated[int, Field(ge=0)]
    # The start of the payload as text, so an operator can see what arrived; never
    # more than a few hundred characters, so no image travels on.
    payload_excerpt: Annotated[str, Field(max_length=512)]
    face_id: FaceId | None = None


M = TypeVar("M", bound=BaseModel)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def decode(model: type[M], payload: bytes | bytearray, max_bytes: int = MAX_PAYLOAD_BYTES) -> M:
    """Parse and validate one payload, or raise MessageError with a clear reason."""
    if len(payload) > max_bytes:
        raise MessageError(f"payload is {len(payload)} bytes, above the {max_bytes} limit")
    try:
        data = json.loads(payload)
    except UnicodeDecodeError:
        raise MessageError("payload is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise MessageError(f"payload is not JSON ({exc.msg} at char {exc.pos})") from None
    except RecursionError:
        raise MessageError("payload is JSON nested too deeply") from None
    except ValueError as exc:
        # Python refuses integers of more than 4300 digits with a plain ValueError.
        raise MessageError(f"payload is not usable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MessageError("payload is not a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise MessageError(
            f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION})"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise MessageError(f"invalid {model.__name__}: {_describe(exc)}") from None


def encode(message: BaseModel) -> bytes:
    """Serialise a message to the JSON bytes that go on the bus."""
    return message.model_dump_json().encode("utf-8")


def excerpt(payload: bytes | bytearray, limit: int = 256) -> str:
    """The start of a payload as printable text, for dead letters and logs."""
    text = payload[:limit].decode("utf-8", errors="replace")
    return _CONTROL_RE.sub("?", text)


def face_id_of(payload: bytes | bytearray) -> str | None:
    """Best-effort face id of a payload that failed validation, to key a dead letter."""
    match = re.search(rb'"face_id"\s*:\s*"([0-9a-f]{32})"', payload[:4096])
    return match.group(1).decode("ascii") if match else None
