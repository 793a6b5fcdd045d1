"""Topic names on the bus, in one place.

Every topic sits under ``maskmesh/v1/{district}``; the ``v1`` changes only with a
breaking change of the message contract.
"""

from __future__ import annotations

from maskmesh.ids import check_camera, check_identifier

ROOT = "maskmesh/v1"
INFERENCE_SHARE_GROUP = "inference"


def district_root(district: str) -> str:
    return f"{ROOT}/{check_identifier(district, 'district')}"


def faces(district: str, camera: str) -> str:
    return f"{district_root(district)}/{check_camera(camera)}/faces"


def verdicts(district: str, camera: str) -> str:
    return f"{district_root(district)}/{check_camera(camera)}/verdicts"


def violations(district: str, camera: str) -> str:
    return f"{district_root(district)}/{check_camera(camera)}/violations"


def status(district: str, service: str, instance: str) -> str:
    service = check_identifier(service, "service")
    instance = check_identifier(instance, "instance")
    return f"{district_root(district)}/status/{service}/{instance}"


def deadletter(district: str) -> str:
    return f"{district_root(district)}/deadletter"


def all_faces(district: str) -> str:
    """Filter matching every camera's faces in a district."""
    return f"{district_root(district)}/+/faces"


def all_verdicts(district: str) -> str:
    return f"{district_root(district)}/+/verdicts"


def all_violations(district: str) -> str:
    return f"{district_root(district)}/+/violations"


def all_status(district: str) -> str:
    return f"{district_root(district)}/status/+/+"


def shared_faces(district: str, group: str = INFERENCE_SHARE_GROUP) -> str:
    """MQTT 5 shared subscription so that inference workers split a district's faces."""
    return f"$share/{check_identifier(group, 'share group')}/{all_faces(district)}"


def camera_of(topic: str) -> str | None:
    """The camera segment of a per-camera topic, or None if the topic is not one."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != ROOT:
        return None
    return parts[3]
