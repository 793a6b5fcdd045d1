"""Identifiers that end up in topics, file names and mail headers.

District, camera, service and instance names are checked against one strict pattern so
that none can carry an MQTT wildcard, a path separator or a header line break.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

IDENTIFIER_PATTERN = r"^[a-z0-9](?:[a-z0-9_-]{0,62})$"
_IDENTIFIER_RE = re.compile(IDENTIFIER_PATTERN)

# Names that already mean something one level below the district in the topic tree.
RESERVED_NAMES = frozenset({"status", "deadletter", "faces", "verdicts", "violations"})


class InvalidIdentifier(ValueError):
    """An identifier does not match IDENTIFIER_PATTERN or is reserved."""


def check_identifier(value: str, what: str = "identifier") -> str:
    """Return ``value`` if it is a safe identifier, else raise InvalidIdentifier."""
    if not isinstance(value, str) or not _IDENTIFIER_RE.fullmatch(value):
        raise InvalidIdentifier(
            f"{what} {value!r} must be 1-63 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_camera(value: str) -> str:
    """A camera name: an identifier that does not collide with district-level topics."""
    check_identifier(value, "camera")
    if value in RESERVED_NAMES:
        raise InvalidIdentifier(f"camera {value!r} is a reserved topic name")
    return value


# The Field(json_schema_extra=...) parts only describe the rule in JSON Schema (for the
# AsyncAPI document); the validators above stay the one place that enforces it.
Identifier = Annotated[
    str,
    AfterValidator(check_identifier),
    Field(json_schema_extra={"pattern": IDENTIFIER_PATTERN}),
]
CameraId = Annotated[
    str,
    AfterValidator(check_camera),
    Field(
        json_schema_extra={"pattern": IDENTIFIER_PATTERN, "not": {"enum": sorted(RESERVED_NAMES)}}
    ),
]
