"""The AsyncAPI 3.0 description of a district's bus, built from the code itself.

Channel addresses come from ``maskmesh.topics``, payload schemas from the pydantic
models' ``model_json_schema()`` and the operations from the roles of the broker ACL,
so ``docs/asyncapi.yaml`` is regenerated rather than edited::

    python -m maskmesh.asyncapi --out docs/asyncapi.yaml

The payload schemas are the *serialisation* schemas: what a subscriber finds on the
wire (images as base64 strings, times as RFC 3339 strings).
"""

from __future__ import annotations

import argparse
import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from maskmesh import __version__, topics
from maskmesh.ids import IDENTIFIER_PATTERN, RESERVED_NAMES
from maskmesh.messages import (
    SCHEMA_VERSION,
    Box,
    DeadLetter,
    FaceCrop,
    ServiceStatus,
    Verdict,
    Violation,
)

SCHEMA_REF = "#/components/schemas/{model}"
SCHEMA_MODE: Literal["validation", "serialization"] = "serialization"

# Placeholders stand where the topic functions take a parameter; they are valid
# identifiers, so the real functions build the address and the braces go in afterwards.
_PLACEHOLDERS = {
    "district": "pdistrict",
    "camera": "pcamera",
    "service": "pservice",
    "instance": "pinstance",
}


@dataclass(frozen=True)
class Channel:
    """One kind of topic: its id in the document, its model, and who may read it."""

    id: str
    model: type[BaseModel]
    parameters: tuple[str, ...]
    summary: str
    personal_data: bool
    retained: bool = False


CHANNELS: tuple[Channel, ...] = (
    Channel(
        "faces",
        FaceCrop,
        ("district", "camera"),
        "Face crops found by a camera's capture node, for the inference workers.",
        personal_data=True,
    ),
    Channel(
        "verdicts",
        Verdict,
        ("district", "camera"),
        "The classifier's answer for every face: label, p_mask, threshold. No image.",
        personal_data=False,
    ),
    Channel(
        "violations",
        Violation,
        ("district", "camera"),
        "Verdicts below the mask threshold, with the face crop and context photo that "
        "the alert mail carries.",
        personal_data=True,
    ),
    Channel(
        "status",
        ServiceStatus,
        ("district", "service", "instance"),
        "Retained state of every service instance, refreshed every status interval; "
        "the broker publishes `offline` as the instance's last will.",
        personal_data=False,
        retained=True,
    ),
    Channel(
        "deadletter",
        DeadLetter,
        ("district",),
        "What a service could not process, and why (never the image itself).",
        personal_data=False,
    ),
)

# (operation id, role, action, channel, summary). The roles are the broker users of
# maskmesh.brokerconf; tests check each line against the generated ACL.
OPERATIONS: tuple[tuple[str, str, str, str, str], ...] = (
    ("integratorReceiveVerdicts", "integrator", "receive", "verdicts",
     "Integrators receive every verdict of the district."),
    ("integratorReceiveStatus", "integrator", "receive", "status",
     "Integrators receive the retained state of every service."),
    ("captureSendFaces", "capture", "send", "faces",
     "A capture node publishes its own camera's faces (user capture-{camera})."),
    ("captureSendStatus", "capture", "send", "status",
     "A capture node publishes its status under service `capture`."),
    ("inferenceReceiveFaces", "inference", "receive", "faces",
     "Inference workers split the faces through the shared subscription "
     f"`$share/{topics.INFERENCE_SHARE_GROUP}/maskmesh/v1/{{district}}/+/faces`."),
    ("inferenceSendVerdicts", "inference", "send", "verdicts", "One verdict per face."),
    ("inferenceSendViolations", "inference", "send", "violations",
     "One violation per verdict below the threshold."),
    ("inferenceSendStatus", "inference", "send", "status",
     "Inference workers publish their status under service `inference`."),
    ("notifierReceiveViolations", "notifier", "receive", "violations",
     "The notifier turns each violation into one alert mail."),
    ("notifierSendStatus", "notifier", "send", "status",
     "The notifier publishes its status under service `notifier`."),
    ("operatorReceiveStatus", "operator", "receive", "status",
     "`maskmesh status` and `maskmesh up` read the retained states."),
    ("operatorReceiveDeadletter", "operator", "receive", "deadletter",
     "Operators read the dead letters."),
    ("serviceSendDeadletter", "any", "send", "deadletter",
     "Every role may publish a dead letter."),
    ("auditorReceiveFaces", "auditor", "receive", "faces",
     "The optional auditor user reads everything in the district, personal data included."),
    ("auditorReceiveViolations", "auditor", "receive", "violations",
     "The optional auditor user reads everything in the district, personal data included."),
)  # fmt: skip

