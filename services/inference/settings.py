"""Settings of an inference worker: the shared service settings plus an ``inference:`` section.

YAML example::

    district: north
    instance: gpu-host-a
    broker: {host: broker.north.local, port: 1883, username: inference, password_file: ...}
    inference:
      model_path: /models/maskmesh-efficientnet-lite0.onnx
      worker_id: a1
      max_batch: 32
      max_wait_ms: 10

Environment variables follow the usual scheme (``MASKMESH_INFERENCE__MAX_BATCH=16``);
``MASKMESH_MODEL`` names the model file when nothing more specific does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from maskmesh.ids import Identifier
from maskmesh.settings import REPO_ROOT, ServiceSettings

MODEL_ENV = "MASKMESH_MODEL"
# The more accurate of the two shipped models, for about a fifth fewer faces per second
# than the AlexNet on a CPU; models/README.md gives the figures behind the choice.
DEFAULT_MODEL = REPO_ROOT / "models" / "maskmesh-efficientnet-lite0.onnx"


def default_model_path() -> Path:
    """``$MASKMESH_MODEL`` when set, else the repository's default model."""
    value = os.environ.get(MODEL_ENV)
    return Path(value) if value else DEFAULT_MODEL


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class InferenceSection(BaseModel):
    """The ``inference:`` section.

    model_path: the ONNX model file (with its ``maskmesh`` metadata).
    threshold: p_mask below this is a violation; None takes the model's own (0.8).
    max_batch: most faces classified in one model call.
    max_wait_ms: longest a face waits for a batch to fill before the batch runs anyway.
    max_pending: faces held in memory, not yet classified; when full, the worker stops
        reading from the broker, which keeps the rest queued and un-acknowledged there.
    intra_op_threads: ONNX Runtime intra-op threads; None uses every available core.
    worker_id: stable name of this worker; its MQTT client id is
        ``inference-{district}-{worker_id}`` and its broker session (with every face
        queued for it) survives a restart only if this stays the same. None takes the
        service ``instance``.
    drain_idle_s: with ``--drain``, exit once nothing arrived for this long.
    duplicate_window_s: a face id seen again within this window counts as a duplicate.
    stop_timeout_s: on stop, longest wait for the PUBACKs of the batch in hand.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: Path = Field(default_factory=default_model_path)
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    max_batch: int = Field(default=32, ge=1, le=1024)
    max_wait_ms: float = Field(default=10.0, ge=0.0, le=10_000.0)
    # At most 65535: the value is also sent as the MQTT 5 Receive Maximum.
    max_pending: int = Field(default=256, ge=1, le=65535)
    intra_op_threads: int | None = Field(default=None, ge=1, le=256)
    worker_id: Identifier | None = None
    drain_idle_s: float = Field(default=5.0, gt=0.0)
    duplicate_window_s: float = Field(default=600.0, ge=0.0)
    stop_timeout_s: float = Field(default=10.0, gt=0.0)


class InferenceSettings(ServiceSettings):
    """Settings of one inference worker process."""

    inference: InferenceSection = Field(default_factory=InferenceSection)

    @property
    def worker_id(self) -> str:
        """The configured worker id, else the service instance name."""
        return self.inference.worker_id or self.instance

    @property
    def worker_id_is_stable(self) -> bool:
        """False when the id comes from the default instance name (host name and pid)."""
        return self.inference.worker_id is not None or "instance" in self.model_fields_set

    @property
    def intra_op_threads(self) -> int:
        return self.inference.intra_op_threads or available_cores()
