"""``maskmesh status`` reads a district's retained status topics from a real broker."""

from __future__ import annotations

import json

import pytest

from maskmesh.bus import Bus
from maskmesh.settings import ServiceSettings
from maskmesh.statusview import main as status_main

from .conftest import Broker


def _operator_env(monkeypatch: pytest.MonkeyPatch, broker: Broker) -> None:
    monkeypatch.setenv("MASKMESH_DISTRICT", broker.district)
    monkeypatch.setenv("MASKMESH_BROKER__PORT", str(broker.port))
    monkeypatch.setenv("MASKMESH_BROKER__USERNAME", "operator")
    monkeypatch.setenv("MASKMESH_BROKER__PASSWORD", broker.files.passwords["operator"])


def test_status_lists_online_and_offline_services(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = ServiceSettings(
        district=broker.district, instance="w1", broker=broker.settings("inference")
    )
    worker = Bus(settings, "inference")
    assert worker.start(wait_s=5)
    worker.counters.add("verdicts", 12)
    worker.counters.add("dead_letters", 1)
    worker.publish_status()
    gone = Bus(settings.model_copy(update={"instance": "w2"}), "inference")
    assert gone.start(wait_s=5)
    gone.stop()

    _operator_env(monkeypatch, broker)
    try:
        assert status_main(["--json", "--wait-s", "1"]) == 0
    finally:
        worker.stop()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_instance = {row["instance"]: row for row in report["services"]}
    assert by_instance["w1"]["state"] == "online"
    assert by_instance["w1"]["counters"]["verdicts"] == 12
    assert by_instance["w1"]["errors"] == {"dead_letters": 1}
    assert by_instance["w2"]["state"] == "offline"


def test_status_table_when_district_is_empty(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _operator_env(monkeypatch, broker)
    assert status_main(["--wait-s", "0.5"]) == 0
    assert "no service has published a status" in capsys.readouterr().out
