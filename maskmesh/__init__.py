"""maskmesh: face-mask compliance monitoring over MQTT.

This package holds what every service agrees on: message models, topic names, settings
and the MQTT client helper. Each service lives in its own package under ``services``;
the training code lives in ``training`` and is never imported by the services.
"""

__version__ = "0.1.0"
