"""The maskmesh services: capture, inference, notifier and their tools.

Importing this package switches ONNX Runtime's telemetry off for the process. Its Linux
builds (1.29 and later) send usage events to Microsoft unless ``ORT_DISABLE_TELEMETRY`` is
set before the runtime starts; a city's face pipeline has no business calling out, and a
closed network would only see failing lookups. An operator who wants the events can set
the variable to ``0`` beforehand.
"""

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
