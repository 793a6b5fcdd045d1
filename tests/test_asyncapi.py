"""docs/asyncapi.yaml is valid AsyncAPI 3.0 and cannot drift from the code.

Payload schemas must equal the pydantic models' schemas, channel addresses the topic
functions, operations the broker ACL, and the committed file what the generator writes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator, Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7, DRAFT202012

from maskmesh import asyncapi, topics
from maskmesh.brokerconf import BrokerPlan, acl_text, capture_user
from maskmesh.messages import (
    DeadLetter,
    FaceCrop,
    ServiceStatus,
    Verdict,
    Violation,
    decode,
)
from maskmesh.settings import REPO_ROOT

DOCUMENT = REPO_ROOT / "docs" / "asyncapi.yaml"
MODELS = {
    "faces": FaceCrop,
    "verdicts": Verdict,
    "violations": Violation,
    "status": ServiceStatus,
    "deadletter": DeadLetter,
}
# Sample parameter values and what each topic function makes of them.
SAMPLE = {"district": "north", "camera": "cam7", "service": "inference", "instance": "w2"}
TOPICS = {
    "faces": topics.faces("north", "cam7"),
    "verdicts": topics.verdicts("north", "cam7"),
    "violations": topics.violations("north", "cam7"),
    "status": topics.status("north", "inference", "w2"),
    "deadletter": topics.deadletter("north"),
}
DOC_URI = "urn:maskmesh:asyncapi"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))


def _pointer(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"only references inside the document are used: {ref}"
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _payload_schema_name(document: dict[str, Any], channel_id: str) -> str:
    channel = document["channels"][channel_id]
    (message_ref,) = channel["messages"].values()
    message = _pointer(document, message_ref["$ref"])
    ref = message["payload"]["$ref"]
    prefix = "#/components/schemas/"
    assert ref.startswith(prefix)
    return str(ref.removeprefix(prefix))


def _asyncapi_validator(shared: Path) -> Draft7Validator:
    schema = json.loads((shared / "schemas" / "asyncapi-3.0.0.json").read_text(encoding="utf-8"))
    uri = "urn:maskmesh:asyncapi-3.0.0-schema"
    resource = Resource.from_contents(schema, default_specification=DRAFT7)
    registry: Registry[Any] = Registry().with_resource(uri, resource)
    # Its "#/definitions/..." references resolve inside the file through the registry.
    return Draft7Validator({"$ref": uri}, registry=registry)


def test_document_is_valid_asyncapi_3(shared: Path, document: dict[str, Any]) -> None:
    validator = _asyncapi_validator(shared)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message[:200]}" for e in errors)

    # The validator looks deep: an AsyncAPI 2 style action inside an operation fails.
    broken = copy.deepcopy(document)
    broken["operations"]["integratorReceiveVerdicts"]["action"] = "subscribe"
    with pytest.raises(ValidationError):
        validator.validate(broken)


def test_committed_document_is_what_the_generator_writes() -> None:
    assert DOCUMENT.read_text(encoding="utf-8") == asyncapi.render(), (
        "docs/asyncapi.yaml is stale: run `python -m maskmesh.asyncapi --out docs/asyncapi.yaml`"
    )


def test_every_topic_kind_has_a_channel(document: dict[str, Any]) -> None:
    assert set(document["channels"]) == set(MODELS)


@pytest.mark.parametrize("channel_id", sorted(MODELS))
def test_payload_schema_equals_the_model(document: dict[str, Any], channel_id: str) -> None:
    model = MODELS[channel_id]
    assert _payload_schema_name(document, channel_id) == model.__name__
    expected = model.model_json_schema(
        mode=asyncapi.SCHEMA_MODE, ref_template="#/components/schemas/{model}"
    )
    nested = expected.pop("$defs", {})
    schemas = document["components"]["schemas"]
    assert schemas[model.__name__] == expected
    for name, schema in nested.items():
        assert schemas[name] == schema


@pytest.mark.parametrize("channel_id", sorted(MODELS))
def test_channel_address_matches_the_topic_function(
    document: dict[str, Any], channel_id: str
) -> None:
    channel = document["channels"][channel_id]
    address = channel["address"]
    for name in channel["parameters"]:
        assert "{" + name + "}" in address
        address = address.replace("{" + name + "}", SAMPLE[name])
    assert address == TOPICS[channel_id]
    assert "{" not in address


@pytest.mark.parametrize("channel_id", sorted(MODELS))
def test_examples_are_valid_payloads(document: dict[str, Any], channel_id: str) -> None:
    """Each example passes both the document's JSON Schema and the service's decode()."""
    registry: Registry[Any] = Registry().with_resource(
        DOC_URI, Resource.from_contents(document, default_specification=DRAFT202012)
    )
    name = _payload_schema_name(document, channel_id)
    validator = Draft202012Validator(
        {"$ref": f"{DOC_URI}#/components/schemas/{name}"}, registry=registry
    )
    message = document["components"]["messages"][channel_id]
    assert message["examples"]
    for example in message["examples"]:
        validator.validate(example["payload"])
        decode(MODELS[channel_id], json.dumps(example["payload"]).encode())


def _matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching, '+' and '#' included."""
    parts, levels = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(parts):
        if part == "#":
            return True
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(parts) == len(levels)


