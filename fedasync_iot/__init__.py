"""fedasync-iot: asynchronous federated learning for fleets of small IoT devices, over MQTT.

One import name for the whole distribution. Its parts, lowest layer first:

- ``fedasync_iot.models``: the shared core (wire format, config, errors, MQTT boundary) and the
  model side (specs, scikit-learn adapters, ONNX);
- ``fedasync_iot.agent`` and ``fedasync_iot.coordinator``: the two services, independent of
  each other;
- ``fedasync_iot.fleet`` (the simulator) and ``fedasync_iot.bench`` (benchmarks) on top.

In the repository each part keeps its directory at the top (``agent/``, ``coordinator/``, ...);
the installed distribution maps them under this package (``pyproject.toml``, package-dir), and
the symbolic links beside this file give tools run from a checkout the same names.
"""

__version__ = "0.1.0"
