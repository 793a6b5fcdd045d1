"""Training, evaluation and export of the mask classifiers; never imported by the services."""

# Switches ONNX Runtime's telemetry off before any training module imports it.
import services  # noqa: F401
