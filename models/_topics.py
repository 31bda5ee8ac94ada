"""MQTT topic layout shared by agent and coordinator (docs/architecture.md, "Topics")."""

from __future__ import annotations

from dataclasses import dataclass

from fedasync_iot.models._errors import ConfigError
from fedasync_iot.models._ids import ID_PATTERN, ID_RULE


@dataclass(frozen=True, slots=True)
class Topics:
    """All topics of one fleet, under ``<root>/<fleet>`` (default root ``fl``)."""

    fleet: str
    root: str = "fl"

    def __post_init__(self) -> None:
        for name in ("fleet", "root"):
            if not ID_PATTERN.fullmatch(getattr(self, name)):
                raise ConfigError(f"{name} must be {ID_RULE}", key=name)

    @property
    def prefix(self) -> str:
        return f"{self.root}/{self.fleet}"

    def update(self, device_id: str) -> str:
        return f"{self.prefix}/update/{device_id}"

    def ack(self, device_id: str) -> str:
        return f"{self.prefix}/ack/{device_id}"

    def status(self, device_id: str) -> str:
        return f"{self.prefix}/status/{device_id}"

    @property
    def model(self) -> str:
        return f"{self.prefix}/model"

    @property
    def template(self) -> str:
        """The retained template of the model spec (its ONNX graph without weights), published
        once per template id; devices fetch it once and cache it."""
        return f"{self.prefix}/template"

    @property
    def weights(self) -> str:
        """The retained compact snapshot of the version on `model`: its weights (float16 when
        they fit) and the id of the template that turns them into an ONNX model."""
        return f"{self.prefix}/weights"

    @property
    def announce(self) -> str:
        """The retained announcement of the snapshot on `model` (version, sha256, size, time,
        cohort): tens of bytes, so agents fetch the full snapshot only when they use it."""
        return f"{self.prefix}/announce"

    @property
    def coordinator_status(self) -> str:
        return f"{self.prefix}/coordinator/status"

    @property
    def all_updates(self) -> str:
        return f"{self.prefix}/update/+"

    @property
    def all_status(self) -> str:
        return f"{self.prefix}/status/+"

    def owns(self, topic: str) -> bool:
        """True for a topic of this fleet (``fl/acc/...``, not ``fl/accm/...``)."""
        return topic.startswith(f"{self.prefix}/")

    def rewritten(self, topic: str) -> bool:
        """Whether `topic` is one of this fleet's with a '.' of a level turned into '/': a
        broker that maps MQTT topics onto AMQP routing keys does that (RabbitMQ's MQTT plugin:
        '/' -> '.' on the way in, '.' -> '/' on delivery), so a fleet name, topic root or
        device id with a '.' cannot be served through it (docs/brokers.md)."""
        if "." in topic or not topic.replace("/", ".").startswith(
                self.prefix.replace("/", ".") + "."):
            return False
        # Ours have at most two levels past the prefix (update/<device>, coordinator/status).
        return "." in self.prefix or topic.count("/") > self.prefix.count("/") + 2

    def device_of(self, topic: str, kind: str = "update") -> str | None:
        """The device id in ``<prefix>/<kind>/<device>``, or None if the topic is not that shape."""
        head = f"{self.prefix}/{kind}/"
        if not topic.startswith(head):
            return None
        device = topic[len(head):]
        return device if ID_PATTERN.fullmatch(device) else None
