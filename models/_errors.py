"""The project's errors: one root, a shallow tree.

    FedAsyncError                 root: catch this to catch everything of ours
     +-- ConfigError              a setting is missing, malformed or out of range
     +-- WireError                bytes that are not a valid message (decode/encode)
     |    +-- UnsupportedSchema   a well-formed message of a schema we do not speak
     +-- InvalidUpdate            a decoded update that must not be merged (carries `reason`)
     +-- ModelError               a model spec, parameter vector or export is unusable
     +-- StateError               durable state (SQLite, checkpoints, spool) is unusable
     +-- BrokerError              the MQTT broker, or the client library's talk with it, failed
          +-- BrokerRefused       the broker refused the CONNECT (also a ConnectionError)
          +-- PublishFailed       a publish the client could not queue or report (also a
          |                       RuntimeError)
          +-- BadTopic            a topic or filter MQTT does not allow (also a ValueError)

Errors keep their context as attributes so callers (logs, acks, metrics) need not parse
messages. Third-party errors are converted at the boundary that calls the library (paho-mqtt's in
`models._mqtt`). The broker errors also derive from the builtin that paho (or the socket layer)
raised before, so code that catches that keeps working.
"""

from __future__ import annotations


class FedAsyncError(Exception):
    """Root of every error raised on purpose by fedasync-iot."""


class ConfigError(FedAsyncError):
    """A configuration value is missing, malformed or out of range."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class WireError(FedAsyncError):
    """Bytes that cannot be decoded into (or a value that cannot be encoded as) a message."""


class UnsupportedSchema(WireError):
    """A message from a schema version or kind this build does not speak."""

    def __init__(self, message: str, *, schema: object = None) -> None:
        super().__init__(message)
        self.schema = schema


class InvalidUpdate(FedAsyncError):
    """An update that decoded fine but must not be merged.

    `reason` is a short machine-readable code (e.g. ``"non_finite"``, ``"too_stale"``) that goes
    into the rejection ack, the lineage table and the ``rejected{reason=...}`` metric.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ModelError(FedAsyncError):
    """A model spec, parameter vector, training input or export is unusable."""


class StateError(FedAsyncError):
    """Durable state (database, checkpoint, spool) is missing, corrupt or inconsistent."""


class BrokerError(FedAsyncError):
    """The MQTT broker, or the client library's exchange with it, failed."""


class BrokerRefused(BrokerError, ConnectionError):
    """The broker answered the CONNECT with a refusal (bad credentials, not authorized, ...).

    A ConnectionError too: a refused probe is retried like an unreachable broker."""


class PublishFailed(BrokerError, RuntimeError):
    """A publish that was never queued (no connection, a full queue), so its handle cannot
    tell whether the broker got it. A RuntimeError too: what paho raises there."""


class BadTopic(BrokerError, ValueError):
    """A topic or topic filter MQTT does not allow (empty, a wildcard in a topic to publish to,
    too long), or a QoS out of range. A ValueError too: what paho raises there."""
