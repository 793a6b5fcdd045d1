"""Two processes under one client id throw each other off the broker every second.

The documentation forbids two workers with one ``worker_id``; when it happens anyway
the log must say so once, not print a WARNING per take-over for as long as they run.
"""

from __future__ import annotations

import logging
import time

import pytest

from maskmesh.bus import Bus
from maskmesh.settings import ServiceSettings
from tests.conftest import Broker


def _bus(broker: Broker) -> Bus:
    settings = ServiceSettings(
        district="demo",
        instance="w1",
        broker=broker.settings("inference").model_copy(
            update={"reconnect_min_delay_s": 0.2, "reconnect_max_delay_s": 0.5}
        ),
    )
    return Bus(settings, "inference", client_id="inference-demo-w1", persistent=True)


def test_two_clients_with_one_id_are_named_once_not_warned_per_take_over(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="maskmesh.bus")
    first, second = _bus(broker), _bus(broker)
    try:
        assert first.start(wait_s=5)
        assert second.start(wait_s=5)
        time.sleep(6)
        take_overs = first.counters.get("reconnects") + second.counters.get("reconnects")
    finally:
        second.stop()
        first.stop()
    assert take_overs >= 4, "the two clients did not fight over the id"
    records = [r for r in caplog.records if r.name == "maskmesh.bus"]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    errors = [r.getMessage() for r in records if r.levelno == logging.ERROR]
    assert len(warnings) <= 2, [r.getMessage() for r in warnings]
    assert len(errors) in (1, 2) and all("inference-demo-w1" in e for e in errors), errors
    infos = [r for r in records if r.levelno == logging.INFO]
    assert len(infos) <= 6, [r.getMessage() for r in infos]