def _acl(plan: BrokerPlan) -> dict[str, list[tuple[str, str]]]:
    rules: dict[str, list[tuple[str, str]]] = {}
    user = ""
    for line in acl_text(plan).splitlines():
        words = line.split()
        if words[:1] == ["user"]:
            user = words[1]
            rules[user] = []
        elif words[:1] == ["topic"]:
            rules[user].append((words[1], words[2]))
    return rules


def _users_for(role: str, users: list[str]) -> list[str]:
    if role == "any":
        return users
    if role == "capture":
        return [capture_user(SAMPLE["camera"])]
    return [role]


def test_operations_are_what_the_acl_grants(document: dict[str, Any]) -> None:
    plan = BrokerPlan(district=SAMPLE["district"], cameras=(SAMPLE["camera"],), auditor=True)
    acl = _acl(plan)
    for op_id, operation in document["operations"].items():
        channel_id = operation["channel"]["$ref"].removeprefix("#/channels/")
        role = next(t["name"] for t in operation["tags"] if t["name"].startswith("role:"))[5:]
        access = "read" if operation["action"] == "receive" else "write"
        topic = TOPICS[channel_id]
        if channel_id == "status" and role in ("capture", "inference", "notifier"):
            instance = SAMPLE["camera"] if role == "capture" else "w2"
            topic = topics.status(SAMPLE["district"], role, instance)
        for user in _users_for(role, [u for u in acl if u != "auditor"]):
            granted = [f for a, f in acl[user] if a in (access, "readwrite")]
            assert any(_matches(f, topic) for f in granted), f"{op_id}: {user} may not {access}"


def test_integrators_get_no_personal_data(document: dict[str, Any]) -> None:
    personal = {
        cid for cid, ch in document["channels"].items() if "Personal data" in ch["description"]
    }
    assert personal == {"faces", "violations"}
    for operation in document["operations"].values():
        tags = {t["name"] for t in operation["tags"]}
        if "role:integrator" in tags:
            assert operation["channel"]["$ref"].removeprefix("#/channels/") not in personal
            assert "personal-data" not in tags
    acl = _acl(BrokerPlan(district="north", cameras=("cam7",)))
    for topic in (TOPICS["faces"], TOPICS["violations"]):
        assert not any(_matches(f, topic) for _, f in acl["integrator"])


def test_qos_1_everywhere_and_retain_only_on_status(document: dict[str, Any]) -> None:
    for operation in document["operations"].values():
        binding = operation["bindings"]["mqtt"]
        assert binding["qos"] == 1
        if operation["action"] == "send":
            is_status = operation["channel"]["$ref"] == "#/channels/status"
            assert binding["retain"] is is_status