_TITLES = {
    "faces": "Face crops",
    "verdicts": "Verdicts",
    "violations": "Violations",
    "status": "Service status",
    "deadletter": "Dead letters",
}
_PARAMETER_TEXT = {
    "district": "The district; one broker and one stack per district.",
    "camera": "The camera name, as configured on its capture node. "
    f"Not one of {', '.join(sorted(RESERVED_NAMES))}.",
    "service": "The service: capture, inference or notifier.",
    "instance": "The service instance: a capture node's camera, an inference worker id.",
}
_PARAMETER_EXAMPLES = {
    "district": ["demo"],
    "camera": ["cam1", "cam2"],
    "service": ["capture", "inference", "notifier"],
    "instance": ["cam1", "inference-1"],
}


def address(channel: Channel) -> str:
    """The channel's address with ``{parameter}`` expressions, from ``maskmesh.topics``."""
    function = getattr(topics, channel.id)
    text: str = function(*(_PLACEHOLDERS[name] for name in channel.parameters))
    for name in channel.parameters:
        text = text.replace(_PLACEHOLDERS[name], "{" + name + "}")
    return text


def model_schemas() -> dict[str, Any]:
    """components/schemas: every model's schema, nested models hoisted beside them."""
    schemas: dict[str, Any] = {}
    models: list[type[BaseModel]] = [Box, *(channel.model for channel in CHANNELS)]
    for model in models:
        schema = model.model_json_schema(mode=SCHEMA_MODE, ref_template=SCHEMA_REF)
        for name, nested in schema.pop("$defs", {}).items():
            schemas.setdefault(name, nested)
        schemas[model.__name__] = schema
    return schemas


def _message_name(channel: Channel) -> str:
    return channel.model.__name__[0].lower() + channel.model.__name__[1:]


def _example(channel: Channel) -> dict[str, Any]:
    """One example payload, built through the model so that it is valid by construction."""
    at = datetime(2024, 5, 1, 8, 30, tzinfo=UTC).isoformat()
    jpeg = base64.b64encode(b"\xff\xd8\xff\xe0" + bytes(12)).decode("ascii")
    face: dict[str, Any] = {
        "face_id": "3f2a9c1e5b7d4e8fa1c2d3e4f5a6b7c8",
        "district": "demo",
        "camera": "cam1",
        "frame": 1200,
        "track": 7,
        "captured_at": at,
    }
    photo: dict[str, Any] = {
        "place": "Main Square",
        "frame_width": 1280,
        "frame_height": 720,
        "box": {"x1": 40, "y1": 30, "x2": 104, "y2": 110},
        "detector_score": 0.93,
        "crop_jpeg": jpeg,
    }
    verdict: dict[str, Any] = face | {
        "decided_at": at,
        "label": "no_mask",
        "p_mask": 0.06,
        "probs": {"mask": 0.06, "no_mask": 0.9, "incorrect": 0.04},
        "threshold": 0.8,
        "violation": True,
        "model_id": "maskmesh-efficientnet-lite0-20261204-a294eec7",
        "worker": "inference-1",
        "latency_ms": 41.5,
        "inference_ms": 6.2,
    }
    worker: dict[str, Any] = {"district": "demo", "service": "inference", "instance": "inference-1"}
    data: dict[str, dict[str, Any]] = {
        "faces": face | photo,
        "verdicts": verdict,
        "violations": verdict | photo,
        "status": worker
        | {
            "state": "online",
            "started_at": at,
            "updated_at": at,
            "counters": {"faces": 1200, "verdicts": 1200, "violations": 31},
            "version": __version__,
        },
        "deadletter": worker
        | {
            "source_topic": topics.faces("demo", "cam1"),
            "reason": "invalid FaceCrop: box: box must have x2 > x1 and y2 > y1",
            "received_at": at,
            "payload_bytes": 412,
            "payload_excerpt": '{"schema_version": 1, "face_id": "3f2a9c1e...',
        },
    }
    message = channel.model.model_validate(data[channel.id])
    return {"name": f"{channel.id}-example", "payload": message.model_dump(mode="json")}


def _channel(channel: Channel) -> dict[str, Any]:
    description = channel.summary
    if channel.personal_data:
        description += (
            " **Personal data** (face images): readable only by the roles named in the "
            "operations; never granted to integrators, never bridged out except violations "
            "to the city broker."
        )
    return {
        "address": address(channel),
        "title": _TITLES[channel.id],
        "description": description,
        "messages": {_message_name(channel): {"$ref": f"#/components/messages/{channel.id}"}},
        "parameters": {
            name: {"$ref": f"#/components/parameters/{name}"} for name in channel.parameters
        },
    }


def _message(channel: Channel) -> dict[str, Any]:
    return {
        "name": channel.model.__name__,
        "title": channel.model.__name__,
        "summary": (channel.model.__doc__ or "").strip().splitlines()[0],
        "contentType": "application/json",
        "payload": {"$ref": SCHEMA_REF.format(model=channel.model.__name__)},
        "bindings": {"mqtt": {"payloadFormatIndicator": 1, "bindingVersion": "0.2.0"}},
        "examples": [_example(channel)],
    }


def _operation(op_id: str, role: str, action: str, channel_id: str, summary: str) -> Any:
    channel = next(c for c in CHANNELS if c.id == channel_id)
    mqtt_binding: dict[str, Any] = {"qos": 1, "bindingVersion": "0.2.0"}
    if action == "send":
        mqtt_binding["retain"] = channel.retained
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel_id}"},
        "summary": summary,
        "tags": [{"name": f"role:{role}"}]
        + ([{"name": "personal-data"}] if channel.personal_data else []),
        "messages": [{"$ref": f"#/channels/{channel_id}/messages/{_message_name(channel)}"}],
        "bindings": {"mqtt": mqtt_binding},
    }


def _servers() -> dict[str, Any]:
    mqtt5 = {"keepAlive": 30, "sessionExpiryInterval": 3600, "bindingVersion": "0.2.0"}
    security = [
        {"$ref": "#/components/securitySchemes/brokerPassword"},
        {"$ref": "#/components/securitySchemes/clientCertificate"},
    ]
    return {
        "district": {
            "host": "{host}:{port}",
            "protocol": "secure-mqtt",
            "protocolVersion": "5",
            "title": "District broker (TLS)",
            "description": "The district's Mosquitto, reached over its TLS listener by every "
            "client off the broker host. User names and the ACL come from `maskmesh broker`.",
            "variables": {
                "host": {"default": "broker.demo.example", "description": "Broker host name."},
                "port": {"default": "8883", "description": "TLS listener port."},
            },
            "security": security,
            "bindings": {"mqtt": mqtt5},
        },
        "district-local": {
            "host": "127.0.0.1:1883",
            "protocol": "mqtt",
            "protocolVersion": "5",
            "title": "District broker (plain, host only)",
            "description": "Plain MQTT bound to the broker host's loopback (or the compose "
            "network); services on that host use it.",
            "security": [{"$ref": "#/components/securitySchemes/brokerPassword"}],
            "bindings": {"mqtt": mqtt5},
        },
        "city": {
            "host": "{host}:8883",
            "protocol": "secure-mqtt",
            "protocolVersion": "5",
            "title": "City broker (TLS only)",
            "description": "Receives each district's violations and status through an MQTT 5 "
            "bridge, under the same topic names; faces and verdicts never reach it.",
            "variables": {"host": {"default": "mqtt.city.example"}},
            "security": security,
            "bindings": {"mqtt": mqtt5},
        },
    }


def build() -> dict[str, Any]:
    """The whole AsyncAPI document as plain data."""
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "maskmesh district bus",
            "version": f"{SCHEMA_VERSION}.0.0",
            "description": "Topics of one maskmesh district: capture nodes publish face "
            "crops, inference workers publish verdicts and violations, the notifier mails "
            "each violation. Every payload is a JSON object with `schema_version` "
            f"{SCHEMA_VERSION}; unknown fields are refused. Integrators receive verdicts "
            "and status; faces and violations hold face images and are restricted. "
            f"Generated by `python -m maskmesh.asyncapi` (maskmesh {__version__}).",
            "license": {"name": "MIT"},
            "tags": [{"name": "personal-data", "description": "Carries face images."}],
        },
        "defaultContentType": "application/json",
        "servers": _servers(),
        "channels": {channel.id: _channel(channel) for channel in CHANNELS},
        "operations": {op[0]: _operation(*op) for op in OPERATIONS},
        "components": {
            "schemas": model_schemas(),
            "messages": {channel.id: _message(channel) for channel in CHANNELS},
            "parameters": {
                name: {
                    "description": f"{text} Pattern: `{IDENTIFIER_PATTERN}`.",
                    "examples": _PARAMETER_EXAMPLES[name],
                }
                for name, text in _PARAMETER_TEXT.items()
            },
            "securitySchemes": {
                "brokerPassword": {
                    "type": "userPassword",
                    "description": "A broker user from `maskmesh broker` (one per role).",
                },
                "clientCertificate": {
                    "type": "X509",
                    "description": "Optional client certificate where the TLS listener "
                    "requires one.",
                },
            },
        },
    }


def render() -> str:
    """The document as YAML text, exactly as ``docs/asyncapi.yaml`` holds it."""
    import yaml  # only the writer needs it

    class Dumper(yaml.SafeDumper):
        # Shared dicts would come out as &id001 anchors; spelled out, every part reads alone.
        def ignore_aliases(self, data: Any) -> bool:
            return True

    header = "# Generated by `python -m maskmesh.asyncapi`; regenerate rather than edit.\n"
    body = yaml.dump(build(), Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100)
    return header + body


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m maskmesh.asyncapi", description="Write the AsyncAPI document."
    )
    parser.add_argument("--out", type=Path, help="output file (default: standard output)")
    args = parser.parse_args(argv)
    text = render()
    if args.out is None:
        print(text, end="")
    else:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
